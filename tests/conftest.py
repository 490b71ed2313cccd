"""Shared test set-up: offline hubs, deterministic seeds, the `cuda` mark's skip, modules that need a package the
machine lacks (the GPU image has no diffusers or torch-fidelity) skipped, not errors, and the fixtures that test
files in several folders use.

The layout: unit tests mirror the source tree (the tests of ``dit_gspn/models/dit.py`` are
``tests/dit_gspn/models/test_dit.py``, of ``evaluation/__main__.py`` ``tests/evaluation/test_main.py``);
``tests/kernels/`` the compiled kernels, ``tests/integration/`` the commands run end to end, ``tests/tools/`` the
benchmark scripts, ``tests/helpers/`` what several test files share."""
import contextlib
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

#: Packages the project installs but a bare GPU image may lack (README, "On a GPU", says how to carry them).
#: A test module that fails to import only because one of these is not installed is skipped, saying so; any
#: other import error, or one of these present but broken, stays a collection error.
OPTIONAL_PACKAGES = ("diffusers", "torch_fidelity", "importlib_metadata")


def missing_optional_package(exc: BaseException) -> str | None:
    """The optional package whose absence caused ``exc`` (following its causes), or None."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            if top in OPTIONAL_PACKAGES and importlib.util.find_spec(top) is None:
                return top
        exc = exc.__cause__ or exc.__context__
    return None


class _ModuleSkippedWithoutOptionalPackages(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as exc:
            missing = missing_optional_package(exc)
            if missing is None:
                raise
            pytest.skip(f"{self.path.name} needs {missing}, which is not installed (README: On a GPU)", allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name == "conftest.py":
        return None
    return _ModuleSkippedWithoutOptionalPackages.from_parent(parent, path=module_path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset after the test, for a test that runs training in this process."""
    from helpers.training import reset_accelerate

    yield
    reset_accelerate()


@contextlib.contextmanager
def torch_threads(count: int):
    """``count`` intra-op threads inside the block, the previous number after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def reference_scan():
    """The pure PyTorch scan, so that a test neither builds nor depends on the compiled kernels."""
    from dit_gspn.ops.gspn_scan import gspn_scan_impl

    with gspn_scan_impl("reference"):
        yield


@pytest.fixture
def lock_holder(tmp_path):
    """(folder, process): a process that holds ``tmp_path / "held"``'s folder lock until the test ends."""
    from helpers.folder_lock import hold_lock

    folder = tmp_path / "held"
    folder.mkdir()
    proc = hold_lock(folder)
    yield folder, proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the module: on a shared 2-core machine, tiny models and Inception run
    faster on one thread (measured ~100x for tiny models, ~2x for Inception) than on two."""
    with torch_threads(1):
        yield


# --- What the evaluation tests measure with (helpers.inception): made once, read by every test that asks, on one
# thread as the modules that read them run (a float32 sum in another order differs in its last bits) -----------

@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """A random Inception-v3 state dict saved to a local file: the evaluation tests' weights."""
    from helpers.inception import random_inception_weights

    with torch_threads(1):
        return random_inception_weights(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="session")
def sets(tmp_path_factory):
    """Two sets of images that differ in part: dict(root, a, b), as .npz files and a folder under root."""
    from helpers.inception import image_sets

    with torch_threads(1):
        return image_sets(tmp_path_factory.mktemp("sets"))


@pytest.fixture(scope="session")
def direct_features(random_weights, sets):
    """Both sets' features from torch-fidelity's own forward: the oracle's inputs."""
    from helpers.inception import torch_fidelity_features

    with torch_threads(1):
        return torch_fidelity_features(random_weights, sets)


@pytest.fixture(scope="session")
def full_report(random_weights, sets):
    """The evaluator's report of every metric between the two sets (a's statistics saved beside them)."""
    from helpers.inception import full_report

    with torch_threads(1):
        return full_report(random_weights, sets)
