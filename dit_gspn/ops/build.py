"""Ahead-of-time build of the compiled scan kernels: ``python -m dit_gspn.ops.build [--cuda]``.

Compiles the CPU variant (or, with ``--cuda``, the CUDA variant, which holds the CPU kernels
too) into the cache that :mod:`dit_gspn.ops.extension` loads from, prints where it built and how
long it took (or that the cache already held a build of the same sources and flags), then runs each
op's self-check on this machine's devices (:mod:`dit_gspn.ops.selfcheck`) and prints the verdicts.
A later ``import dit_gspn`` then loads the kernels without compiling or checking.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from . import dispatch, extension, selfcheck


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit_gspn.ops.build", description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true",
                        help="build the CUDA variant (needs nvcc, found as torch finds it: CUDA_HOME, else the nvcc "
                             "on PATH; TORCH_CUDA_ARCH_LIST defaults to 9.0 when no GPU is visible)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    variant = "cuda" if args.cuda else "cpu"
    print(f"building the {variant} gspn kernels from {extension.CSRC} ...", flush=True)
    start = time.perf_counter()
    try:
        build = extension.build(variant, verbose=args.verbose)
    except Exception as exc:  # noqa: BLE001 -- report any build failure as one readable message
        print(f"error: the {variant} kernels did not build: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    if build.compiled:
        print(f"built {variant} kernels in {seconds:.1f} s: {build.library}")
    else:
        print(f"{variant} kernels already built from the same sources and flags, loaded in {seconds:.1f} s: "
              f"{build.library}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] * (variant == "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the verdicts are printed below
        for device in devices:
            verdicts = {op: selfcheck.trusted(op, device) for op in dispatch.OPS}
            said = ", ".join(f"{op} {'agrees' if ok else 'DISAGREES'}" for op, ok in verdicts.items())
            print(f"self-check on {selfcheck.describe(torch.device(device))}: {said} ({selfcheck.verdict_file()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
