"""The CUDA line-scan kernel against the PyTorch reference on a GPU (run by `make gpu-check`)."""
import pytest
import torch

from dit_gspn.ops import extension, line_scan, normalize_gates
from dit_gspn.ops.reference import line_scan_reference

from helpers.line_scan_inputs import forward_and_grads

pytestmark = pytest.mark.cuda

NAMES = ("x", "lam", "wl", "wc", "wr")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    assert extension.load("cuda"), "the CUDA gspn kernels did not build (see the warning)"


def random_inputs(shape, dtype, device="cuda"):
    x = torch.randn(shape, device=device)
    lam = torch.rand(shape, device=device) * 2 - 1
    wl, wc, wr = normalize_gates(*(torch.randn(shape, device=device) for _ in range(3)))
    return [t.to(dtype) for t in (x, lam, wl, wc, wr)]


def assert_close_scaled(got, expected, dtype, what):
    tol = TOL[dtype]
    scale = expected.double().abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


SHAPES = [
    ((2, 3, 16, 16), None),  # a DiT token grid: planes packed per block
    ((512, 16, 16), 4),
    ((2, 3, 37, 53), None),  # H != W, odd
    ((1, 2, 64, 200), 7),
    ((3, 2, 1, 9), None),  # H = 1
    ((2, 3, 17, 1), 2),  # W = 1
    ((1, 1, 40, 1024), None),  # one thread per column, a full block
    ((1, 2, 12, 2001), 5),  # several columns per thread
    ((1, 1, 6, 2048), None),  # the widest row: 512 threads x 4 columns
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape,chunk", SHAPES)
def test_cuda_kernel_matches_reference(dtype, shape, chunk):
    inputs = random_inputs(shape, dtype)
    weight = torch.randn(shape, device="cuda")
    h, grads = forward_and_grads(inputs, chunk, "cuda", weight)
    h_ref, grads_ref = forward_and_grads(inputs, chunk, "reference", weight)
    assert h.dtype == dtype and h.is_cuda
    assert_close_scaled(h, h_ref, dtype, "h")
    for name, g, r in zip(NAMES, grads, grads_ref):
        assert_close_scaled(g, r, dtype, f"d{name}")


def test_cuda_kernel_gradcheck_float64():
    inputs = [t.requires_grad_() for t in random_inputs((1, 2, 5, 6), torch.float64)]
    assert torch.autograd.gradcheck(lambda *t: line_scan(*t, chunk=3, impl="cuda"), inputs)


def test_cuda_kernel_writes_every_output_element():
    inputs = random_inputs((3, 5, 19, 45), torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4, device="cuda")).all()
        h, grads = forward_and_grads(inputs, 4, "cuda", torch.randn(3, 5, 19, 45, device="cuda"))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = False
    for t in (h, *grads):
        assert torch.isfinite(t).all()


def test_cuda_kernel_non_contiguous_and_on_a_side_stream():
    base = random_inputs((2, 3, 24, 20), torch.float32)
    views = [t.transpose(-1, -2) for t in base]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        h = line_scan(*views, impl="cuda")
    stream.synchronize()
    assert_close_scaled(h, line_scan_reference(*views), torch.float32, "h")


def test_cuda_kernel_on_more_than_2_pow_28_elements():
    shape = (4, 80, 1024, 1024)  # 335M elements
    assert torch.Size(shape).numel() > 2 ** 28
    inputs = random_inputs(shape, torch.bfloat16)
    h = line_scan(*inputs, impl="cuda")
    # Compare the first and the last planes (the largest offsets) with the reference; all finite.
    for planes in ((0, slice(0, 2)), (-1, slice(-3, None))):
        part = [t[planes] for t in inputs]
        assert_close_scaled(h[planes], line_scan_reference(*part), torch.bfloat16, f"h[{planes}]")
    assert torch.isfinite(h).all()
    del inputs, h
    torch.cuda.empty_cache()


def test_cuda_forward_and_backward_are_one_launch_each():
    inputs = [t.requires_grad_() for t in random_inputs((2, 3, 64, 48), torch.float32)]
    h = line_scan(*inputs, impl="cuda")
    grad = torch.randn_like(h)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        line_scan(*(t.detach() for t in inputs), impl="cuda")
        torch.ops.gspn.line_scan_bwd(grad, h.detach(), *(t.detach() for t in inputs), 0)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("line_scan_fwd_kernel" in k for k in kernels) == 1, kernels
    assert sum("line_scan_bwd_kernel" in k for k in kernels) == 1, kernels
    assert len(kernels) == 2, kernels


def test_rows_wider_than_the_cuda_kernel_use_the_reference_by_default():
    from dit_gspn.ops.dispatch import CUDA_MAX_LANES

    inputs = random_inputs((1, 1, 3, CUDA_MAX_LANES + 1), torch.float32)
    torch.testing.assert_close(line_scan(*inputs), line_scan_reference(*inputs))
    with pytest.raises(ValueError, match="at most 2048 pixels"):
        line_scan(*inputs, impl="cuda")
