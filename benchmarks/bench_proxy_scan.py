"""Does the fused ``gspn_proxy_scan`` CPU kernel pay in a GSPN mixer layer with per-channel lam and u?

One process, side by side, alternating: a :class:`GSPNMixer` with per-channel lam / u and the authors'
C / 16 proxy, at the GSPN authors' widths (S: C = 368, XL: C = 1500) on a 16 x 16 token grid (ImageNet
256 latents, patch 2), fp32, its ``propagate`` running either

- ``fused``: ``gspn_proxy_scan(..., impl="cpu")`` (lam and u generated inside the CPU kernel), or
- ``composed``: ``proxy_maps`` (two GEMMs) and then ``gspn_scan(..., impl="cpu")``;

timed for training (the whole layer's forward + backward) and sampling (forward under no_grad).

    python -m benchmarks.bench_proxy_scan --widths 368 1500 --batch 2 --repeat 9 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dit_gspn.models.gspn_mixer import GSPNMixer
from dit_gspn.ops import gspn_proxy_scan, gspn_scan, proxy_maps


def propagate_with(kind):
    def run(o, chunk):
        if kind == "fused":
            return gspn_proxy_scan(o.x, o.p, o.w_lam, o.w_u, o.gl, o.gc, o.gr, chunk=chunk, impl="cpu")
        lam, u = proxy_maps(o.p, o.w_lam, o.w_u)
        return gspn_scan(o.x, lam, o.gl, o.gc, o.gr, u, chunk=chunk, impl="cpu")
    return run


def layer(mixer, tokens, grid, kind):
    o = mixer.scan_operands(tokens, grid)
    y = propagate_with(kind)(o, mixer.chunk).permute(0, 2, 3, 1).flatten(1, 2)
    y = torch.addcmul(y, o.skip, o.x_tokens)
    return mixer.output(y, o.z)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=int, nargs="+", default=[368, 1500])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--gate-groups", type=int, default=None, help="None: per-channel gates")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    grid = (args.grid, args.grid)
    results = []
    for C in args.widths:
        mixer = GSPNMixer(C, proxy_ratio=16, gate_groups=args.gate_groups, group_lam_u=False)
        tokens = torch.randn(args.batch, args.grid * args.grid, C, requires_grad=True)
        with torch.no_grad():  # the two give one output
            a, b = layer(mixer, tokens, grid, "fused"), layer(mixer, tokens, grid, "composed")
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()

        def train(kind):
            mixer.zero_grad(set_to_none=True)
            layer(mixer, tokens, grid, kind).square().mean().backward()

        def sample(kind):
            with torch.no_grad():
                layer(mixer, tokens, grid, kind)

        for phase, fn in (("training", train), ("sampling", sample)):
            times = {"fused": [], "composed": []}
            for kind in times:
                fn(kind)  # warm-up
            for _ in range(args.repeat):
                for kind in times:  # alternate so drift on the shared machine hits both alike
                    t0 = time.perf_counter()
                    fn(kind)
                    times[kind].append((time.perf_counter() - t0) * 1e3)
            fused, composed = statistics.median(times["fused"]), statistics.median(times["composed"])
            row = {"C": C, "batch": args.batch, "grid": args.grid, "gate_groups": args.gate_groups, "phase": phase,
                   "threads": torch.get_num_threads(), "fused_ms": round(fused, 2), "composed_ms": round(composed, 2),
                   "composed_over_fused": round(composed / fused, 3),
                   "min_composed_over_min_fused": round(min(times["composed"]) / min(times["fused"]), 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


if __name__ == "__main__":
    main()
