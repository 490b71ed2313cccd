"""GSPNMixer against a dense float64 oracle, and the reach property of its four scans.

The oracle rebuilds the whole mixer from its parameters with plain einsums and, for each
direction, writes the propagation as an explicit (N x N) affinity matrix A built pixel by pixel
in the ORIGINAL frame (each pixel's three predecessors along that direction, weighted by its own
normalised gates), so h = (I - A)^-1 (lam * x). Nothing in it uses flips, transposes, the scan
op or its normalisation helper.
"""
import pytest
import torch
import torch.nn.functional as F

from dit_gspn.models import GSPNMixer

# Direction d: the step from a pixel's predecessor to the pixel, and the lane axis (neighbours).
STEPS = [(1, 0), (-1, 0), (0, 1), (0, -1)]  # top-down, bottom-up, left-right, right-left
LANES = [(0, 1), (0, 1), (1, 0), (1, 0)]


def step_index(d, i, j, h, w):
    """How many steps direction d's scan has taken when it reaches pixel (i, j)."""
    return [i, h - 1 - i, j, w - 1 - j][d]


def affinity_matrix(gl, gc, gr, d, chunk):
    """Dense (B, N, N) one-step affinity of direction d from raw logits (B, h, w), row-major pixels."""
    B, h, w = gl.shape
    A = torch.zeros(B, h * w, h * w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            s = step_index(d, i, j, h, w)
            if s == 0 or (chunk is not None and s % chunk == 0):
                continue  # the scan (re)starts here: no predecessor
            pi, pj = i - STEPS[d][0], j - STEPS[d][1]
            li, lj = LANES[d]
            neighbours = [(pi - li, pj - lj), (pi, pj), (pi + li, pj + lj)]
            sig = []
            for (qi, qj), logit in zip(neighbours, (gl, gc, gr)):
                inside = 0 <= qi < h and 0 <= qj < w
                sig.append(torch.sigmoid(logit[:, i, j]) if inside else torch.zeros(B, dtype=torch.float64))
            total = sig[0] + sig[1] + sig[2]
            for (qi, qj), s_k in zip(neighbours, sig):
                if 0 <= qi < h and 0 <= qj < w:
                    A[:, i * w + j, qi * w + qj] = s_k / total
    return A


def dense_oracle(mixer: GSPNMixer, tokens, grid):
    """The mixer's output computed in float64 from its parameters and explicit affinity matrices."""
    P = {k: v.detach().double() for k, v in mixer.named_parameters()}
    B, N, C = tokens.shape
    h, w = grid
    G, chunk = mixer.gate_groups, mixer.chunk
    t = tokens.double()
    xz = t @ P["in_proj.weight"].T + P["in_proj.bias"]
    x = xz[..., :C].transpose(1, 2).reshape(B, C, h, w)
    if mixer.dwconv is not None:
        x = F.conv2d(x, P["dwconv.weight"], P["dwconv.bias"], padding=1, groups=C)
    x = F.silu(x).permute(0, 2, 3, 1)  # (B, h, w, C)
    p = x @ P["proxy.weight"].T + P["proxy.bias"]
    gates = (p @ P["gate_proj.weight"].T + P["gate_proj.bias"]).view(B, h, w, 3, 4, G)
    # lam, u and the merge: per channel, or shared by the gate groups (group_lam_u).
    S = P["merge"].shape[1]
    lam = (p @ P["lam_proj.weight"].T + P["lam_proj.bias"]).view(B, h, w, 4, S)
    u = (p @ P["u_proj.weight"].T + P["u_proj.bias"]).view(B, h, w, 4, S) * P["merge"]
    y = torch.zeros(B, h * w, C, dtype=torch.float64)
    eye = torch.eye(h * w, dtype=torch.float64)
    for d in range(4):
        for g in range(G):
            A = affinity_matrix(gates[..., 0, d, g], gates[..., 1, d, g], gates[..., 2, d, g], d, chunk)
            for c in range(g * (C // G), (g + 1) * (C // G)):
                s = c // (C // S)
                drive = (lam[..., d, s] * x[..., c]).reshape(B, h * w, 1)
                hd = torch.linalg.solve(eye - A, drive)[..., 0]
                y[..., c] += u[..., d, s].reshape(B, -1) * hd
    x = x.reshape(B, h * w, C)
    if mixer.skip_proj is not None:
        y = y + (p @ P["skip_proj.weight"].T + P["skip_proj.bias"]).reshape(B, h * w, C) * x
    out = F.layer_norm(y, (C,), P["out_norm.weight"], P["out_norm.bias"], eps=mixer.out_norm.eps)
    if mixer.output_gate:
        out = out * F.silu(xz[..., C:])
    return out @ P["out_proj.weight"].T + P["out_proj.bias"], y


def randomised_mixer(**kwargs) -> GSPNMixer:
    mixer = GSPNMixer(**kwargs)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mixer


@pytest.mark.parametrize(
    "grid, kwargs",
    [
        ((5, 6), dict(dim=8, chunk=None, gate_groups=None, group_lam_u=False, proxy_ratio=16)),
        ((6, 5), dict(dim=8, chunk=2, gate_groups=2, group_lam_u=False, proxy_ratio=16, dwconv=False, skip=False,
                       output_gate=False)),
        ((4, 7), dict(dim=6, chunk=3, gate_groups=3, group_lam_u=False, proxy_ratio=2)),
        ((1, 7), dict(dim=4, chunk=None, gate_groups=1, group_lam_u=False, proxy_ratio=16)),
        ((5, 4), dict(dim=8, chunk=None, gate_groups=2, group_lam_u=True, proxy_ratio=16)),
        ((4, 6), dict(dim=6, chunk=2, gate_groups=3, group_lam_u=True, proxy_ratio=2, skip=False)),
        ((3, 5), dict(dim=4, chunk=None, gate_groups=4, group_lam_u=True, proxy_ratio=16, dwconv=False,
                       output_gate=False)),
    ],
)
def test_mixer_matches_dense_affinity_oracle(grid, kwargs):
    mixer = randomised_mixer(**kwargs)
    tokens = torch.randn(2, grid[0] * grid[1], kwargs["dim"])
    expected_out, expected_prop = dense_oracle(mixer, tokens, grid)

    propagated = mixer.propagate(mixer.scan_operands(tokens, grid))
    got_prop = propagated.double()
    torch.testing.assert_close(got_prop, expected_prop, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixer(tokens, grid).double(), expected_out, rtol=1e-4, atol=1e-4)


def cone(d, p, q, shape, chunk):
    """Whether direction d's scan carries pixel q into pixel p (p's own pixel included)."""
    (i, j), (k, l), (h, w) = p, q, shape
    along, across = [(i - k, abs(l - j)), (k - i, abs(l - j)), (j - l, abs(k - i)), (l - j, abs(k - i))][d]
    same_chunk = chunk is None or step_index(d, i, j, h, w) // chunk == step_index(d, k, l, h, w) // chunk
    return along >= 0 and across <= along and same_chunk


@pytest.mark.parametrize("chunk, dwconv", [(None, False), (3, False), (None, True)])
def test_output_depends_exactly_on_the_pixels_the_four_scans_reach(chunk, dwconv):
    """d out[p] / d in[q] is nonzero exactly on the union of the four directions' cones at p.

    Were a direction's output not mapped back to the original frame before the merge (the bug of
    the authors' code), pixel p would receive another pixel's cone and this test would fail.
    With the 3x3 depthwise convolution the set is that union dilated by one pixel.
    """
    h, w, C = 7, 9, 8
    mixer = randomised_mixer(dim=C, chunk=chunk, dwconv=dwconv, gate_groups=None, group_lam_u=False)
    tokens = torch.randn(1, h * w, C, requires_grad=True)
    for p in [(3, 4), (0, 8), (6, 1)]:
        out = mixer(tokens, (h, w))
        (out[0, p[0] * w + p[1]] * torch.randn(C)).sum().backward()
        reached = tokens.grad[0].abs().sum(-1).reshape(h, w) > 0
        tokens.grad = None
        union = torch.tensor([[any(cone(d, p, (k, l), (h, w), chunk) for d in range(4))
                               for l in range(w)] for k in range(h)])
        if dwconv:
            union = F.max_pool2d(union[None].float(), 3, stride=1, padding=1)[0] > 0
        assert torch.equal(reached, union), f"pixel {p}: reached\n{reached.int()}\nexpected\n{union.int()}"


def test_mixer_refuses_a_grid_that_does_not_match_the_tokens():
    mixer = GSPNMixer(dim=8)
    with pytest.raises(ValueError, match=r"grid \(h, w\) = \(3, 5\) holds 15 tokens but the input has N = 16"):
        mixer(torch.randn(2, 16, 8), (3, 5))


def test_mixer_refuses_gate_groups_that_do_not_divide_the_channels():
    with pytest.raises(ValueError, match="gate_groups must divide the hidden size 12, got 5"):
        GSPNMixer(dim=12, gate_groups=5)


def test_shared_gates_shrink_the_gate_projection():
    per_channel = GSPNMixer(dim=32, gate_groups=None, group_lam_u=False)
    shared = GSPNMixer(dim=32, gate_groups=4, group_lam_u=False)
    assert per_channel.gate_proj.out_features == 3 * 4 * 32
    assert shared.gate_proj.out_features == 3 * 4 * 4
    o = shared.scan_operands(torch.randn(1, 12, 32), (3, 4))
    assert o.gl.shape == (1, 4, 4, 3, 4) and o.lam.shape == o.u.shape == (1, 4, 32, 3, 4)


def test_grouped_lam_u_are_maps_of_the_gate_groups():
    mixer = GSPNMixer(dim=32, gate_groups=4, group_lam_u=True)
    assert mixer.lam_proj.out_features == mixer.u_proj.out_features == 4 * 4 and mixer.merge.shape == (4, 4)
    o = mixer.scan_operands(torch.randn(2, 12, 32), (3, 4))
    assert all(t.shape == (2, 4, 4, 3, 4) for t in (o.gl, o.gc, o.gr, o.lam, o.u))


def test_the_constructors_defaults_are_the_zoos_mixer():
    """GSPNMixer(dim) builds what a GSPN model's block builds (for_block only adds where the block scans locally):
    8 channel groups sharing gates, lam and u, and a C / 4 proxy."""
    from dit_gspn.models import DiT

    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4, num_classes=10)
    local, last = model.blocks[0].gspn, model.blocks[-1].gspn
    assert (local.chunk, last.chunk) == (8, None)  # the last quarter of the blocks scans globally
    alone = GSPNMixer(32)
    assert repr(alone) == repr(last) and repr(GSPNMixer(32, chunk=8)) == repr(local)
    assert (alone.gate_groups, alone.group_lam_u, alone.proxy_dim) == (8, True, 32 // 4)
    assert {k: v.shape for k, v in alone.state_dict().items()} == {k: v.shape for k, v in last.state_dict().items()}
