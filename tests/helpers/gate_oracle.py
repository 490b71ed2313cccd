"""normalize_gates written out in 60-digit arithmetic (mpmath, where exp(-1e4) does not underflow): its weights
and their gradients, and logits from ordinary to +-1e4, the oracle of the gate-normalisation tests."""
import mpmath
import numpy as np
import torch


mpmath.mp.dps = 60


def oracle_weights(gl, gc, gr):
    """Float64 (wl, wc, wr) of normalize_gates, computed as sigmoid / sum in 60 digits."""
    gl, gc, gr = (t.double().numpy() for t in (gl, gc, gr))
    W = gl.shape[-1]
    out = np.zeros((3, *gl.shape))
    for idx in np.ndindex(gl.shape):
        j = idx[-1]
        s = [mpmath.mpf(0) if j == 0 else 1 / (1 + mpmath.exp(-mpmath.mpf(gl[idx]))),
             1 / (1 + mpmath.exp(-mpmath.mpf(gc[idx]))),
             mpmath.mpf(0) if j == W - 1 else 1 / (1 + mpmath.exp(-mpmath.mpf(gr[idx])))]
        total = sum(s)
        for k in range(3):
            out[(k, *idx)] = float(s[k] / total)
    return [torch.from_numpy(w) for w in out]


def oracle_logit_grads(gl, gc, gr, d_w):
    """Float64 gradients of sum_k <d_w[k], w_k> w.r.t. the logits: the quotient rule on sigmoid / sum, in 60 digits."""
    gl, gc, gr = (t.double().numpy() for t in (gl, gc, gr))
    d_w = [t.double().numpy() for t in d_w]
    W = gl.shape[-1]
    out = np.zeros((3, *gl.shape))
    for idx in np.ndindex(gl.shape):
        j = idx[-1]
        mask = [j > 0, True, j < W - 1]
        sig = [1 / (1 + mpmath.exp(-mpmath.mpf(g[idx]))) for g in (gl, gc, gr)]
        s = [sig[k] if mask[k] else mpmath.mpf(0) for k in range(3)]
        total = sum(s)
        dot = sum(s[k] * mpmath.mpf(d_w[k][idx]) for k in range(3)) / total
        for k in range(3):
            if mask[k]:
                out[(k, *idx)] = float(sig[k] * (1 - sig[k]) * (mpmath.mpf(d_w[k][idx]) - dot) / total)
    return [torch.from_numpy(g) for g in out]


def extreme_logits(shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((3, *shape), generator=g, dtype=torch.float64)
    if kind == "ordinary":
        return list(noise * 3)
    if kind == "all-below-float32-underflow":  # -88 .. -120: every float32 sigmoid is 0 or subnormal
        return list(-104 + noise * 8)
    if kind == "all-near-minus-1e4":
        return list(-1e4 + noise * 5)
    if kind == "all-near-plus-1e4":
        return list(1e4 + noise * 5)
    if kind == "mixed-plus-minus-1e4":
        sign = torch.randint(0, 2, (3, *shape), generator=g).double() * 2 - 1
        return list(sign * 1e4 + noise * 5)
    raise ValueError(kind)


KINDS = ["ordinary", "all-below-float32-underflow", "all-near-minus-1e4", "all-near-plus-1e4", "mixed-plus-minus-1e4"]


def close(actual, expected, tol, what):
    err = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"
