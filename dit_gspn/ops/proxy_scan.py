"""``gspn_proxy_scan``: the fused four-direction GSPN propagation with lam and u generated from the proxy.

``gspn_proxy_scan(x, p, w_lam, w_u, gl, gc, gr, chunk=None, impl=None)`` equals
``gspn_scan(x, lam, gl, gc, gr, u, chunk)`` with, per pixel, ``lam = w_lam @ p`` and ``u = w_u @ p``
viewed as (B, 4, C, H, W) (:func:`proxy_maps`). The mixer's lam and u are 4C-channel maps each, made from
a proxy of C/16 channels: on the CPU the kernel (``gspn::gspn_proxy_scan_fwd`` / ``_bwd`` in
``csrc/cpu/gspn_scan_cpu.cpp``) generates them per plane and direction inside the scan and never writes
them, and its backward reduces their gradients straight into p's and the weights' (recomputing lam and u
on the fly), where the composition writes and reads two (B, 4C, H, W) maps and their gradients.

Implementations (``impl``, as for :func:`dit_gspn.ops.gspn_scan`):

- ``"cpu"``: the fused kernel (CPU tensors);
- ``"reference"``, ``"composed"``, ``"cuda"``: the composition, :func:`proxy_maps` and then ``gspn_scan``
  with that ``impl``;
- ``None``: :func:`dit_gspn.ops.dispatch.resolve_impl` decides, as for every op: for CPU tensors the fused
  kernel when it is built, nothing else is forced and :func:`fused_kernel_pays` (a forward without autograd on a
  map of at most :data:`FUSED_MAX_PIXELS` pixels), else the composition with ``gspn_scan``'s CPU kernel; on
  CUDA the composition with ``gspn_scan``'s CUDA kernel (so CUDA keeps today's path); else the composition with
  the unfused ops.
"""
from __future__ import annotations

import torch

from . import dispatch
from .gspn_scan import check_inputs as check_scan_inputs, describe, gspn_scan


def proxy_maps(p: torch.Tensor, w_lam: torch.Tensor, w_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lam and u of :func:`gspn_proxy_scan`: (B, K, H, W) proxy, (4 C, K) weights -> two (B, 4, C, H, W) maps.

    One batched GEMM each against the weight broadcast over the batch (no copy of it), in p's dtype.
    """
    B, K, H, W = p.shape
    flat = p.reshape(B, K, H * W)
    lam = torch.bmm(w_lam.to(p.dtype).expand(B, -1, -1), flat)
    u = torch.bmm(w_u.to(p.dtype).expand(B, -1, -1), flat)
    return lam.view(B, 4, -1, H, W), u.view(B, 4, -1, H, W)


def gspn_proxy_scan(x, p, w_lam, w_u, gl, gc, gr, chunk: int | None = None, impl: str | None = None):
    """Four-direction GSPN propagation with lam = w_lam p and u = w_u p: (B, C, H, W) -> (B, C, H, W).

    x: (B, C, H, W); p: (B, K, H, W) in x's dtype (a row of ones in it makes the maps affine); w_lam, w_u:
    (4 C, K), rows ordered (direction, channel), any floating dtype (the kernel computes in float32, or
    float64 for float64 inputs, and returns their gradients in their own dtype); gl, gc, gr: raw gate logits
    (B, 4, G, H, W) as for :func:`dit_gspn.ops.gspn_scan`. Gradients flow to all seven tensors.
    """
    _check_inputs(x, p, w_lam, w_u, (gl, gc, gr), chunk)
    tensors = (x, p, w_lam, w_u, gl, gc, gr)
    asked = impl
    impl = dispatch.resolve_impl("gspn_proxy_scan", tensors, impl)
    if impl == "cpu" and asked is None and not fused_kernel_pays(x, tensors):
        impl = None  # the composition with gspn_scan's own choice: its CPU kernel
    if impl == "cpu":
        return torch.ops.gspn.gspn_proxy_scan_fwd(x, p, w_lam, w_u, gl, gc, gr, 0 if chunk is None else int(chunk))
    lam, u = proxy_maps(p, w_lam, w_u)
    return gspn_scan(x, lam, gl, gc, gr, u, chunk=chunk, impl=impl)


#: The largest map (H x W pixels) on which ``impl=None`` runs the fused CPU kernel.
FUSED_MAX_PIXELS = 32 * 32


def fused_kernel_pays(x, tensors) -> bool:
    """Whether ``impl=None`` runs the fused CPU kernel rather than the composition with ``gspn_scan``'s: only
    where it measured faster (README, Performance): a forward without autograd on at most
    :data:`FUSED_MAX_PIXELS` pixels. Its backward, and its forward on larger maps, are slower than the
    composition's on this CPU."""
    records_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not records_grad and x.shape[-2] * x.shape[-1] <= FUSED_MAX_PIXELS


def _check_inputs(x, p, w_lam, w_u, gates, chunk) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"gspn_proxy_scan: x must be a (B, C, H, W) tensor, got {describe(x)}")
    B, C, H, W = x.shape
    for name, t in zip(("gl", "gc", "gr"), gates):
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.shape[:2] != (B, 4) or t.shape[3:] != (H, W):
            raise ValueError(f"gspn_proxy_scan: {name} must be (B, 4, G, H, W) = ({B}, 4, G, {H}, {W}) to match x "
                             f"{tuple(x.shape)}, got {describe(t)}")
    # Groups, dtypes, devices and chunk exactly as gspn_scan checks them (lam and u stand in for themselves: gl, gr).
    check_scan_inputs(x, (gates[0], *gates, gates[2]), chunk)
    if not isinstance(p, torch.Tensor) or p.dim() != 4 or p.shape[0] != B or p.shape[2:] != (H, W):
        raise ValueError(f"gspn_proxy_scan: p must be (B, K, H, W) = ({B}, K, {H}, {W}) to match x "
                         f"{tuple(x.shape)}, got {describe(p)}")
    if p.dtype != x.dtype:
        raise TypeError(f"gspn_proxy_scan: p has dtype {p.dtype} but x has {x.dtype}; cast them to one dtype")
    for name, w in (("w_lam", w_lam), ("w_u", w_u)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or tuple(w.shape) != (4 * C, p.shape[1]):
            raise ValueError(f"gspn_proxy_scan: {name} must be (4 C, K) = ({4 * C}, {p.shape[1]}) for x "
                             f"{tuple(x.shape)} and p {tuple(p.shape)}, got {describe(w)}")
        if not w.dtype.is_floating_point:
            raise TypeError(f"gspn_proxy_scan: {name} must be floating point, got {w.dtype}")
    for name, t in (("p", p), ("w_lam", w_lam), ("w_u", w_u)):
        if t.device != x.device:
            raise ValueError(f"gspn_proxy_scan: {name} is on {t.device} but x is on {x.device}")


# ----------------------------------------------------------------------------------------------
# Python side of the custom ops, registered once the compiled library is loaded.


def _fake_forward(x, p, w_lam, w_u, gl, gc, gr, chunk):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad_y, x, p, w_lam, w_u, gl, gc, gr, chunk):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, p, w_lam, w_u, gl, gc, gr))


def _setup_context(ctx, inputs, output):
    # The inputs only: the backward recomputes lam, u and the hidden states.
    *tensors, chunk = inputs
    ctx.save_for_backward(*tensors)
    ctx.chunk = chunk


def _backward(ctx, grad_y):
    grads = torch.ops.gspn.gspn_proxy_scan_bwd(grad_y, *ctx.saved_tensors, ctx.chunk)
    return (*grads, None)


dispatch.register_op("gspn_proxy_scan", _fake_forward, _fake_backward, _backward, _setup_context)
