"""The frozen encoder the REPA and encoder tests load: a tiny conv network saved as a torch.export program."""
import pytest
import torch


@pytest.fixture
def encoder_file(tmp_path):
    """``tiny_encoder`` as a torch.export program (.pt2)."""
    # Imported here, not above: a conftest that fails to import stops the collection of every test beside it, and
    # the GPU image may lack the packages these pull in (tests/conftest.py skips only test modules that need them).
    from dit_gspn.module_file import save_exported
    from helpers.tiny_models import tiny_encoder

    torch.manual_seed(11)
    return save_exported(tiny_encoder(), torch.zeros(2, 3, 16, 16), tmp_path / "encoder.pt2")
