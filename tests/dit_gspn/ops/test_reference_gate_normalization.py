"""Gate normalisation (dit_gspn.ops.reference.normalize_gates) is stable for any finite logits, from -1e4 to +1e4:
it equals an oracle that computes sigmoid / sum naively in 60-digit arithmetic (helpers.gate_oracle), forward and
backward. The naive float formula gives 0/0 = NaN once every sigmoid of a position underflows (logits below about
-88 in float32)."""
import pytest
import torch

from dit_gspn.ops import normalize_gates

from helpers.gate_oracle import KINDS, close, extreme_logits, oracle_logit_grads, oracle_weights


SHAPE = (2, 3, 5)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_normalize_gates_forward_and_backward(kind, dtype):
    logits = [t.to(dtype).requires_grad_() for t in extreme_logits(SHAPE, kind, 0)]
    weights = normalize_gates(*logits)
    d_w = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(3)]
    grads = torch.autograd.grad(weights, logits, [d.to(dtype) for d in d_w])
    rounded = [t.detach().double() for t in logits]  # the oracle sees the logits the op saw
    for name, w, w_ref in zip(("wl", "wc", "wr"), weights, oracle_weights(*rounded)):
        close(w, w_ref, TOL[dtype], name)
    for name, g, g_ref in zip(("dgl", "dgc", "dgr"), grads, oracle_logit_grads(*rounded, d_w)):
        close(g, g_ref, TOL[dtype], name)


def test_the_naive_formula_is_nan_where_the_stable_one_is_not():
    # The defect being fixed: sigmoid / sum at logits near -1e4.
    gl, gc, gr = (t.float() for t in extreme_logits(SHAPE, "all-near-minus-1e4", 1))
    naive = gc.sigmoid() / (gl.sigmoid() + gc.sigmoid() + gr.sigmoid())
    assert naive.isnan().all()
    assert all(torch.isfinite(w).all() for w in normalize_gates(gl, gc, gr))
