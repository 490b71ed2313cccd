"""Pure PyTorch reference of the GSPN scan contract: the oracle every compiled kernel is tested against.

These functions are the documentation of what the kernels compute. They loop over rows and
vectorise over everything else, compute in float32 for half-precision inputs, and are
differentiable through ordinary autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: The four scan directions of a GSPN layer, in the order of dim 1 of the per-direction tensors.
DIRECTIONS = ("top_down", "bottom_up", "left_right", "right_left")
NUM_DIRECTIONS = len(DIRECTIONS)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def line_scan_reference(x, lam, wl, wc, wr, chunk: int | None = None):
    """h[i, j] = wl h[i-1, j-1] + wc h[i-1, j] + wr h[i-1, j+1] + lam x, scanning along dim -2.

    Out-of-range neighbours are zero; row 0 (and, with ``chunk=k``, every row i with i % k == 0)
    is ``lam * x``. All five tensors have the same shape (..., H, W); the result has it too,
    in the inputs' dtype.
    """
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    # Split every input into rows once: indexing row i of a full tensor inside the loop would make
    # autograd allocate a full-size gradient per row (quadratic backward in H).
    x, lam, wl, wc, wr = (t.to(cd).unbind(-2) for t in (x, lam, wl, wc, wr))
    rows = []
    h = None
    for i in range(len(x)):
        drive = lam[i] * x[i]
        if h is None or (chunk is not None and i % chunk == 0):
            h = drive
        else:
            left = F.pad(h[..., :-1], (1, 0))  # h[i-1, j-1]
            right = F.pad(h[..., 1:], (0, 1))  # h[i-1, j+1]
            h = wl[i] * left + wc[i] * h + wr[i] * right + drive
        rows.append(h)
    return torch.stack(rows, dim=-2).to(dtype)


def normalize_gates(gl, gc, gr):
    """Sigmoid gates normalised so that wl + wc + wr = 1 at every position (Stability-Context Condition).

    wl is 0 at j = 0 and wr is 0 at j = W-1 (those neighbours do not exist), so the edges are
    normalised over two gates (over one when W = 1). Returns (wl, wc, wr) in the inputs' dtype.

    Stable for any finite logits: with m the largest logit of the neighbours that exist and
    c = min(m, 0), s_k = mask_k / (exp(c) + exp(c - g_k)) = mask_k exp(logsigmoid(g_k) - c) and
    w_k = s_k / sum_m s_m. The factor exp(-c) cancels, so this is sigmoid / sum for ordinary logits,
    and the limit of it (a softmax) where every sigmoid underflows; the largest s_k is at least 1/2,
    so the sum is never 0/0. The kernels compute the same (csrc/gspn_scan_common.h).
    """
    dtype = gl.dtype
    cd = _compute_dtype(dtype)
    gl, gc, gr = (g.to(cd) for g in (gl, gc, gr))
    W = gl.shape[-1]
    j = torch.arange(W, device=gl.device)
    has_left, has_right = j > 0, j < W - 1
    neg_inf = torch.tensor(float("-inf"), dtype=cd, device=gl.device)
    m = torch.maximum(gc, torch.maximum(torch.where(has_left, gl, neg_inf), torch.where(has_right, gr, neg_inf)))
    c = m.clamp(max=0).detach()  # w does not depend on c: no gradient flows through it
    # exp of a masked -inf argument: an absent neighbour is exactly 0 with a zero (not NaN) gradient.
    sl = torch.exp(torch.where(has_left, F.logsigmoid(gl) - c, neg_inf))
    sc = torch.exp(F.logsigmoid(gc) - c)
    sr = torch.exp(torch.where(has_right, F.logsigmoid(gr) - c, neg_inf))
    total = sl + sc + sr
    return (sl / total).to(dtype), (sc / total).to(dtype), (sr / total).to(dtype)


def to_scan_frame(t, direction: int):
    """View a (..., H, W) map so that direction ``direction``'s scan runs along dim -2 (top to bottom)."""
    if direction == 0:
        return t
    if direction == 1:
        return t.flip(-2)
    if direction == 2:
        return t.transpose(-1, -2)
    if direction == 3:
        return t.transpose(-1, -2).flip(-2)
    raise ValueError(f"direction must be 0..3 ({DIRECTIONS}), got {direction}")


def from_scan_frame(t, direction: int):
    """Inverse of :func:`to_scan_frame`: map a scan-frame result back to the original (H, W) layout."""
    if direction == 0:
        return t
    if direction == 1:
        return t.flip(-2)
    if direction == 2:
        return t.transpose(-1, -2)
    if direction == 3:
        return t.flip(-2).transpose(-1, -2)
    raise ValueError(f"direction must be 0..3 ({DIRECTIONS}), got {direction}")


def expand_groups(t, channels: int):
    """(B, G, H, W) gates shared by channel groups -> (B, C, H, W): channel c uses group c // (C // G)."""
    return t.repeat_interleave(channels // t.shape[1], dim=1)


def gspn_scan_reference(x, lam, gl, gc, gr, u, chunk: int | None = None, line_scan=line_scan_reference):
    """Four-direction GSPN propagation, gated and summed: the contract of the fused kernel.

    x: (B, C, H, W). lam, gl, gc, gr, u: (B, 4, G, H, W) each, with its own G dividing C (channel c
    uses group c // (C // G)); dim 1 follows :data:`DIRECTIONS`. All of them live in the original
    pixel frame. For each direction d the gates are normalised with :func:`normalize_gates`
    along the direction's neighbour axis, x is scanned with :func:`line_scan_reference` in that
    direction (``chunk`` counts steps along the scan), the result is mapped back to the original
    frame, and ``y = sum_d u[:, d] * h_d``. Returns y: (B, C, H, W) in x's dtype.
    """
    C = x.shape[1]
    y = None
    for d in range(4):
        def frame(t):
            return to_scan_frame(expand_groups(t[:, d], C), d)

        wl, wc, wr = normalize_gates(frame(gl), frame(gc), frame(gr))
        h = from_scan_frame(line_scan(to_scan_frame(x, d), frame(lam), wl, wc, wr, chunk), d)
        term = expand_groups(u[:, d], C) * h
        y = term if y is None else y + term
    return y
