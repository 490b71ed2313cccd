"""``gspn_proxy_scan`` (lam and u generated from the proxy inside the CPU kernel) equals the composition
``gspn_scan_reference(x, (w_lam p).view(...), gl, gc, gr, (w_u p).view(...))`` written out here with einsum,
forward and every gradient, on random data: gradcheck in float64 on tiny shapes, float32 and bfloat16 within
their tolerances, chunked and global, H != W, shared and per-channel gates; the op traces under
torch.compile(fullgraph=True); without the kernel the composition runs."""
import pytest
import torch

from dit_gspn.ops import gspn_proxy_scan, gspn_scan_impl, proxy_maps
from dit_gspn.ops import dispatch, proxy_scan
from dit_gspn.ops.reference import gspn_scan_reference

from test_gspn_scan import assert_close_scaled


def make_inputs(B, C, H, W, K, G, dtype=torch.float32, weight_dtype=None, seed=0):
    """x, p, w_lam, w_u and gate logits (B, 4, G, H, W); p includes a row of ones as the mixer's does."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    p = torch.cat([torch.randn(B, K - 1, H, W, generator=gen, dtype=torch.float64),
                   torch.ones(B, 1, H, W, dtype=torch.float64)], dim=1)
    w_lam = torch.randn(4 * C, K, generator=gen, dtype=torch.float64) * 0.4
    w_u = torch.randn(4 * C, K, generator=gen, dtype=torch.float64) * 0.4
    logits = [torch.randn(B, 4, G, H, W, generator=gen, dtype=torch.float64) * 1.5 for _ in range(3)]
    weight_dtype = weight_dtype or dtype
    return [x.to(dtype), p.to(dtype), w_lam.to(weight_dtype), w_u.to(weight_dtype), *(g.to(dtype) for g in logits)]


def composition(x, p, w_lam, w_u, gl, gc, gr, chunk):
    """The oracle: lam and u as einsums over the proxy channel, then the reference scan (float64)."""
    B, C, H, W = x.shape
    lam = torch.einsum("ok,bkhw->bohw", w_lam, p).reshape(B, 4, C, H, W)
    u = torch.einsum("ok,bkhw->bohw", w_u, p).reshape(B, 4, C, H, W)
    return gspn_scan_reference(x, lam, gl, gc, gr, u, chunk=chunk)


def outputs_and_grads(fn, inputs, grad_y, dtype=None):
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in inputs]
    y = fn(*leaves)
    return y.detach(), torch.autograd.grad(y, leaves, grad_y.to(y.dtype))


CASES = [
    # (B, C, H, W, K, G, chunk)
    (2, 6, 5, 7, 4, 3, None),  # H != W, global, shared gates
    (1, 4, 7, 4, 3, 4, 2),  # per-channel gates, chunked
    (2, 8, 6, 6, 5, 1, 4),  # one gate group
    (1, 2, 1, 6, 2, 2, None),  # H = 1
    (1, 3, 6, 1, 2, 1, 3),  # W = 1
]


@pytest.mark.parametrize("case", CASES[:3])
def test_gradcheck_float64(case):
    B, C, H, W, K, G, chunk = case
    inputs = [t.requires_grad_() for t in make_inputs(B, C, H, W, K, G, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: gspn_proxy_scan(*a, chunk=chunk, impl="cpu"), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_cpu_kernel_equals_the_composition(case, dtype):
    B, C, H, W, K, G, chunk = case
    inputs = make_inputs(B, C, H, W, K, G, dtype)
    grad_y = torch.randn(B, C, H, W, dtype=torch.float64)
    y_ref, g_ref = outputs_and_grads(lambda *a: composition(*a, chunk), inputs, grad_y, torch.float64)
    y, grads = outputs_and_grads(lambda *a: gspn_proxy_scan(*a, chunk=chunk, impl="cpu"), inputs, grad_y)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert_close_scaled(y, y_ref, tol, "y")
    for name, g, gr_ in zip(("x", "p", "w_lam", "w_u", "gl", "gc", "gr"), grads, g_ref):
        assert g.dtype == dtype
        assert_close_scaled(g, gr_, tol * 4, f"d{name}")


def test_bfloat16_inputs_with_float32_weights_as_under_autocast():
    """The mixer's call under autocast: bfloat16 maps and proxy, float32 weights (their gradients float32)."""
    B, C, H, W, K, G, chunk = 2, 64, 9, 7, 5, 8, 3  # more channels than one of the kernel's chunks
    inputs = make_inputs(B, C, H, W, K, G, torch.bfloat16, weight_dtype=torch.float32)
    grad_y = torch.randn(B, C, H, W, dtype=torch.float64)
    y_ref, g_ref = outputs_and_grads(lambda *a: composition(*a, chunk), inputs, grad_y, torch.float64)
    y, grads = outputs_and_grads(lambda *a: gspn_proxy_scan(*a, chunk=chunk, impl="cpu"), inputs, grad_y)
    assert y.dtype == torch.bfloat16 and grads[2].dtype == grads[3].dtype == torch.float32
    assert_close_scaled(y, y_ref, 2e-2, "y")
    for name, g, gr_ in zip(("x", "p", "w_lam", "w_u", "gl", "gc", "gr"), grads, g_ref):
        assert_close_scaled(g, gr_, 3e-2, f"d{name}")


def test_many_channels_and_threads_split_the_backward_into_slots():
    """C larger than a chunk, B = 1 with two threads: the proxy gradient is summed over several tasks' slots."""
    inputs = make_inputs(1, 160, 4, 5, 3, 16, torch.float64)
    grad_y = torch.randn(1, 160, 4, 5, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, grads = outputs_and_grads(lambda *a: gspn_proxy_scan(*a, chunk=None, impl="cpu"), inputs, grad_y)
    finally:
        torch.set_num_threads(previous)
    y_ref, g_ref = outputs_and_grads(lambda *a: composition(*a, None), inputs, grad_y)
    assert_close_scaled(y, y_ref, 1e-12, "y")
    for g, gr_ in zip(grads, g_ref):
        assert_close_scaled(g, gr_, 1e-11, "grad")


def test_composed_impl_and_proxy_maps_equal_the_oracle():
    inputs = make_inputs(2, 4, 5, 6, 3, 2, torch.float64)
    lam, u = proxy_maps(inputs[1], inputs[2], inputs[3])
    assert lam.shape == u.shape == (2, 4, 4, 5, 6)
    expected = composition(*inputs, 2)
    for impl in ("composed", "reference"):
        torch.testing.assert_close(gspn_proxy_scan(*inputs, chunk=2, impl=impl), expected)
    with gspn_scan_impl("composed"):  # the forced implementation reaches this op too
        torch.testing.assert_close(gspn_proxy_scan(*inputs, chunk=2), expected)


def test_without_the_kernel_the_composition_runs(monkeypatch):
    inputs = make_inputs(1, 4, 3, 5, 3, 2, torch.float32)
    called = []
    monkeypatch.setattr(dispatch, "kernels_ready", lambda device_type, op: op != "gspn_proxy_scan_fwd")
    monkeypatch.setattr(proxy_scan, "gspn_scan", lambda *a, **k: called.append(k) or torch.zeros(()))
    gspn_proxy_scan(*inputs, chunk=2)
    assert called == [{"chunk": 2, "impl": "composed"}]


def test_on_cuda_the_composition_runs_gspn_scans_cuda_kernel(monkeypatch):
    # The dispatcher's answer for CUDA tensors (no GPU here: the device is faked): compose with gspn_scan's kernel.
    from types import SimpleNamespace

    monkeypatch.setattr(dispatch, "kernels_ready", lambda device_type, op: True)
    for dtype, expected in ((torch.bfloat16, "cuda"), (torch.float64, "composed")):
        x = SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(1, 4, 3, 5))
        assert dispatch.resolve_impl("gspn_proxy_scan", (x,), None) == expected


def test_opcheck():
    inputs = make_inputs(1, 4, 5, 3, 3, 2, torch.float32)
    gspn_proxy_scan(*inputs, impl="cpu")  # loads the library
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.gspn.gspn_proxy_scan_fwd.default, (*leaves, 2))
    torch.library.opcheck(torch.ops.gspn.gspn_proxy_scan_bwd.default, (torch.randn(1, 4, 5, 3), *inputs, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_traces_the_fused_op():
    inputs = [t.requires_grad_() for t in make_inputs(1, 4, 6, 5, 3, 2, torch.float32)]
    gspn_proxy_scan(*inputs, impl="cpu")  # build outside the traced region
    traced_ops = []

    def inductor_recording_ops(gm, example_inputs):
        traced_ops.extend(str(node.target) for node in gm.graph.nodes)
        return torch._inductor.compile(gm, example_inputs)

    compiled = torch.compile(lambda *a: gspn_proxy_scan(*a, chunk=3, impl="cpu"), fullgraph=True, backend=inductor_recording_ops)
    y = compiled(*inputs)
    assert "gspn.gspn_proxy_scan_fwd" in traced_ops, " ".join(traced_ops)
    grads = torch.autograd.grad(y.square().sum(), inputs)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = composition(*leaves, 3)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), leaves)
    assert_close_scaled(y, y_ref, 2e-5, "y")
    for g, g_ref in zip(grads, grads_ref):
        assert_close_scaled(g, g_ref, 1e-4, "grad")


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.__setitem__(1, a[1][:, :, :2]), ValueError, r"p must be \(B, K, H, W\) = \(1, K, 3, 5\)"),
        (lambda a: a.__setitem__(1, a[1].double()), TypeError, "p has dtype torch.float64 but x has torch.float32"),
        (lambda a: a.__setitem__(2, a[2][:-1]), ValueError, r"w_lam must be \(4 C, K\) = \(16, 3\)"),
        (lambda a: a.__setitem__(3, a[3][:, :2]), ValueError, r"w_u must be \(4 C, K\) = \(16, 3\)"),
        (lambda a: a.__setitem__(5, a[5][:, :3]), ValueError, r"gc must be \(B, 4, G, H, W\)"),
        (lambda a: a.__setitem__(6, a[6][:, :, :1].expand(-1, -1, 3, -1, -1)), ValueError, "G=3 must divide"),
    ],
)
def test_bad_inputs_raise_actionable_errors(mutate, error, match):
    inputs = make_inputs(1, 4, 3, 5, 3, 2, torch.float32)
    mutate(inputs)
    with pytest.raises(error, match=match):
        gspn_proxy_scan(*inputs)


@pytest.mark.parametrize("grad, H, W, fused", [(False, 32, 32, True), (True, 32, 32, False), (False, 33, 32, False)])
def test_impl_none_runs_the_fused_kernel_only_where_it_pays(monkeypatch, grad, H, W, fused):
    inputs = make_inputs(1, 4, H, W, 3, 2, torch.float32)
    if grad:
        inputs = [t.requires_grad_() for t in inputs]
    called = []
    real = proxy_scan.gspn_scan
    monkeypatch.setattr(proxy_scan, "gspn_scan", lambda *a, **k: called.append(k) or real(*a, **k))
    with torch.set_grad_enabled(grad):
        y = gspn_proxy_scan(*inputs, chunk=4)
    assert called == ([] if fused else [{"chunk": 4, "impl": None}])
    expected = composition(*[t.detach().double() for t in inputs], 4)
    assert_close_scaled(y.detach().double(), expected, 1e-5, "y")
