"""Builds and loads the compiled ``torch.ops.gspn`` kernels: at most one build per process, from a shared cache.

``torch.utils.cpp_extension.load`` (ninja) compiles and loads; this module adds only what it lacks:

- **A cache shared by checkouts.** A build's folder under :func:`cache_dir` is named by a key hashing
  everything the build reads: the sources' content (the variant's ``.cpp`` / ``.cu`` files and every header
  under ``csrc/``) and the flags, compiler and versions. The sources are copied into the folder and compiled
  from there, so the ninja file names no checkout (ninja would rebuild whenever the paths changed):
  checkouts with the same sources share one build; changed sources get a folder of their own.
- **Only finished builds load.** A build runs under a file lock per folder and is finished once its
  ``build.json`` (the key and the library's sha256) is written; a process that finds one loads the
  library without running the compiler, so a concurrent first run waits and loads what the other built.
- **A failed build is one warning**, naming the compiler's first error and the log it wrote, after which
  :func:`load` answers False for the process and the dispatch runs the PyTorch implementations.
- The sources are the checkout's ``csrc/`` or the copy an installed wheel carries (:mod:`dit_gspn.resources`).

Two variants: ``cpu`` (sorted ``csrc/cpu/*.cpp``) and ``cuda`` (the same plus sorted ``csrc/cuda/*.cu``,
compiled with ``-DGSPN_WITH_CUDA``). Both register kernels for the same ops, so a process holds one: with a
GPU the ``cuda`` one, which holds the CPU kernels too. The ops' schemas, fake tensors and autograd are
registered in Python (``line_scan.py``, ``gspn_scan.py``) when the package is imported, before any build.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
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
#: The compiler's output of a failed build, in its folder.
BUILD_LOG = "build.log"

CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr"]


@dataclass(frozen=True)
class Build:
    """A build loaded in this process: its variant, library, key, and whether this process compiled it."""

    variant: str
    library: Path
    key: str
    compiled: bool

    @property
    def folder(self) -> Path:
        return self.library.parent


_loaded: Build | None = None  # the one build this process holds (both variants register the same ops)


def cpp_extension():
    """``torch.utils.cpp_extension``, imported without the "No CUDA runtime is found, using CUDA_HOME=..." warning
    it logs at import on any machine without a GPU: a CPU build needs no CUDA, and a CUDA build names its
    toolkit through :func:`build_flags`. Its other messages pass."""
    logger = logging.getLogger("torch.utils.cpp_extension")

    def not_the_cuda_home_guess(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")

    logger.addFilter(not_the_cuda_home_guess)
    try:
        import torch.utils.cpp_extension as module
    finally:
        logger.removeFilter(not_the_cuda_home_guess)
    return module


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
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension().CUDA_HOME


def build_flags(variant: str) -> dict:
    """Everything besides the sources that decides what the build of ``variant`` produces (part of its key).

    For ``cuda`` it also prepares torch's builder: its CUDA home follows ``$CUDA_HOME`` (torch reads it once,
    at import), and ``TORCH_CUDA_ARCH_LIST`` defaults to 9.0 when no GPU is visible (torch would fail with an
    IndexError looking for one)."""
    defines = ["-DGSPN_WITH_CUDA"] if variant == "cuda" else []
    flags = {"variant": variant, "torch": torch.__version__, "python": sys.version.split()[0],
             "cxx": os.environ.get("CXX", "c++"), "ldflags": LDFLAGS}
    if variant == "cuda":
        if "CUDA_HOME" in os.environ:
            cpp_extension().CUDA_HOME = os.environ["CUDA_HOME"]
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH
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


def build(variant: str, verbose: bool = False) -> Build:
    """Load ``variant`` into this process, from the cache when a finished build of the same sources and flags is
    there, else compiling it first (under the build folder's lock).

    Raises RuntimeError when the build fails (one line: the compiler's first error and the log holding its
    whole output), and when another variant is already loaded in this process.
    """
    global _loaded
    if variant not in ("cpu", "cuda"):
        raise ValueError(f"variant must be 'cpu' or 'cuda', got {variant!r}")
    if _loaded is not None:
        if _loaded.variant == variant:
            return _loaded
        raise RuntimeError(f"the {_loaded.variant!r} gspn kernels are already loaded in this process; the "
                           f"{variant!r} ones register the same ops: build them in a fresh process")
    snapshot = source_snapshot(variant)
    flags = build_flags(variant)
    key = build_key(snapshot, flags)
    folder = cache_dir() / f"dit_gspn_{variant}-{key[:16]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        library = finished_library(folder, key)
        compiled = library is None
        if compiled:
            library = _compile(variant, folder, snapshot, flags, key, verbose)  # loads it too
        else:
            torch.ops.load_library(str(library))
    _loaded = Build(variant, library, key, compiled)
    return _loaded


def _compile(variant: str, folder: Path, snapshot: dict[str, bytes], flags: dict, key: str, verbose: bool) -> Path:
    """Compile ``snapshot`` in a clean ``folder``, load the library, then write the record that finishes the build."""
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished or damaged build: start clean
    src = folder / "src"
    for name, content in snapshot.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(content)
    name = f"dit_gspn_{variant}"
    compiled = {p.relative_to(CSRC).as_posix() for p in sources(variant)}
    try:
        path = cpp_extension().load(
            name=name, sources=[str(src / n) for n in sorted(snapshot) if n in compiled],
            extra_cflags=flags["cflags"], extra_cuda_cflags=flags.get("cuda_cflags"), extra_ldflags=flags["ldflags"],
            extra_include_paths=[str(src)], build_directory=str(folder), with_cuda=variant == "cuda",
            is_python_module=False, verbose=verbose,
        )
    except Exception as exc:
        log = folder / BUILD_LOG
        log.write_text(f"{exc}\n")
        # The diagnostic names the build's copy of a source: name the user's file instead.
        first = _first_error(str(exc)).replace(f"{src}/", f"{CSRC}/")
        raise RuntimeError(f"{first} (the whole output: {log})") from exc
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


def load(device_type: str) -> bool:
    """True when the ``torch.ops.gspn`` kernels for ``device_type`` ("cpu" or "cuda") are loaded; other device
    types answer False. Builds the variant on first use (a process with a GPU loads the ``cuda`` one for both
    devices); a failed build warns once and answers False from then on."""
    if device_type not in ("cpu", "cuda"):
        return False
    if _loaded is not None and device_type in (_loaded.variant, "cpu"):
        return True  # either variant holds the CPU kernels; the CUDA one holds both
    return _load_once("cuda" if device_type == "cuda" or torch.cuda.is_available() else "cpu")


@functools.cache
def _load_once(variant: str) -> bool:
    try:
        build(variant)
    except Exception as exc:  # noqa: BLE001 -- any build failure means: fall back, say why once
        warnings.warn(f"dit_gspn: the {variant} scan kernels did not build: {_first_error(str(exc))}; using the "
                      f"PyTorch implementations instead", RuntimeWarning, stacklevel=3)
        return False
    return True


def _first_error(output: str) -> str:
    """The compiler's first diagnostic in ``output`` (``file:line:col: error: ...``, nvcc's ``file(line): error:``),
    else its last line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()] or ["no output"]
    return next((line for line in lines if re.search(r"(:|\)) (fatal )?error( [A-Z]?\d+)?:", line)), lines[-1])


def loaded_build() -> Build | None:
    """The build loaded in this process, or None."""
    return _loaded
