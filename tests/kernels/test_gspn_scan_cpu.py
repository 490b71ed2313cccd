"""The fused four-direction scan ``gspn_scan`` equals the composition of ``normalize_gates`` and
``line_scan`` (``gspn_scan_reference``), forward and backward, through the C++ kernel on CPU and
the CUDA kernel on a GPU (``cuda``-marked tests)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dit_gspn.ops import gspn_scan
from dit_gspn.ops import dispatch
from dit_gspn.ops.dispatch import IMPL_ENV, impl_from_env
from dit_gspn.ops.gspn_scan import gspn_scan_impl
from dit_gspn.ops.reference import gspn_scan_reference

GATES = ("lam", "gl", "gc", "gr", "u")


def make_inputs(B, C, H, W, groups=None, dtype=torch.float32, device="cpu", requires_grad=False):
    """Random x and per-direction tensors (B, 4, G_k, H, W); groups: one G per gate tensor (default C)."""
    groups = groups or (C,) * 5
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    lam = torch.rand(B, 4, groups[0], H, W, dtype=torch.float64) * 0.8 + 0.2
    logits = [torch.randn(B, 4, g, H, W, dtype=torch.float64) * 1.5 for g in groups[1:4]]
    u = torch.randn(B, 4, groups[4], H, W, dtype=torch.float64)
    tensors = [x, lam, *logits, u]
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in tensors]


def reference_with_grads(inputs, chunk, grad_y):
    """Float64 reference output and gradients of <y, grad_y> for the given inputs."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    y = gspn_scan_reference(*leaves, chunk=chunk)
    # Gates the reference never reads (one-pixel-wide maps, chunk=1) have zero gradients.
    grads = torch.autograd.grad(y, leaves, grad_y.double(), allow_unused=True)
    return y.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def fused_with_grads(inputs, chunk, grad_y, impl):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = gspn_scan(*leaves, chunk=chunk, impl=impl)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return y.detach(), grads


def assert_close_scaled(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(max |expected|, 1): a dtype-sized error relative to the data's scale.

    The scale's floor of 1 (the inputs are O(1)) covers gradients that are mathematically zero,
    e.g. the gates of a one-pixel-wide map, where every normalised weight is a constant.
    """
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * scale {scale:.3g}"


TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}

SHAPES = [
    # (B, C, H, W, groups (lam, gl, gc, gr, u), chunk)
    (2, 3, 5, 7, None, None),
    (1, 4, 7, 4, (2, 4, 1, 2, 4), 2),  # H != W, mixed G in {1, C/2, C}
    (1, 2, 1, 6, None, None),  # H = 1
    (1, 2, 6, 1, (1, 1, 1, 1, 1), 3),  # W = 1, G = 1
    (2, 6, 9, 9, (2, 3, 6, 1, 3), 4),  # odd square, chunked, G in {1, 2, 3, 6}
    (1, 4, 3, 11, (4, 4, 4, 4, 4), 1),  # chunk = 1: every step restarts
    (1, 2, 12, 10, (1, 2, 1, 2, 1), 5),  # chunk not dividing either side
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-G{s[4]}-chunk{s[5]}")
def test_cpu_kernel_matches_reference(shape, dtype):
    B, C, H, W, groups, chunk = shape
    inputs = make_inputs(B, C, H, W, groups, dtype)
    grad_y = torch.randn(B, C, H, W, dtype=torch.float64).to(dtype)
    y_ref, grads_ref = reference_with_grads(inputs, chunk, grad_y)
    y, grads = fused_with_grads(inputs, chunk, grad_y, impl="cpu")
    assert y.dtype == dtype and y.shape == (B, C, H, W)
    tol = TOLERANCE[dtype]
    assert_close_scaled(y, y_ref, tol, "y")
    for name, g, g_ref, t in zip(("x",) + GATES, grads, grads_ref, inputs):
        assert g.shape == t.shape and g.dtype == dtype
        assert_close_scaled(g, g_ref, tol, f"d{name}")


def test_float32_agrees_with_the_reference_in_float32():
    # The same comparison the users' float32 code sees: both implementations in float32.
    inputs = make_inputs(2, 4, 8, 6, (4, 2, 4, 1, 2), torch.float32)
    torch.testing.assert_close(gspn_scan(*inputs, chunk=3, impl="cpu"), gspn_scan_reference(*inputs, chunk=3))


@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck_float64(chunk):
    inputs = make_inputs(1, 2, 4, 3, (2, 1, 2, 1, 2), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: gspn_scan(*a, chunk=chunk, impl="cpu"), inputs, fast_mode=True)


def test_composed_impl_equals_reference():
    inputs = make_inputs(2, 4, 6, 5, (2, 4, 1, 2, 4), torch.float32)
    torch.testing.assert_close(
        gspn_scan(*inputs, chunk=4, impl="composed"), gspn_scan(*inputs, chunk=4, impl="reference")
    )


def test_opcheck():
    x, lam, gl, gc, gr, u = make_inputs(1, 4, 5, 3, (2, 4, 1, 2, 4), torch.float32, requires_grad=True)
    gspn_scan(x, lam, gl, gc, gr, u, impl="cpu")  # loads the library
    torch.library.opcheck(torch.ops.gspn.gspn_scan_fwd.default, (x, lam, gl, gc, gr, u, 2))
    gy = torch.randn(1, 4, 5, 3)
    torch.library.opcheck(
        torch.ops.gspn.gspn_scan_bwd.default,
        (gy, *(t.detach() for t in (x, lam, gl, gc, gr, u)), 0),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_compile_fullgraph_traces_the_fused_op():
    inputs = make_inputs(1, 4, 6, 5, (4, 2, 1, 4, 2), torch.float32, requires_grad=True)
    gspn_scan(*inputs, impl="cpu")  # build outside the traced region
    traced_ops = []

    def inductor_recording_ops(gm, example_inputs):
        traced_ops.extend(str(node.target) for node in gm.graph.nodes)
        return torch._inductor.compile(gm, example_inputs)

    compiled = torch.compile(lambda *a: gspn_scan(*a, chunk=3), fullgraph=True, backend=inductor_recording_ops)
    y = compiled(*inputs)
    assert "gspn.gspn_scan_fwd" in traced_ops, " ".join(traced_ops)  # the fused op, not a fallback, is in the graph
    grads = torch.autograd.grad(y.square().sum(), inputs)
    y_ref = gspn_scan_reference(*inputs, chunk=3)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), inputs)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs():
    B, C, H, W = 2, 4, 5, 6
    x = torch.randn(B, C, W, H).transpose(-1, -2)  # (B, C, H, W), strided
    lam = (torch.rand(B, 4, 2 * C, H, W) * 0.8 + 0.2)[:, :, ::2]  # (B, 4, C, H, W), every other plane
    gl, gc, gr = (torch.randn(B, H, W, 4, 2).permute(0, 3, 4, 1, 2) for _ in range(3))  # G = 2
    u = torch.randn(B, 4, 1, H, W + 3)[..., 1:-2]  # G = 1, a column slice
    inputs = [t.requires_grad_() if t.is_leaf else t for t in (x, lam, gl, gc, gr, u)]
    assert not any(t.is_contiguous() for t in inputs)
    grad_y = torch.randn(B, C, H, W)
    y_ref, grads_ref = reference_with_grads(inputs, 2, grad_y)
    y, grads = fused_with_grads(inputs, 2, grad_y, impl="cpu")
    assert_close_scaled(y, y_ref, 2e-5, "y")
    for g, g_ref in zip(grads, grads_ref):
        assert_close_scaled(g, g_ref, 2e-5, "grad")


# A (B, N, C) token tensor viewed as a (B, C, H, W) map is channels-last; the CPU runs a kernel of its own on
# it where the five gate tensors share one G with at least 8 channels per group, and the plane kernel
# otherwise. Either way y and dx come back channels-last, as x.
CHANNELS_LAST_SHAPES = [
    # (B, C, H, W, G, chunk)
    (2, 16, 5, 7, 2, None),
    (1, 24, 7, 4, 3, 2),  # H != W, chunked
    (1, 12, 1, 6, 1, None),  # H = 1, a group of 12 channels (not a whole number of vectors)
    (1, 16, 6, 1, 2, 3),  # W = 1
    (2, 32, 9, 9, 4, 4),  # odd square
    (1, 8, 3, 11, 1, 1),  # chunk = 1
    (1, 4, 5, 6, 2, 2),  # 2 channels per group: the plane kernel
]


def channels_last(inputs):
    return [inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-G{s[4]}-chunk{s[5]}")
def test_channels_last_x_matches_reference(shape, dtype):
    B, C, H, W, G, chunk = shape
    inputs = channels_last(make_inputs(B, C, H, W, (G,) * 5, dtype))
    grad_y = torch.randn(B, C, H, W, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last)
    y_ref, grads_ref = reference_with_grads(inputs, chunk, grad_y)
    y, grads = fused_with_grads(inputs, chunk, grad_y, impl="cpu")
    assert y.is_contiguous(memory_format=torch.channels_last) and grads[0].is_contiguous(memory_format=torch.channels_last)
    tol = TOLERANCE[dtype]
    assert_close_scaled(y, y_ref, tol, "y")
    for name, g, g_ref, t in zip(("x",) + GATES, grads, grads_ref, inputs):
        assert g.shape == t.shape and g.dtype == dtype
        assert_close_scaled(g, g_ref, tol, f"d{name}")


@pytest.mark.parametrize("groups", [(2, 2, 2, 2, 2), (2, 1, 2, 2, 2), (16, 16, 16, 16, 16)], ids=str)
def test_channels_last_x_with_any_grouping_matches_reference(groups):
    # Gate tensors with different G, or one channel per group, run the plane kernel on a copy of x.
    inputs = channels_last(make_inputs(2, 16, 6, 5, groups, torch.float32))
    grad_y = torch.randn(2, 16, 6, 5)
    y_ref, grads_ref = reference_with_grads(inputs, 3, grad_y)
    y, grads = fused_with_grads(inputs, 3, grad_y, impl="cpu")
    assert y.is_contiguous(memory_format=torch.channels_last) and grads[0].is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(y, y_ref, 2e-5, "y")
    for name, g, g_ref in zip(("x",) + GATES, grads, grads_ref):
        assert_close_scaled(g, g_ref, 2e-5, f"d{name}")


@pytest.mark.parametrize("chunk", [None, 2])
def test_channels_last_gradcheck_float64(chunk):
    inputs = channels_last(make_inputs(1, 16, 4, 3, (2,) * 5, torch.float64))
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: gspn_scan(*a, chunk=chunk, impl="cpu"), inputs, fast_mode=True)


def test_channels_last_opcheck_and_compile():
    # The fake (meta) functions promise the real kernel's layouts, so a compiled graph sees the right strides.
    x, lam, gl, gc, gr, u = channels_last(make_inputs(1, 16, 5, 3, (2,) * 5, torch.float32))
    gspn_scan(x, lam, gl, gc, gr, u, impl="cpu")
    torch.library.opcheck(torch.ops.gspn.gspn_scan_fwd.default, (x, lam, gl, gc, gr, u, 2))
    gy = torch.randn(1, 16, 5, 3).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.gspn.gspn_scan_bwd.default, (gy, x, lam, gl, gc, gr, u, 0),
                          test_utils=("test_schema", "test_faketensor"))
    inputs = [t.requires_grad_() for t in (x, lam, gl, gc, gr, u)]
    y = torch.compile(lambda *a: gspn_scan(*a, chunk=2), fullgraph=True)(*inputs)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, gspn_scan_reference(*inputs, chunk=2))



def test_impl_none_on_cpu_uses_the_fused_kernel():
    inputs = make_inputs(1, 2, 3, 4, None, torch.float32, requires_grad=True)
    assert "gspn_scan_fwd" in type(gspn_scan(*inputs).grad_fn).__name__


def test_forced_impl_context_manager_and_env():
    inputs = make_inputs(1, 2, 3, 4, None, torch.float32, requires_grad=True)
    with gspn_scan_impl("composed"):
        forced = gspn_scan(*inputs)
        explicit = gspn_scan(*inputs, impl="cpu")  # an explicit impl wins
    assert "gspn_scan_fwd" not in type(forced.grad_fn).__name__
    assert "gspn_scan_fwd" in type(explicit.grad_fn).__name__
    assert "gspn_scan_fwd" in type(gspn_scan(*inputs).grad_fn).__name__  # restored on exit
    with pytest.raises(ValueError, match="impl must be one of"):
        with gspn_scan_impl("fast"):
            pass


def test_impl_env_variable(monkeypatch):
    monkeypatch.setenv(IMPL_ENV, "composed")
    assert impl_from_env() == "composed"
    monkeypatch.setenv(IMPL_ENV, "triton")
    with pytest.raises(ValueError, match=IMPL_ENV):
        impl_from_env()


def _replace(inputs, index, tensor):
    out = list(inputs)
    out[index] = tensor
    return out


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: _replace(a, 0, a[0][0]), ValueError, r"x must be a \(B, C, H, W\)"),
        (lambda a: _replace(a, 2, a[2][:, :, :, :-1]), ValueError, r"gl must be \(B, 4, G, H, W\)"),
        (lambda a: _replace(a, 1, a[1][:, :3]), ValueError, r"lam must be \(B, 4, G, H, W\)"),
        (lambda a: _replace(a, 5, torch.randn(1, 4, 3, 3, 5)), ValueError, r"u's group count G=3 must divide"),
        (lambda a: _replace(a, 3, a[3].double()), TypeError, "gc has dtype torch.float64"),
        (lambda a: _replace(a, 0, a[0].to(torch.int64)), TypeError, "x must be floating point"),
    ],
)
def test_bad_inputs_raise_actionable_errors(mutate, error, match):
    inputs = make_inputs(1, 4, 3, 5, None, torch.float32)
    with pytest.raises(error, match=match):
        gspn_scan(*mutate(inputs))


@pytest.mark.parametrize("chunk", [0, -2, 1.5, True, "4"])
def test_bad_chunk_raises(chunk):
    with pytest.raises(ValueError, match="chunk must be None"):
        gspn_scan(*make_inputs(1, 2, 3, 3), chunk=chunk)


def test_chunk_accepts_any_integral():
    import numpy as np

    inputs = make_inputs(1, 2, 5, 4)
    torch.testing.assert_close(gspn_scan(*inputs, chunk=np.int64(2), impl="cpu"), gspn_scan(*inputs, chunk=2, impl="cpu"))


def test_bad_impl_raises():
    inputs = make_inputs(1, 2, 3, 3)
    with pytest.raises(ValueError, match="impl must be one of"):
        gspn_scan(*inputs, impl="triton")
    with pytest.raises(ValueError, match="needs cuda tensors"):
        gspn_scan(*inputs, impl="cuda")


@pytest.mark.parametrize("dtype, lanes, expected", [(torch.float32, 16, "cuda"), (torch.bfloat16, 16, "cuda"),
                                                    (torch.float64, 16, "composed"), (torch.float32, 4096, "composed")])
def test_impl_none_on_cuda_falls_back_where_the_kernel_cannot_run(monkeypatch, dtype, lanes, expected):
    # Decided from the device type, dtype and shape alone, so a CPU machine checks it with a stand-in tensor.
    from types import SimpleNamespace

    monkeypatch.setattr(dispatch, "kernels_loaded", lambda device_type: True)
    monkeypatch.setattr(dispatch, "kernel_usable", lambda op, device: True)
    x = SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(1, 2, 8, lanes))
    assert dispatch.resolve_impl("gspn_scan", (x,), None) == expected
    if dtype == torch.float64:
        with pytest.raises(TypeError, match="use impl='composed'"):
            dispatch.resolve_impl("gspn_scan", (x,), "cuda")
    if lanes > dispatch.CUDA_MAX_LANES:
        with pytest.raises(ValueError, match="at most 2048 pixels"):
            dispatch.resolve_impl("gspn_scan", (x,), "cuda")


@pytest.mark.parametrize("W, expected", [(2048, "cuda"), (2049, "reference")])
def test_line_scan_resolves_by_the_same_rules(monkeypatch, W, expected):
    # line_scan's lanes are its rows (dim -1) only, and its CUDA kernel computes every floating dtype.
    from types import SimpleNamespace

    monkeypatch.setattr(dispatch, "kernel_usable", lambda op, device: True)
    x = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64, shape=(1, 4096, W))
    assert dispatch.resolve_impl("line_scan", (x,), None) == expected
    with dispatch.scan_impl("composed"):  # an implementation line_scan does not offer: its automatic choice
        assert dispatch.resolve_impl("line_scan", (x,), None) == expected
    with dispatch.scan_impl("reference"):
        assert dispatch.resolve_impl("line_scan", (x,), None) == "reference"


def test_the_ops_are_defined_with_fake_tensors_before_any_kernel_is_built():
    """Importing the package defines every op's schema, fake tensors and autograd; no build runs, so
    torch.compile and fake-tensor tracing see the same ops whether or not the kernels built."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from dit_gspn.ops import extension
        with FakeTensorMode():
            x = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
            gates = [torch.empty(2, 4, 3, 4, 5) for _ in range(5)]
            y = torch.ops.gspn.gspn_scan_fwd(x, *gates, 0)
            h = torch.ops.gspn.line_scan_fwd(*(torch.empty(3, 4, 5) for _ in range(5)), 0)
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last), y.stride()
        assert h.shape == (3, 4, 5)
        assert extension.loaded_build() is None
        print("OK")
    """)], capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]


def test_the_op_itself_checks_shapes():
    # Direct torch.ops calls bypass the Python checks; the C++ ones still name the problem.
    x, lam, gl, gc, gr, u = make_inputs(1, 4, 3, 5)
    gspn_scan(x, lam, gl, gc, gr, u, impl="cpu")
    with pytest.raises(RuntimeError, match="group count G=3 must divide C=4"):
        torch.ops.gspn.gspn_scan_fwd(x, lam, gl, gc, gr, torch.randn(1, 4, 3, 3, 5), 0)


# ---------------------------------------------------------------------------------------------
# CUDA (run by `make gpu-check`; skipped without a GPU)

CUDA_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-G{s[4]}-chunk{s[5]}")
def test_cuda_kernel_matches_reference(shape, dtype):
    B, C, H, W, groups, chunk = shape
    inputs = make_inputs(B, C, H, W, groups, dtype, device="cuda")
    grad_y = torch.randn(B, C, H, W, dtype=torch.float64).to(device="cuda", dtype=dtype)
    y_ref, grads_ref = reference_with_grads(inputs, chunk, grad_y)
    y, grads = fused_with_grads(inputs, chunk, grad_y, impl="cuda")
    assert y.dtype == dtype and y.is_cuda
    tol = CUDA_TOLERANCE[dtype]
    assert_close_scaled(y, y_ref, tol, "y")
    for name, g, g_ref in zip(("x",) + GATES, grads, grads_ref):
        assert_close_scaled(g, g_ref, tol, f"d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "B, C, H, W, groups, chunk",
    [
        (2, 64, 128, 96, (64, 32, 1, 64, 32), None),  # non-square, mixed groups, global
        (1, 16, 512, 384, None, 64),  # a large map, chunked
        (1, 2, 2048, 8, None, None),  # the longest lanes the kernel takes (shared-memory tiles shrink)
        (1, 1, 40, 2048, (1, 1, 1, 1, 1), 7),
    ],
)
def test_cuda_large_maps_match_the_reference(B, C, H, W, groups, chunk):
    # The float64 reference on the GPU is the oracle.
    inputs = make_inputs(B, C, H, W, groups, torch.float32, device="cuda")
    grad_y = torch.randn(B, C, H, W, device="cuda")
    leaves = [t.double().requires_grad_() for t in inputs]
    y_ref = gspn_scan(*leaves, chunk=chunk, impl="reference")
    grads_ref = torch.autograd.grad(y_ref, leaves, grad_y.double())
    y, grads = fused_with_grads(inputs, chunk, grad_y, impl="cuda")
    assert_close_scaled(y, y_ref, 1e-4, "y")
    for name, g, g_ref in zip(("x",) + GATES, grads, grads_ref):
        assert_close_scaled(g, g_ref, 1e-4, f"d{name}")


@pytest.mark.cuda
def test_cuda_bf16_large_map_matches_float64():
    inputs = make_inputs(2, 32, 256, 256, (32, 8, 8, 8, 32), torch.bfloat16, device="cuda")
    grad_y = torch.randn(2, 32, 256, 256, device="cuda").bfloat16()
    leaves = [t.double().requires_grad_() for t in inputs]
    y_ref = gspn_scan(*leaves, impl="reference")
    grads_ref = torch.autograd.grad(y_ref, leaves, grad_y.double())
    y, grads = fused_with_grads(inputs, None, grad_y, impl="cuda")
    assert_close_scaled(y, y_ref, 2e-2, "y")
    for name, g, g_ref in zip(("x",) + GATES, grads, grads_ref):
        assert_close_scaled(g, g_ref, 2e-2, f"d{name}")


@pytest.mark.cuda
def test_cuda_equals_cpu_kernel_and_compiles():
    inputs = make_inputs(2, 8, 16, 12, (8, 4, 1, 8, 4), torch.float32, requires_grad=True)
    y_cpu = gspn_scan(*inputs, chunk=5, impl="cpu")
    cuda_inputs = [t.detach().cuda().requires_grad_() for t in inputs]
    compiled = torch.compile(lambda *a: gspn_scan(*a, chunk=5), fullgraph=True)
    y_cuda = compiled(*cuda_inputs)
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
    grads_cpu = torch.autograd.grad(y_cpu.sum(), inputs)
    grads_cuda = torch.autograd.grad(y_cuda.sum(), cuda_inputs)
    for g_cpu, g_cuda in zip(grads_cpu, grads_cuda):
        torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_uses_the_current_stream():
    inputs = make_inputs(1, 4, 32, 32, None, torch.float32, device="cuda")
    expected = gspn_scan(*inputs, impl="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = gspn_scan(*inputs, impl="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
