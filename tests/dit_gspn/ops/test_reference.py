"""The PyTorch reference scan against an independent oracle: the dense affinity-matrix form.

For one (H, W) plane the scan is h = L (lam * x) with L block lower-triangular: block (i, k) is
A_i A_{i-1} ... A_{k+1} (identity when i == k, zero when a restart lies in (k, i]), where A_i is
row i's tridiagonal matrix with wl on the sub-, wc on the main and wr on the super-diagonal.
"""
import itertools
import math

import pytest
import torch

from dit_gspn.ops.reference import line_scan_reference, normalize_gates


def tridiagonal(wl_row, wc_row, wr_row):
    """(..., W) weights of one row -> (..., W, W) matrix A with (A h)[j] = wl h[j-1] + wc h[j] + wr h[j+1]."""
    return torch.diag_embed(wc_row) + torch.diag_embed(wl_row[..., 1:], -1) + torch.diag_embed(wr_row[..., :-1], 1)


def dense_affinity(wl, wc, wr, chunk=None):
    """(..., H, W) weights -> (..., H*W, H*W) lower block-triangular affinity matrix of the scan."""
    H, W = wl.shape[-2:]
    eye = torch.eye(W, dtype=wl.dtype).expand(*wl.shape[:-2], W, W)
    zero = torch.zeros_like(eye)
    blocks = [[zero] * H for _ in range(H)]
    for k in range(H):
        block = eye
        blocks[k][k] = block
        for i in range(k + 1, H):
            if chunk is not None and i % chunk == 0:
                break
            block = tridiagonal(wl[..., i, :], wc[..., i, :], wr[..., i, :]) @ block
            blocks[i][k] = block
    rows = [torch.cat(row, dim=-1) for row in blocks]
    return torch.cat(rows, dim=-2)


def dense_scan(x, lam, wl, wc, wr, chunk=None):
    H, W = x.shape[-2:]
    drive = (lam * x).reshape(*x.shape[:-2], H * W, 1)
    return (dense_affinity(wl, wc, wr, chunk) @ drive).reshape(x.shape)


def random_inputs(shape, dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype)
    lam = torch.rand(shape, dtype=dtype) * 2 - 1
    wl, wc, wr = normalize_gates(*(torch.randn(shape, dtype=dtype) for _ in range(3)))
    return x, lam, wl, wc, wr


SHAPES_AND_CHUNKS = [
    ((2, 3, 5, 4), None),
    ((1, 2, 6, 3), 2),
    ((2, 1, 7, 5), 3),
    ((3, 4, 1), None),  # W = 1
    ((2, 1, 6), None),  # H = 1
    ((4, 7), 4),  # a bare (H, W) map
]


@pytest.mark.parametrize("shape,chunk", SHAPES_AND_CHUNKS)
def test_reference_forward_matches_dense_affinity(shape, chunk):
    inputs = random_inputs(shape)
    torch.testing.assert_close(line_scan_reference(*inputs, chunk), dense_scan(*inputs, chunk), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,chunk", SHAPES_AND_CHUNKS)
def test_reference_backward_matches_dense_affinity(shape, chunk):
    inputs = random_inputs(shape)
    weight = torch.randn(shape, dtype=torch.float64)
    grads = []
    for scan in (line_scan_reference, dense_scan):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (scan(*leaves, chunk) * weight).sum().backward()
        grads.append([t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves])
    for name, got, expected in zip(("x", "lam", "wl", "wc", "wr"), *grads):
        torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-11, msg=lambda m: f"d{name}: {m}")


def test_reference_restarts_every_chunk_rows():
    x, lam, wl, wc, wr = random_inputs((2, 9, 4))
    h = line_scan_reference(x, lam, wl, wc, wr, chunk=3)
    for start in (0, 3, 6):
        rows = slice(start, start + 3)
        torch.testing.assert_close(h[:, rows], line_scan_reference(x[:, rows], lam[:, rows], wl[:, rows], wc[:, rows], wr[:, rows]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_computes_half_types_in_float32(dtype):
    inputs = [t.to(dtype) for t in random_inputs((2, 3, 12, 10))]
    h = line_scan_reference(*inputs)
    assert h.dtype == dtype
    expected = line_scan_reference(*(t.float() for t in inputs)).to(dtype)
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


def direct_normalized_gates(gl, gc, gr):
    """The Stability-Context Condition written out per column, in float64."""
    sig = lambda t: 1.0 / (1.0 + math.exp(-t))  # noqa: E731
    W = gl.shape[-1]
    out = [torch.empty_like(gl, dtype=torch.float64) for _ in range(3)]
    for idx in itertools.product(*(range(n) for n in gl.shape)):
        j = idx[-1]
        sl = sig(gl[idx].item()) if j > 0 else 0.0
        sc = sig(gc[idx].item())
        sr = sig(gr[idx].item()) if j < W - 1 else 0.0
        total = sl + sc + sr
        for o, s in zip(out, (sl, sc, sr)):
            o[idx] = s / total
    return out


@pytest.mark.parametrize("W", [1, 2, 3, 7])
def test_normalize_gates_matches_direct_formula(W):
    gates = [torch.randn(2, 3, W, dtype=torch.float64) * 3 for _ in range(3)]
    got = normalize_gates(*gates)
    for g, e in zip(got, direct_normalized_gates(*gates)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(got), torch.ones_like(got[0]))
    if W == 1:
        torch.testing.assert_close(got[1], torch.ones_like(got[1]))  # only the centre exists


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_normalize_gates_keeps_dtype_and_sums_to_one(dtype):
    gates = [torch.randn(4, 5, 9).to(dtype) for _ in range(3)]
    wl, wc, wr = normalize_gates(*gates)
    assert wl.dtype == wc.dtype == wr.dtype == dtype
    assert torch.all(wl[..., 0] == 0) and torch.all(wr[..., -1] == 0)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close((wl.double() + wc.double() + wr.double()), torch.ones(4, 5, 9, dtype=torch.float64), rtol=0, atol=tol)
