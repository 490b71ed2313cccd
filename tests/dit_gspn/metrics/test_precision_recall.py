"""dit_gspn.metrics.precision_recall: computed in small blocks, equal to ADM's manifold estimator."""
import numpy as np
import pytest
import torch

from dit_gspn.metrics import manifold_radii, precision_recall

from helpers.adm_evaluation import adm_precision_recall


def test_precision_recall_in_small_blocks_equals_adms_manifold_estimator():
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(37, 6))
    samples = rng.normal(size=(29, 6)) * 1.3 + 0.4
    precision, recall, ref_radii = adm_precision_recall(reference, samples)
    assert 0 < precision < 1 and 0 < recall < 1
    got = precision_recall(torch.from_numpy(reference), torch.from_numpy(samples), k=3, block=5)
    assert got == (pytest.approx(precision, abs=1e-12), pytest.approx(recall, abs=1e-12))
    radii = manifold_radii(torch.from_numpy(reference).float(), k=3, block=5)
    np.testing.assert_allclose(radii.numpy(), ref_radii, rtol=1e-5)
    with pytest.raises(ValueError, match="needs more than 3 vectors"):
        manifold_radii(torch.zeros(3, 2))
