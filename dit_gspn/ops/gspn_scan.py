"""Placeholder dispatch (reference only) until the fused kernels land."""
from .line_scan import line_scan
from .reference import gspn_scan_reference


def gspn_scan(x, lam, gl, gc, gr, u, chunk=None, impl=None):
    return gspn_scan_reference(x, lam, gl, gc, gr, u, chunk, line_scan=line_scan)
