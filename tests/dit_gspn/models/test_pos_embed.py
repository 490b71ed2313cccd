"""dit_gspn.models.pos_embed: the 2-D sin-cos embedding equals facebookresearch/DiT's numpy formula on any grid."""
import numpy as np
import pytest
import torch

from dit_gspn.models import sincos_pos_embed_2d


def dit_numpy_pos_embed(dim, h, w):
    """DiT's numpy get_2d_sincos_pos_embed, with its square grid_size replaced by (h, w)."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=0)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("h, w", [(16, 16), (3, 5), (6, 2)])
def test_sincos_pos_embed_equals_dits_numpy_formula(h, w):
    expected = torch.from_numpy(dit_numpy_pos_embed(64, h, w)).float()
    torch.testing.assert_close(sincos_pos_embed_2d(64, h, w), expected, rtol=0, atol=1e-6)
