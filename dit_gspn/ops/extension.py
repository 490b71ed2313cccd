"""Builds and loads the compiled ``torch.ops.gspn`` kernels: one extension per process, cached on disk.

Two variants, built with ``torch.utils.cpp_extension.load`` (ninja) from the sources in ``csrc/``:

- ``cpu``: sorted ``csrc/cpu/*.cpp``;
- ``cuda``: the same plus sorted ``csrc/cuda/*.cu``, compiled with ``-DGSPN_WITH_CUDA``. It holds
  the CPU kernels too, so a process with a GPU loads only this one.

Both define the one ``TORCH_LIBRARY(gspn)`` (``csrc/cpu/registration.cpp``), so at most one of
them can live in a process. The cache is ``$DIT_GSPN_CACHE`` (default
``~/.cache/dit_gspn/extensions``), one folder per torch/Python version, so a cached build
loads instantly. A failed build warns once, naming the compiler's last lines, and
:func:`load` answers False from then on: the dispatch falls back to the next implementation.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch

#: The repository's C++/CUDA sources.
CSRC = Path(__file__).resolve().parents[2] / "csrc"
#: Where a CUDA toolkit matching the torch build lives on the project's build machine.
DEFAULT_CUDA_HOME = Path("/usr/local/cuda-13.0")
#: The architecture built when no GPU is present to detect one (H100 / H200).
DEFAULT_CUDA_ARCH = "9.0"

CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr"]

_loaded_variant: str | None = None  # the variant living in this process, if any
_failed: dict[str, str] = {}  # variant -> why its build failed (warned once)
_hooks: list = []  # callables run once the library is loaded (Python-side registrations)


def cache_dir() -> Path:
    """The build cache of this torch/Python version: ``$DIT_GSPN_CACHE`` or ``~/.cache/dit_gspn/extensions``."""
    root = Path(os.environ.get("DIT_GSPN_CACHE", Path.home() / ".cache" / "dit_gspn" / "extensions"))
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    return root / tag


def sources(variant: str) -> list[Path]:
    """The source files of ``variant`` ("cpu" or "cuda"), in a stable order."""
    files = sorted((CSRC / "cpu").glob("*.cpp"))
    if variant == "cuda":
        files += sorted((CSRC / "cuda").glob("*.cu"))
    return files


def configure_cuda_toolkit() -> None:
    """Point torch's extension builder at the CUDA toolkit when the environment does not.

    Sets ``CUDA_HOME`` to /usr/local/cuda-13.0 when unset and that folder exists (the ``nvcc``
    on PATH would make torch guess /usr/local, which lacks libcudart), and
    ``TORCH_CUDA_ARCH_LIST`` to 9.0 when unset and no GPU is visible to detect one.
    """
    import torch.utils.cpp_extension as cpp_extension

    if "CUDA_HOME" not in os.environ and DEFAULT_CUDA_HOME.is_dir():
        os.environ["CUDA_HOME"] = str(DEFAULT_CUDA_HOME)
    if "CUDA_HOME" in os.environ:
        # torch reads CUDA_HOME once, at import; keep its copy in step with the environment.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH


def build(variant: str, verbose: bool = False) -> Path:
    """Compile (or find in the cache) ``variant`` and load it into this process; return its .so path.

    Raises RuntimeError (with the compiler's output) when the build fails, and when another
    variant is already loaded in this process.
    """
    global _loaded_variant
    if variant not in ("cpu", "cuda"):
        raise ValueError(f"variant must be 'cpu' or 'cuda', got {variant!r}")
    if _loaded_variant is not None:
        if _loaded_variant == variant:
            return _library_path(variant)
        raise RuntimeError(
            f"the {_loaded_variant!r} gspn extension is already loaded in this process; "
            f"the {variant!r} one defines the same ops: build it in a fresh process"
        )
    import torch.utils.cpp_extension as cpp_extension

    name = f"dit_gspn_{variant}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    defines = ["-DGSPN_WITH_CUDA"] if variant == "cuda" else []
    if variant == "cuda":
        configure_cuda_toolkit()
        for folder in _missing_cuda_library_headers():
            defines += ["-isystem", str(folder)]
    path = cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources(variant)],
        extra_cflags=CFLAGS + defines,
        extra_cuda_cflags=CUDA_CFLAGS + defines,
        extra_ldflags=LDFLAGS,
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        with_cuda=variant == "cuda",
        is_python_module=False,
        verbose=verbose,
    )
    _loaded_variant = variant
    for hook in _hooks:
        hook()
    return Path(path) if path else _library_path(variant)


def _missing_cuda_library_headers() -> list[Path]:
    """Header folders of the pip CUDA libraries (cuSPARSE, cuBLAS, ...) when the toolkit lacks them.

    ATen's CUDA headers include cusparse.h; a bare toolkit (such as /usr/local/cuda-13.0 here)
    does not ship it, but torch's CUDA wheel depends on the ``nvidia-*`` packages that do.
    They go after the toolkit's own include folder, so they only fill what it lacks.
    """
    import torch.utils.cpp_extension as cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "include" / "cusparse.h").exists():
        return []
    site = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(p for p in site.glob("*/include") if (p / "cusparse.h").exists())


def _library_path(variant: str) -> Path:
    return cache_dir() / f"dit_gspn_{variant}" / f"dit_gspn_{variant}.so"


def _variant_for(device_type: str) -> str:
    # A process with a GPU loads the CUDA variant for both devices: it holds the CPU kernels too.
    if device_type == "cuda" or (device_type == "cpu" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def load(device_type: str) -> bool:
    """True when the ``torch.ops.gspn`` kernels for ``device_type`` ("cpu" or "cuda") are loaded.

    Builds the matching variant on first use. On a failed build it warns once, naming the
    cause (the compiler's last lines), and returns False from then on. Other device types, and
    a variant that cannot join the one already loaded, answer False without a warning.
    """
    if device_type not in ("cpu", "cuda"):
        return False
    variant = _variant_for(device_type)
    if _loaded_variant is not None:
        # The CUDA variant serves CPU tensors too; the CPU variant cannot serve CUDA tensors.
        return _loaded_variant == variant or _loaded_variant == "cuda"
    if variant in _failed:
        return False
    try:
        build(variant)
    except Exception as exc:  # noqa: BLE001 -- any build failure means: fall back, say why once
        _failed[variant] = _last_lines(str(exc))
        warnings.warn(
            f"dit_gspn: could not build the {variant} scan kernels from {CSRC}; falling back to the "
            f"next implementation (the PyTorch reference). Cause:\n{_failed[variant]}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def require_kernels(op: str, impl: str, device: torch.device, ready, fallback: str) -> None:
    """Raise an error a user can act on when ``impl`` ("cpu" / "cuda") was asked for explicitly but cannot run:
    the tensors are on another device, or the compiled kernels did not build or load (``ready()``, called
    only once the device matches, so a mismatch never starts a build)."""
    if device.type != impl:
        raise ValueError(f"{op}: impl={impl!r} needs {impl} tensors, got tensors on {device}")
    if not ready():
        raise RuntimeError(
            f"{op}: impl={impl!r} was asked for but the compiled {impl} kernels did not build or load (see the "
            f"warning above, or run `python -m dit_gspn.ops.build{' --cuda' if impl == 'cuda' else ''}`); use "
            f"impl=None or {fallback!r}"
        )


def loaded_variant() -> str | None:
    """The variant loaded in this process ("cpu", "cuda"), or None."""
    return _loaded_variant


def on_load(hook) -> None:
    """Run ``hook()`` once the library is loaded (now, if it already is): Python-side op registrations."""
    _hooks.append(hook)
    if _loaded_variant is not None:
        hook()


def _last_lines(text: str, n: int = 20) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def timed_build(variant: str, verbose: bool = False) -> tuple[Path, float]:
    """Build ``variant`` and return (library path, seconds it took)."""
    start = time.perf_counter()
    path = build(variant, verbose=verbose)
    return path, time.perf_counter() - start
