"""dit_gspn.metrics.inception: one forward pass gives the pool, spatial and logit tensors that torch-fidelity's
own forward gives (with random weights: what is read, cut and flattened, not what the real weights compute)."""
import pytest
import torch

from dit_gspn.metrics import InceptionFeatures
from dit_gspn.metrics.inception import SPATIAL_DIM

from helpers.inception import LAYER, N


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_one_pass_gives_the_pool_spatial_and_logit_tensors_of_torch_fidelitys_forward(random_weights, sets,
                                                                                      direct_features):
    images = torch.from_numpy(sets["a"]).permute(0, 3, 1, 2).contiguous()
    found = InceptionFeatures(random_weights, "cpu")(images)
    assert found["spatial"].shape == (N, SPATIAL_DIM) == (N, 17 * 17 * 7)
    for key, oracle in (("pool", "2048"), ("spatial", "spatial"), ("logits", "logits")):
        torch.testing.assert_close(found[key].double(), torch.from_numpy(direct_features["a"][oracle]))
    small = InceptionFeatures(random_weights, "cpu", pool_layer=LAYER)(images, wanted=("pool",))
    torch.testing.assert_close(small["pool"].double(), torch.from_numpy(direct_features["a"][LAYER]))
