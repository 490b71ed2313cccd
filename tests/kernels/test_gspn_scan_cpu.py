"""The fused four-direction scan ``gspn_scan`` through the compiled C++ kernel equals the composition of
``normalize_gates`` and ``line_scan`` (``gspn_scan_reference``), forward and backward, for any layout of its
inputs; the op passes opcheck, traces under torch.compile, and checks shapes itself. The CUDA kernel's tests are in
test_gspn_scan_cuda.py."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dit_gspn.ops import gspn_scan
from dit_gspn.ops.gspn_scan import gspn_scan_impl
from dit_gspn.ops.reference import gspn_scan_reference

from helpers.gspn_scan_inputs import (GATES, SHAPES, TOLERANCE, assert_close_scaled, fused_with_grads, make_inputs,
                                      reference_with_grads)


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


class _OpsRun(TorchDispatchMode):
    """Records the name (``namespace.op``) of every operator that runs inside it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def scan_ops_run(*inputs, **kwargs) -> set:
    """The ``gspn.*`` kernels that run for gspn_scan's forward and backward on ``inputs``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with _OpsRun() as ops:
        torch.autograd.grad(gspn_scan(*leaves, **kwargs).sum(), leaves)
    return {name for name in ops.names if name.startswith("gspn.")}


FUSED = {"gspn.gspn_scan_fwd", "gspn.gspn_scan_bwd"}
COMPOSED = {"gspn.line_scan_fwd", "gspn.line_scan_bwd"}  # normalize_gates and four line scans


def test_impl_none_on_cpu_uses_the_fused_kernel():
    inputs = make_inputs(1, 2, 3, 4, None, torch.float32)
    assert scan_ops_run(*inputs) == FUSED


def test_forced_impl_context_manager_and_env():
    inputs = make_inputs(1, 2, 3, 4, None, torch.float32)
    with gspn_scan_impl("composed"):
        forced = scan_ops_run(*inputs)
        explicit = scan_ops_run(*inputs, impl="cpu")  # an explicit impl wins
    assert forced == COMPOSED and explicit == FUSED
    assert scan_ops_run(*inputs) == FUSED  # restored on exit
    with pytest.raises(ValueError, match="impl must be one of"):
        with gspn_scan_impl("fast"):
            pass


def test_chunk_accepts_any_integral():
    import numpy as np

    inputs = make_inputs(1, 2, 5, 4)
    torch.testing.assert_close(gspn_scan(*inputs, chunk=np.int64(2), impl="cpu"), gspn_scan(*inputs, chunk=2, impl="cpu"))


def test_the_op_itself_checks_shapes():
    # Direct torch.ops calls bypass the Python checks; the C++ ones still name the problem.
    x, lam, gl, gc, gr, u = make_inputs(1, 4, 3, 5)
    gspn_scan(x, lam, gl, gc, gr, u, impl="cpu")
    with pytest.raises(RuntimeError, match="group count G=3 must divide C=4"):
        torch.ops.gspn.gspn_scan_fwd(x, lam, gl, gc, gr, torch.randn(1, 4, 3, 3, 5), 0)
