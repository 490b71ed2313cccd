"""The kernel build cache shared by checkouts and concurrent runs: a build is named by its sources' content
and flags (not by where the checkout lives), only a finished build whose library matches its record loads,
and two checkouts' concurrent first runs build once, each loading a working kernel."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dit_gspn.ops import extension

from helpers.repo import REPO


def checkout_copy(root: Path) -> Path:
    """A copy of the kernel sources where a second checkout would have them."""
    return Path(shutil.copytree(extension.CSRC, root / "csrc"))


def key_of(csrc: Path, monkeypatch, variant="cpu") -> str:
    monkeypatch.setattr(extension, "CSRC", csrc)
    return extension.build_key(extension.source_snapshot(variant), extension.build_flags(variant))


def test_the_key_follows_the_sources_content_and_flags_not_the_checkouts_path(tmp_path, monkeypatch):
    first, second = checkout_copy(tmp_path / "a"), checkout_copy(tmp_path / "b")
    key = key_of(first, monkeypatch)
    assert key_of(second, monkeypatch) == key  # same content elsewhere: the same build
    header = sorted(second.glob("*.h"))[0]
    header.write_bytes(header.read_bytes() + b"\n// a header every kernel may include\n")
    assert key_of(second, monkeypatch) != key  # a changed header: another build
    monkeypatch.setattr(extension, "CFLAGS", [*extension.CFLAGS, "-DGSPN_EXTRA"])
    assert key_of(first, monkeypatch) != key  # other flags: another build
    snapshot = extension.source_snapshot("cpu")
    assert {"cpu/line_scan_cpu.cpp", header.name} <= set(snapshot)
    assert not any(name.endswith(".cu") for name in snapshot)  # a CUDA source does not rebuild the CPU variant


def test_every_cuda_kernel_header_is_part_of_the_cuda_key(tmp_path, monkeypatch):
    # The CUDA kernels live in csrc/cuda/*.cuh, included by the .cu launchers: editing one must rebuild.
    csrc = checkout_copy(tmp_path / "c")
    kernels = sorted((csrc / "cuda").glob("*.cuh"))
    assert kernels, "no CUDA kernel headers under csrc/cuda"
    key = key_of(csrc, monkeypatch, "cuda")
    snapshot = extension.source_snapshot("cuda")
    assert {f"cuda/{k.name}" for k in kernels} <= set(snapshot)
    kernels[-1].write_bytes(kernels[-1].read_bytes() + b"\n// edited\n")
    assert key_of(csrc, monkeypatch, "cuda") != key


def test_only_a_finished_build_matching_its_record_is_loaded(tmp_path):
    folder, key = tmp_path / "dit_gspn_cpu-0123", "0123" * 16
    library = folder / "dit_gspn_cpu.so"
    assert extension.finished_library(folder, key) is None  # nothing there
    folder.mkdir()
    library.write_bytes(os.urandom(4096))
    assert extension.finished_library(folder, key) is None  # compiled, but not finished: no record yet
    import hashlib

    record = {"key": key, "library": library.name, "sha256": hashlib.sha256(library.read_bytes()).hexdigest()}
    (folder / extension.BUILD_RECORD).write_text(json.dumps(record))
    assert extension.finished_library(folder, key) == library
    assert extension.finished_library(folder, "f" * 64) is None  # another build's record
    library.write_bytes(library.read_bytes()[:-1] + b"\0")
    assert extension.finished_library(folder, key) is None  # damaged after it was finished
    (folder / extension.BUILD_RECORD).write_text(json.dumps(record)[:-5])
    assert extension.finished_library(folder, key) is None  # a torn record


RUN_KERNEL = """
    import json, sys, warnings
    from pathlib import Path
    warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference is a failure here
    import torch
    from dit_gspn.ops import extension, line_scan, normalize_gates
    from dit_gspn.ops.reference import line_scan_reference
    extension.CSRC = Path(sys.argv[1])
    torch.manual_seed(int(sys.argv[2]))
    x, lam = torch.randn(2, 3, 9, 7), torch.rand(2, 3, 9, 7) * 2 - 1
    gates = normalize_gates(*(torch.randn(2, 3, 9, 7) for _ in range(3)))
    torch.testing.assert_close(line_scan(x, lam, *gates, chunk=4, impl="cpu"),
                               line_scan_reference(x, lam, *gates, chunk=4), rtol=1e-5, atol=1e-5)
    build = extension.loaded_build()
    print(json.dumps({"compiled": build.compiled, "library": str(build.library), "key": build.key}))
"""


def run_kernel_from(csrc: Path, cache: Path, seed: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RUN_KERNEL), str(csrc), str(seed)], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "DIT_GSPN_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": ""},
    )


def outcome(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow  # one CPU build, 30-70 s on 2 cores
def test_two_checkouts_first_runs_at_once_build_once_and_both_run_the_kernel(tmp_path):
    cache = tmp_path / "cache"
    first, second = checkout_copy(tmp_path / "a"), checkout_copy(tmp_path / "b")
    racing = [run_kernel_from(first, cache, 1), run_kernel_from(second, cache, 2)]
    results = [outcome(p) for p in racing]
    assert sorted(r["compiled"] for r in results) == [False, True]  # one built, the other waited and loaded it
    library = Path(results[0]["library"])
    assert results[1]["library"] == str(library) and results[0]["key"] == results[1]["key"]
    assert [p.name for p in library.parent.parent.iterdir() if p.is_dir()] == [library.parent.name]
    assert extension.finished_library(library.parent, results[0]["key"]) == library  # finished, not corrupt
    ninja = (library.parent / "build.ninja").read_text()
    assert str(first) not in ninja and str(second) not in ninja  # the build names no checkout
    before = (library.stat().st_mtime_ns, library.read_bytes())
    later = outcome(run_kernel_from(second, cache, 3))  # a later run of either checkout: loads, compiles nothing
    assert later == {**results[0], "compiled": False}
    assert (library.stat().st_mtime_ns, library.read_bytes()) == before
