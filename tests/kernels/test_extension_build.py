"""The compiled-extension convention: the CUDA variant compiles and loads on this machine, the
ahead-of-time build command reports where and how long, and a failing build warns once and
falls back to the reference. Each case runs in a subprocess: the CPU and CUDA variants define
the same ops and cannot share a process, and a failed build's state must not leak."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dit_gspn.ops import extension

from helpers.repo import REPO


def run_python(code, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def has_cuda_toolkit():
    """A toolkit torch would build with: nvcc and the CUDA runtime under the CUDA home it finds."""
    home = extension.cuda_home()
    complete = home and (Path(home) / "bin" / "nvcc").exists() and any(Path(home).glob("lib*/libcudart.so*"))
    return bool(complete) or torch.cuda.is_available()


@pytest.mark.slow  # 1-4 min on 2 cores when the cache is cold (it compiles every csrc/cuda/*.cu); instant when warm
@pytest.mark.skipif(not has_cuda_toolkit(), reason="no complete CUDA toolkit where torch looks (set CUDA_HOME; `make test` does)")
def test_cuda_variant_compiles_and_loads():
    result = run_python(
        """
        import torch
        from dit_gspn.ops import extension
        assert extension.load("cuda"), "load('cuda') returned False"
        assert extension.loaded_build().variant == "cuda"
        for op in ("gspn::line_scan_fwd", "gspn::line_scan_bwd"):
            for key in ("CPU", "CUDA"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
        print("OK")
        """
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-4000:]


def test_ahead_of_time_build_reports_path_and_time():
    result = run_python("from dit_gspn.ops.build import main; raise SystemExit(main([]))")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    built, checked = result.stdout.strip().splitlines()[-2:]
    # A cold cache compiles; a warm one (same sources and flags) only loads.
    match = re.fullmatch(r"(built cpu kernels in|cpu kernels already built from the same sources and flags, "
                         r"loaded in) \d+\.\d s: (.+\.so)", built)
    assert match, built
    assert Path(match.group(2)).is_file()
    # Then each op's self-check on this CPU, recorded beside the build.
    assert re.fullmatch(r"self-check on .+ \(cpu\): line_scan agrees, gspn_scan agrees \((.+)\)", checked), checked
    assert checked.endswith(f"({Path(match.group(2)).parent / 'self_check.json'})")
    assert result.stderr == ""


def test_failing_build_warns_once_and_falls_back(tmp_path):
    csrc = Path(shutil.copytree(extension.CSRC, tmp_path / "csrc"))
    for source in (csrc / "cpu").glob("*.cpp"):
        source.unlink()
    (csrc / "cpu" / "broken.cpp").write_text("int main( { this_is_not_cpp }\n")
    result = run_python(
        f"""
        import warnings
        import torch
        from dit_gspn.ops import extension, line_scan
        from dit_gspn.ops.reference import line_scan_reference
        extension.CSRC = extension.Path({str(csrc)!r})
        inputs = [torch.rand(2, 3, 5, 4) for _ in range(5)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = line_scan(*inputs)
            second = line_scan(*inputs, chunk=2)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        torch.testing.assert_close(first, line_scan_reference(*inputs), rtol=0, atol=0)
        torch.testing.assert_close(second, line_scan_reference(*inputs, chunk=2), rtol=0, atol=0)
        try:
            line_scan(*inputs, impl="cpu")
        except RuntimeError as exc:
            assert "did not build" in str(exc), exc
        else:
            raise AssertionError("impl='cpu' without a kernel must raise")
        print(messages[0])
        """,
        env={"DIT_GSPN_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    message = result.stdout.strip()
    # One line: the compiler's first error, in the user's file, and where the whole output is.
    assert "\n" not in message
    assert message.startswith(f"dit_gspn: the cpu scan kernels did not build: {csrc}/cpu/broken.cpp:1:5: error: "), message
    assert message.endswith("; using the PyTorch implementations instead"), message
    log = Path(re.search(r"\(the whole output: (\S+)\)", message).group(1))
    assert "this_is_not_cpp" in log.read_text()
    assert "No CUDA runtime" not in result.stderr, result.stderr


def test_loading_the_builder_says_nothing_about_cuda_on_a_cpu_machine():
    """torch's extension builder logs "No CUDA runtime is found, using CUDA_HOME=..." at import where a toolkit
    is installed but no GPU is visible; a CPU build needs no CUDA, so the loader keeps that line out."""
    env = {"CUDA_VISIBLE_DEVICES": "", "CUDA_HOME": extension.cuda_home() or "/usr/local/cuda"}
    if not Path(env["CUDA_HOME"]).is_dir():
        pytest.skip("no CUDA toolkit here: torch has nothing to say about it")
    bare = run_python("import torch.utils.cpp_extension", env=env)
    assert "No CUDA runtime is found" in bare.stderr, bare.stderr  # the control: torch does say it here
    ours = run_python("from dit_gspn.ops import extension; extension.cpp_extension(); print('OK')", env=env)
    assert ours.returncode == 0 and ours.stdout.strip() == "OK" and ours.stderr == "", ours.stderr
