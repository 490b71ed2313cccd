"""Builds and loads the compiled ``torch.ops.gspn`` kernels: one extension per process, cached on disk.

Two variants, built with ``torch.utils.cpp_extension.load`` (ninja) from the sources in ``csrc/``
(the checkout's, or the copy an installed wheel carries: :mod:`dit_gspn.resources`):

- ``cpu``: sorted ``csrc/cpu/*.cpp``;
- ``cuda``: the same plus sorted ``csrc/cuda/*.cu``, compiled with ``-DGSPN_WITH_CUDA``. It holds
  the CPU kernels too, so a process with a GPU loads only this one.

Both define the one ``TORCH_LIBRARY(gspn)`` (``csrc/cpu/registration.cpp``), so at most one of
them can live in a process. The cache is ``$DIT_GSPN_CACHE`` (default ``~/.cache/dit_gspn/extensions``),
one folder per build, named by the variant and a key that hashes everything the build reads: the
sources' content (the variant's ``.cpp`` / ``.cu`` files and every header under ``csrc/``), the flags,
the compiler and the torch / Python / CUDA versions. A build compiles a snapshot of the sources copied
into its folder, so its ninja file names no checkout: checkouts with the same sources share one build,
and changed sources get a folder of their own instead of overwriting a library other processes load.
Builds run under a file lock per folder; a build is finished once its ``build.json`` (the key and the
library's sha256) is written, and only a finished build whose library matches that record is loaded,
so a concurrent first run waits and loads what the other one built. A failed build warns once, naming
the compiler's last lines, and :func:`load` answers False from then on: the dispatch falls back to the
next implementation.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from .. import resources
from ..atomic_write import write_text_atomically
from ..hashing import sha256_file

#: The C++/CUDA sources (read at each build, so a test may point it at a copy).
CSRC = resources.CSRC
#: The architecture built when no GPU is present to detect one (H100 / H200).
DEFAULT_CUDA_ARCH = "9.0"
#: Files every variant's build may include, wherever they sit under CSRC.
HEADER_SUFFIXES = (".h", ".cuh")
#: A finished build's record (key, library, sha256), written last.
BUILD_RECORD = "build.json"

CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr"]


@dataclass(frozen=True)
class LoadedBuild:
    """The build living in this process: its variant, library, key, and whether this process compiled it."""

    variant: str
    library: Path
    key: str
    compiled: bool


_loaded: LoadedBuild | None = None  # the build living in this process, if any
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


def source_snapshot(variant: str) -> dict[str, bytes]:
    """Every file the build of ``variant`` reads, as {path relative to CSRC: content}: its sources and all headers."""
    files = set(sources(variant)) | {p for p in CSRC.rglob("*") if p.suffix in HEADER_SUFFIXES and p.is_file()}
    return {path.relative_to(CSRC).as_posix(): path.read_bytes() for path in sorted(files)}


def cuda_home() -> str | None:
    """The CUDA toolkit as torch finds it: ``$CUDA_HOME`` (or ``$CUDA_PATH``), else the ``nvcc`` on PATH, else
    /usr/local/cuda; None when there is none."""
    import torch.utils.cpp_extension as cpp_extension

    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension.CUDA_HOME


def configure_cuda_toolkit() -> None:
    """Prepare torch's extension builder for a CUDA build: keep its CUDA home in step with ``$CUDA_HOME`` (torch
    reads it once, at import), and set ``TORCH_CUDA_ARCH_LIST`` to 9.0 when unset and no GPU is visible to
    detect one (torch then fails with an IndexError)."""
    import torch.utils.cpp_extension as cpp_extension

    if "CUDA_HOME" in os.environ:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH


def build_flags(variant: str) -> dict:
    """Everything besides the sources that decides what the build of ``variant`` produces (part of its key)."""
    defines = ["-DGSPN_WITH_CUDA"] if variant == "cuda" else []
    flags = {"variant": variant, "torch": torch.__version__, "python": sys.version.split()[0],
             "cxx": os.environ.get("CXX", "c++"), "ldflags": LDFLAGS}
    if variant == "cuda":
        configure_cuda_toolkit()
        for folder in _missing_cuda_library_headers():
            defines += ["-isystem", str(folder)]
        flags.update(cuda_home=cuda_home(), torch_cuda=torch.version.cuda,
                     arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"), cuda_cflags=CUDA_CFLAGS + defines)
    flags["cflags"] = CFLAGS + defines
    return flags


def build_key(snapshot: dict[str, bytes], flags: dict) -> str:
    """The sha256 naming a build: of the flags and of every source's relative path and content."""
    digest = hashlib.sha256(json.dumps(flags, sort_keys=True).encode())
    for name in sorted(snapshot):
        digest.update(f"\0{name}\0{len(snapshot[name])}\0".encode())
        digest.update(snapshot[name])
    return digest.hexdigest()


def build_folder(variant: str, key: str) -> Path:
    """The cache folder of the build of ``variant`` with ``key``."""
    return cache_dir() / f"dit_gspn_{variant}-{key[:16]}"


def finished_library(folder: Path, key: str) -> Path | None:
    """The library of the finished build in ``folder`` when its record names ``key`` and the library's sha256
    matches the record; None for a missing, unfinished, foreign or damaged build."""
    try:
        record = json.loads((folder / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    library = folder / str(record.get("library", ""))
    if record.get("key") != key or not library.is_file() or sha256_file(library) != record.get("sha256"):
        return None
    return library


def build(variant: str, verbose: bool = False) -> Path:
    """Load ``variant`` into this process, from the cache when a finished build of the same sources and flags is
    there, else compiling it first (under the build folder's lock); return its library's path.

    Raises RuntimeError (with the compiler's output) when the build fails, and when another
    variant is already loaded in this process.
    """
    global _loaded
    if variant not in ("cpu", "cuda"):
        raise ValueError(f"variant must be 'cpu' or 'cuda', got {variant!r}")
    if _loaded is not None:
        if _loaded.variant == variant:
            return _loaded.library
        raise RuntimeError(
            f"the {_loaded.variant!r} gspn extension is already loaded in this process; "
            f"the {variant!r} one defines the same ops: build it in a fresh process"
        )
    snapshot = source_snapshot(variant)
    flags = build_flags(variant)
    key = build_key(snapshot, flags)
    folder = build_folder(variant, key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        library = finished_library(folder, key)
        compiled = library is None
        if compiled:
            library = _compile(variant, folder, snapshot, flags, key, verbose)  # loads it too
        else:
            torch.ops.load_library(str(library))
    _loaded = LoadedBuild(variant, library, key, compiled)
    for hook in _hooks:
        hook()
    return library


def _compile(variant: str, folder: Path, snapshot: dict[str, bytes], flags: dict, key: str, verbose: bool) -> Path:
    """Compile ``snapshot`` in a clean ``folder``, load the library, then write the record that finishes the build."""
    import torch.utils.cpp_extension as cpp_extension

    if folder.exists():
        shutil.rmtree(folder)  # an unfinished or damaged build: start clean
    src = folder / "src"
    for name, content in snapshot.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(content)
    name = f"dit_gspn_{variant}"
    compiled = {p.relative_to(CSRC).as_posix() for p in sources(variant)}
    path = cpp_extension.load(
        name=name,
        sources=[str(src / n) for n in sorted(snapshot) if n in compiled],
        extra_cflags=flags["cflags"],
        extra_cuda_cflags=flags.get("cuda_cflags"),
        extra_ldflags=flags["ldflags"],
        extra_include_paths=[str(src)],
        build_directory=str(folder),
        with_cuda=variant == "cuda",
        is_python_module=False,
        verbose=verbose,
    )
    library = Path(path) if path else folder / f"{name}.so"
    record = {"key": key, "library": library.name, "sha256": sha256_file(library), "flags": flags,
              "sources": sorted(snapshot), "built_from": str(CSRC), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text_atomically(folder / BUILD_RECORD, json.dumps(record, indent=1) + "\n")
    return library


def _missing_cuda_library_headers() -> list[Path]:
    """Header folders of the pip CUDA libraries (cuSPARSE, cuBLAS, ...) when the toolkit lacks them.

    ATen's CUDA headers include cusparse.h; a bare toolkit may not ship it, but torch's CUDA wheel
    depends on the ``nvidia-*`` packages that do. They go after the toolkit's own include folder,
    so they only fill what it lacks.
    """
    home = cuda_home()
    if home and (Path(home) / "include" / "cusparse.h").exists():
        return []
    site = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(p for p in site.glob("*/include") if (p / "cusparse.h").exists())


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
    if _loaded is not None:
        # The CUDA variant serves CPU tensors too; the CPU variant cannot serve CUDA tensors.
        return _loaded.variant in (variant, "cuda")
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
    return _loaded.variant if _loaded is not None else None


def loaded_build() -> LoadedBuild | None:
    """The build loaded in this process (and whether this process compiled it), or None."""
    return _loaded


def on_load(hook) -> None:
    """Run ``hook()`` once the library is loaded (now, if it already is): Python-side op registrations."""
    _hooks.append(hook)
    if _loaded is not None:
        hook()


def _last_lines(text: str, n: int = 20) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def timed_build(variant: str, verbose: bool = False) -> tuple[Path, float]:
    """Build ``variant`` and return (library path, seconds it took)."""
    start = time.perf_counter()
    path = build(variant, verbose=verbose)
    return path, time.perf_counter() - start
