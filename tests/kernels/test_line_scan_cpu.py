"""The compiled CPU line-scan kernel against the PyTorch reference: values, gradients, dtypes,
odd shapes, chunks, strides, unwritten outputs, torch.compile, bad input and long-scan stability."""
import contextlib

import pytest
import torch

from dit_gspn.ops import extension, line_scan, normalize_gates
from dit_gspn.ops.reference import line_scan_reference

from helpers.line_scan_inputs import forward_and_grads

NAMES = ("x", "lam", "wl", "wc", "wr")

#: Tolerances (rtol, atol relative to the reference's largest magnitude) per dtype. Half types
#: compute in float32 like the reference; they differ by the rounding of outputs and of the h
#: the backward reads back.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    assert extension.load("cpu"), "the CPU gspn kernels did not build (see the warning)"


def random_inputs(shape, dtype=torch.float32):
    """Random data with the structure the model feeds: |lam| <= 1 and normalised gates."""
    x = torch.randn(shape, dtype=torch.float64)
    lam = torch.rand(shape, dtype=torch.float64) * 2 - 1
    wl, wc, wr = normalize_gates(*(torch.randn(shape, dtype=torch.float64) for _ in range(3)))
    return [t.to(dtype) for t in (x, lam, wl, wc, wr)]


def assert_close_scaled(got, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = expected.double().abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


SHAPES = [
    (2, 3, 8, 8),
    (1, 2, 5, 11),  # H != W
    (2, 2, 13, 4),
    (3, 1, 1, 9),  # H = 1
    (2, 4, 9, 1),  # W = 1
    (1, 1, 1, 1),
    (7, 17, 3),  # three dims, odd
    (6, 5),  # a bare (H, W) map
    (2, 3, 33, 70),  # several SIMD widths plus a tail
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
def test_cpu_kernel_matches_reference_float64(shape, chunk):
    inputs = random_inputs(shape, torch.float64)
    weight = torch.randn(shape, dtype=torch.float32)
    h, grads = forward_and_grads(inputs, chunk, "cpu", weight)
    h_ref, grads_ref = forward_and_grads(inputs, chunk, "reference", weight)
    assert h.dtype == torch.float64 and h.shape == torch.Size(shape) and h.is_contiguous()
    assert_close_scaled(h, h_ref, torch.float64, "h")
    for name, g, r in zip(NAMES, grads, grads_ref):
        assert_close_scaled(g, r, torch.float64, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,chunk", [((2, 3, 16, 16), None), ((1, 4, 10, 23), 4), ((3, 2, 1, 7), None), ((2, 3, 9, 1), 2)])
def test_cpu_kernel_matches_reference_in_each_dtype(dtype, shape, chunk):
    inputs = random_inputs(shape, dtype)
    weight = torch.randn(shape)
    h, grads = forward_and_grads(inputs, chunk, "cpu", weight)
    h_ref, grads_ref = forward_and_grads(inputs, chunk, "reference", weight)
    assert h.dtype == dtype
    assert_close_scaled(h, h_ref, dtype, "h")
    for name, g, r in zip(NAMES, grads, grads_ref):
        assert g.dtype == dtype
        assert_close_scaled(g, r, dtype, f"d{name}")


@pytest.mark.parametrize("shape,chunk", [((1, 2, 4, 5), None), ((2, 5, 3), 2), ((1, 3, 1), None)])
def test_cpu_kernel_gradcheck(shape, chunk):
    inputs = [t.requires_grad_() for t in random_inputs(shape, torch.float64)]
    assert torch.autograd.gradcheck(lambda *t: line_scan(*t, chunk=chunk, impl="cpu"), inputs)


@contextlib.contextmanager
def nan_filled_empty_tensors():
    """Make every torch.empty (the kernels' output buffers included) come back filled with NaN."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,chunk", [((2, 3, 7, 9), None), ((1, 2, 8, 1), 3), ((4, 1, 6), 2)])
def test_cpu_kernel_writes_every_output_element(dtype, shape, chunk):
    inputs = random_inputs(shape, dtype)
    with nan_filled_empty_tensors():
        assert torch.isnan(torch.empty(4, dtype=dtype)).all(), "the poisoning does not reach torch.empty"
        h, grads = forward_and_grads(inputs, chunk, "cpu", torch.randn(shape))
    for name, t in zip(("h",) + tuple(f"d{n}" for n in NAMES), [h, *grads]):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"
    assert_close_scaled(h, line_scan_reference(*inputs, chunk), dtype, "h")


def test_cpu_kernel_accepts_non_contiguous_inputs():
    # Leaves of several layouts; the scan sees (2, 3, 11, 8) views of them: transposed,
    # strided slices and a broadcast (stride 0) batch.
    leaves = [
        torch.randn(2, 3, 8, 11, dtype=torch.float64),
        torch.rand(2, 3, 22, 16, dtype=torch.float64),
        torch.rand(2, 3, 8, 11, dtype=torch.float64) / 2,
        torch.rand(1, 3, 11, 8, dtype=torch.float64) / 2,
        torch.rand(2, 8, 11, 3, dtype=torch.float64) / 2,
    ]

    def views(ts):
        x, lam, wl, wc, wr = ts
        return [x.transpose(-1, -2), lam[:, :, ::2, ::2], wl.transpose(-1, -2), wc.expand(2, -1, -1, -1),
                wr.permute(0, 3, 2, 1)]

    assert not any(v.is_contiguous() for v in views(leaves))
    weight = torch.randn(2, 3, 11, 8)
    results = []
    for impl in ("cpu", "reference"):
        ts = [t.clone().requires_grad_() for t in leaves]
        h = line_scan(*views(ts), chunk=2, impl=impl)
        (h * weight).sum().backward()
        results.append((h, [t.grad for t in ts]))
    (h, grads), (h_ref, grads_ref) = results
    assert_close_scaled(h, h_ref, torch.float64, "h")
    for name, g, r in zip(NAMES, grads, grads_ref):
        assert_close_scaled(g, r, torch.float64, f"d{name}")


def test_default_impl_on_cpu_is_the_compiled_kernel():
    inputs = random_inputs((2, 2, 5, 6))
    h = line_scan(*inputs)
    torch.testing.assert_close(h, line_scan(*inputs, impl="cpu"), rtol=0, atol=0)
    torch.testing.assert_close(h, line_scan_reference(*inputs), rtol=1e-5, atol=1e-5)


def test_cpu_ops_pass_opcheck():
    inputs = [t.requires_grad_() for t in random_inputs((2, 3, 5, 4), torch.float64)]
    torch.library.opcheck(torch.ops.gspn.line_scan_fwd.default, (*inputs, 2))
    h = line_scan(*inputs, chunk=2, impl="cpu").detach()
    grad_h = torch.randn_like(h)
    torch.library.opcheck(torch.ops.gspn.line_scan_bwd.default, (grad_h, h, *(t.detach() for t in inputs), 2))


def test_torch_compile_fullgraph_traces_through_the_kernel():
    def block(x, lam, gl, gc, gr):
        wl, wc, wr = normalize_gates(gl, gc, gr)
        return line_scan(x, lam, wl, wc, wr, chunk=3) * 2.0

    x, lam = random_inputs((2, 3, 7, 6))[:2]
    gates = [torch.randn(2, 3, 7, 6) for _ in range(3)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.clone().requires_grad_() for t in (x, lam, *gates)]
    compiled_leaves = [t.clone().requires_grad_() for t in (x, lam, *gates)]
    eager, out = block(*eager_leaves), compiled(*compiled_leaves)
    torch.testing.assert_close(out, eager)
    weight = torch.randn_like(out)
    (eager * weight).sum().backward()
    (out * weight).sum().backward()
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def _ok():
    return random_inputs((2, 3, 4, 5))


@pytest.mark.parametrize(
    "make,kwargs,error,match",
    [
        (lambda: [*_ok()[:4], torch.rand(2, 3, 4, 6)], {}, ValueError, "wr has shape"),
        (lambda: [*_ok()[:2], torch.rand(2, 3, 4, 5, device="meta"), *_ok()[3:]], {}, ValueError, "wl is on meta"),
        (lambda: [_ok()[0], _ok()[1].double(), *_ok()[2:]], {}, TypeError, "lam has dtype torch.float64"),
        (lambda: [torch.randint(0, 5, (2, 3, 4, 5)) for _ in range(5)], {}, TypeError, "floating point"),
        (lambda: [torch.rand(5) for _ in range(5)], {}, ValueError, r"\(\.\.\., H, W\)"),
        (_ok, {"chunk": 0}, ValueError, "chunk must be an int >= 1"),
        (_ok, {"chunk": -2}, ValueError, "chunk must be an int >= 1"),
        (_ok, {"chunk": 2.0}, ValueError, "chunk must be an int >= 1"),
        (_ok, {"impl": "triton"}, ValueError, "impl must be one of"),
        (_ok, {"impl": "cuda"}, ValueError, "needs cuda tensors"),
        (lambda: [*_ok()[:4], [1.0]], {}, TypeError, "wr must be a torch.Tensor"),
    ],
)
def test_bad_input_gets_a_clear_error(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        line_scan(*make(), **kwargs)


def test_kernel_itself_rejects_what_would_read_out_of_bounds():
    # A direct torch.ops call skips line_scan's checks; the kernel still refuses mismatched shapes and dtypes.
    x, lam, wl, wc, wr = _ok()
    with pytest.raises(RuntimeError, match="wc has shape"):
        torch.ops.gspn.line_scan_fwd(x, lam, wl, wc[..., :4], wr, 0)
    with pytest.raises(RuntimeError, match="wr has dtype"):
        torch.ops.gspn.line_scan_fwd(x, lam, wl, wc, wr.double(), 0)
    # A chunk below 1 reads nothing out of bounds: it scans the whole height, as 0 does.
    torch.testing.assert_close(torch.ops.gspn.line_scan_fwd(x, lam, wl, wc, wr, -1), line_scan_reference(x, lam, wl, wc, wr),
                               rtol=1e-5, atol=1e-5)


def test_long_bfloat16_scan_stays_finite_and_bounded():
    """4096 rows with normalised gates and |lam| <= 1: row-stochastic propagation can only
    accumulate the drive, so |h[i]| <= sum_{k<=i} max_j |lam x|[k], and float32 accumulation
    keeps the bfloat16 result close to a float64 scan of the same inputs."""
    inputs = random_inputs((2, 4096, 48), torch.bfloat16)
    h = line_scan(*inputs, impl="cpu")
    assert torch.isfinite(h).all()
    drive = (inputs[1].double() * inputs[0].double()).abs().amax(dim=-1)  # (2, H)
    bound = drive.cumsum(dim=-1).unsqueeze(-1)
    assert (h.double().abs() <= bound * (1 + 2 ** -7) + 1e-6).all()
    exact = line_scan_reference(*(t.double() for t in inputs))
    err = (h.double() - exact).abs().max().item()
    assert err <= 2 ** -7 * exact.abs().max().item(), f"bfloat16 scan drifted from float64 by {err}"
