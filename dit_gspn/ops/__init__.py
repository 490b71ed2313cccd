"""The GSPN scan op: ``line_scan``, ``normalize_gates`` and the fused four-direction ``gspn_scan``.

One dispatch in front of three implementations: the pure PyTorch reference (the oracle), a
compiled CPU kernel and a compiled CUDA kernel (``csrc/``), registered as torch custom ops.
"""
from .reference import DIRECTIONS, NUM_DIRECTIONS, normalize_gates
from .line_scan import line_scan
from .gspn_scan import gspn_scan, gspn_scan_impl

__all__ = ["DIRECTIONS", "NUM_DIRECTIONS", "line_scan", "normalize_gates", "gspn_scan", "gspn_scan_impl"]
