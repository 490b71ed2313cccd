"""retain_freed_host_memory: a loop that frees and re-allocates its tensors stops page-faulting them in.

The control holds glibc's starting thresholds fixed, so that it returns every freed block (its default returns
a share that changes from run to run).

The oracle is the kernel's count of minor page faults (getrusage), measured in a fresh interpreter per case so
that the malloc settings of this test process play no part.
"""
import subprocess
import sys

import pytest

from dit_gspn.host_memory import GLIBC

pytestmark = pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")

# As a training step does: many MiB-sized activations, all freed before the next step allocates them again.
_STEPS = """
import resource, sys
import torch
from dit_gspn.host_memory import M_MMAP_THRESHOLD, mallopt, retain_freed_host_memory
if sys.argv[1] == "retain":
    retained = retain_freed_host_memory()
else:  # the control: glibc's starting thresholds held fixed, every block of 128 KiB and up mapped and unmapped
    retained = mallopt(M_MMAP_THRESHOLD, 128 << 10)
def step(i):
    acts = [torch.ones(((i + j) % 8 + 1) << 18) for j in range(32)]  # 1 to 8 MiB each, 144 MiB, touched once
    return sum(float(a[0]) for a in acts)
for i in range(3):
    step(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(10):
    step(i)
print(retained, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True).stdout
    retained, faults = out.split()
    return retained, float(faults)


def test_retained_memory_is_reused_without_page_faults():
    retained, kept = _faults_per_step("retain")
    control_set, unmapped = _faults_per_step("unmapped")
    assert retained == "True" and control_set == "True"
    # 144 MiB per step is 36,864 4 KiB pages, faulted in anew each step when freed blocks go back to the kernel
    # (glibc's default does so for a share of them that varies from run to run: its thresholds move).
    assert unmapped > 30000, f"the control should fault every freed tensor back in, saw {unmapped} faults/step"
    assert kept < 1000, f"retained memory should be reused, saw {kept} faults/step"
