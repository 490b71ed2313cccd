"""``extension.load`` answers from the build this process holds before it builds anything."""
import warnings

import torch

from dit_gspn.ops import extension


def test_loaded_cpu_kernels_answer_for_the_cpu_on_a_host_with_a_gpu(monkeypatch):
    assert extension.load("cpu"), "the CPU gspn kernels did not build (see the warning)"
    assert extension.loaded_build().variant == "cpu"  # this machine has no GPU: the cpu variant
    builds = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU appears (or was hidden at load time)
    monkeypatch.setattr(extension, "_load_once", lambda variant: builds.append(variant) or False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension.load("cpu") is True  # the CPU kernels are there
    assert builds == []  # no build of the cuda variant was attempted
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
