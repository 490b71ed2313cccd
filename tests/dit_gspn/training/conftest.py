"""The frozen encoder the REPA and encoder tests load: a tiny conv network saved as a torch.export program."""
import pytest
import torch

from dit_gspn.module_file import save_exported

from helpers.tiny_models import tiny_encoder


@pytest.fixture
def encoder_file(tmp_path):
    """``tiny_encoder`` as a torch.export program (.pt2)."""
    torch.manual_seed(11)
    return save_exported(tiny_encoder(), torch.zeros(2, 3, 16, 16), tmp_path / "encoder.pt2")
