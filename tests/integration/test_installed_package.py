"""The package as `pip install .` gives it, used from outside the checkout: a wheel built from the checkout,
installed into a temporary folder, carries the kernel sources and the presets and installs the five commands;
the compiled CPU kernel builds from the installed sources and runs (no fallback), each command runs from
another folder, the demo trains from its shipped config and its checkpoint samples, and the evaluator parses
its arguments."""
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from dit_gspn.ops import extension
from helpers.repo import REPO

TOY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.num_per_class=4",
       "train.global_batch_size=8", "train.steps=2", "logging.sample_steps=2", "logging.samples_per_class=1"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout's files as a fresh clone holds them (a setuptools build/ folder left in the
    checkout would add files deleted since)."""
    out, tree = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("tree")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(out), str(tree)], check=True, timeout=300)
    (path,) = out.glob("dit_gspn-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """Run python with only the installed copy importable, from a folder outside the checkout."""
    root = tmp_path_factory.mktemp("installed")
    site, elsewhere = root / "site", root / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(site), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "DIT_GSPN_CACHE": str(root / "kernels"),
           "CUDA_VISIBLE_DEVICES": ""}

    def run(*args, code=None, timeout=600, script=None):
        """python (``code``, or ``args`` such as ``-m module``) or the installed console ``script`` with ``args``."""
        start = [str(site / "bin" / script)] if script else [sys.executable,
                                                              *(["-c", textwrap.dedent(code)] if code else [])]
        return subprocess.run([*start, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=timeout)

    run.site = site
    run.elsewhere = elsewhere
    return run


def test_the_wheel_carries_every_kernel_source_and_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    checkout = {f"dit_gspn/csrc/{p.relative_to(extension.CSRC).as_posix()}" for p in extension.CSRC.rglob("*")
                if p.is_file() and p.suffix in (".h", ".cuh", ".cpp", ".cu")}
    presets = {f"dit_gspn/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert checkout and presets and "dit_gspn/configs/demo.yaml" in presets
    assert checkout <= names, sorted(checkout - names)
    assert presets <= names, sorted(presets - names)
    assert "dit_gspn/resources.py" in names and "evaluation/__main__.py" in names


@pytest.mark.slow  # a cold CPU kernel build from the installed sources: 30-70 s on 2 cores
def test_the_installed_cpu_kernel_builds_from_its_own_sources_and_runs(installed):
    result = installed(code="""
        import warnings
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference is a failure here
        import torch
        import dit_gspn
        from dit_gspn.ops import extension, gspn_scan, line_scan, normalize_gates
        from dit_gspn.ops.reference import gspn_scan_reference, line_scan_reference
        print("package", dit_gspn.__file__)
        print("csrc", extension.CSRC)
        x, lam = torch.randn(2, 3, 9, 7), torch.rand(2, 3, 9, 7) * 2 - 1
        gates = normalize_gates(*(torch.randn(2, 3, 9, 7) for _ in range(3)))
        torch.testing.assert_close(line_scan(x, lam, *gates, chunk=4, impl="cpu"),
                                   line_scan_reference(x, lam, *gates, chunk=4), rtol=1e-5, atol=1e-5)
        lam4, gl, gc, gr, u = (torch.randn(2, 4, 3, 9, 7) for _ in range(5))
        torch.testing.assert_close(gspn_scan(x, lam4, gl, gc, gr, u, impl="cpu"),
                                   gspn_scan_reference(x, lam4, gl, gc, gr, u), rtol=1e-5, atol=1e-5)
        build = extension.loaded_build()
        print("compiled", build.compiled, build.library)
        import evaluation
        print("evaluation", evaluation.__file__)
    """)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert lines["package"].startswith(str(installed.site))
    assert lines["csrc"] == str(installed.site / "dit_gspn" / "csrc")
    assert lines["compiled"].startswith("True ")  # built here, from the installed sources, into its own cache
    assert lines["evaluation"].startswith(str(installed.site))


COMMANDS = ("dit-gspn-train", "dit-gspn-sample", "dit-gspn-extract", "dit-gspn-eval", "dit-gspn-demo")


@pytest.mark.slow  # five processes that import torch: about 30 s on 2 cores
def test_the_wheel_installs_the_five_commands_and_each_runs_from_another_folder(installed):
    for name in COMMANDS:
        helped = installed("--help", script=name)
        assert helped.returncode == 0 and helped.stdout.startswith(f"usage: {name}"), (name, helped.stderr[-2000:])
    wrong = installed("--config", "no-such.yaml", script="dit-gspn-train")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "error: config file no-such.yaml does not exist"], wrong.stderr[-2000:]


@pytest.mark.slow  # the demo at toy size (2 steps) in a fresh process: about 20 s
def test_the_installed_demo_trains_from_its_shipped_config(installed, tmp_path):
    result = installed("--out", str(tmp_path / "run"), *TOY, script="dit-gspn-demo")  # its default config: shipped
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "0000002" / "ema" / "config.json").is_file()
    sampled = installed("--ckpt", str(tmp_path / "run" / "checkpoints" / "0000002"), "--classes", "0", "1",
                        "--num-steps", "2", "--out", str(tmp_path / "grid.png"), "--cpu", script="dit-gspn-sample")
    assert sampled.returncode == 0 and (tmp_path / "grid.png").is_file(), sampled.stderr[-4000:]


def test_the_installed_demo_finds_its_default_config(installed):
    result = installed(code="from pathlib import Path; from dit_gspn.commands import demo; print(Path(demo.DEMO_CONFIG).is_file())")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "True"


@pytest.mark.slow  # two processes that import torch-fidelity: 20-40 s on 2 cores
def test_the_installed_evaluator_parses_its_arguments(installed):
    helped = installed("-m", "evaluation", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m evaluation"), helped.stderr[-4000:]
    wrong = installed("-m", "evaluation", "--metrics", "no-such-metric", "samples.npz")
    assert wrong.returncode == 2 and "error:" in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
