"""Keep freed host memory in the process, so that a CPU training step does not page-fault its tensors back in.

glibc's malloc hands freed memory back to the kernel (it trims the heap above a threshold that it raises only
slowly, and it unmaps large blocks): every CPU step then allocates its activations on fresh pages, and the
kernel zeroes each one on its first touch. On this project's 2-core machines a GSPN-S/2 or DiT-S/2 training
step at 256 px took about 65,000 page faults (250 MiB of zeroed pages) and none after
:func:`retain_freed_host_memory` (counted with getrusage, 2026-12-03). It is what a caching allocator
(PyTorch's CUDA one, or jemalloc / tcmalloc preloaded as the Intel and PyTorch CPU guides advise) does for the
same reason. The
memory kept is what the largest step needed; the resident size stays at that peak.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

#: Free memory at the top of the heap kept instead of trimmed (mallopt takes an int).
TRIM_THRESHOLD = (1 << 31) - 1
#: Extra memory the heap grows by at a time.
TOP_PAD = 64 << 20
#: Blocks from this size up are mapped on their own (and unmapped when freed): glibc's largest on 64 bits.
MMAP_THRESHOLD = 32 << 20


#: Whether this process's malloc is glibc's (the only one these settings are for).
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``: True if it took the setting, False if it refused or is not glibc's."""
    if not GLIBC:
        return False
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    function.argtypes, function.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return function(param, value) == 1


def retain_freed_host_memory() -> bool:
    """Tell the process's malloc to keep freed memory for reuse; True if it did (glibc), False elsewhere (no-op).

    Process-wide and idempotent; call it once at the start of a long CPU job (training, sampling, a benchmark).
    """
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) for param, value in settings)
