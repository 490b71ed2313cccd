"""retain_freed_host_memory: a loop that frees and re-allocates its tensors stops page-faulting them in.

The oracle is the kernel's count of minor page faults (getrusage), measured in a fresh interpreter per case so
that the malloc settings of this test process play no part.
"""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# As a training step does: many MiB-sized activations, all freed before the next step allocates them again.
_STEPS = """
import resource, sys
import torch
from dit_gspn.host_memory import retain_freed_host_memory
retained = retain_freed_host_memory() if sys.argv[1] == "retain" else None
def step():
    acts = [torch.ones(256, 1024) for _ in range(64)]  # 64 x 1 MiB, written (touched) once each
    return sum(float(a[0, 0]) for a in acts)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(retained, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True).stdout
    retained, faults = out.split()
    return retained, float(faults)


def test_retained_memory_is_reused_without_page_faults():
    retained, kept = _faults_per_step("retain")
    _, default = _faults_per_step("default")
    assert retained == "True"
    # 64 MiB per step is 16,384 fresh 4 KiB pages when glibc gives it back; reused, next to none.
    assert default > 4000, f"glibc's default should fault the freed tensors back in, saw {default} faults/step"
    assert kept < 200, f"retained memory should be reused, saw {kept} faults/step"
