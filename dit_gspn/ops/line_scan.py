"""Placeholder dispatch (reference only) until the compiled kernels land."""
from .reference import line_scan_reference


def line_scan(x, lam, wl, wc, wr, chunk=None, impl=None):
    return line_scan_reference(x, lam, wl, wc, wr, chunk)
