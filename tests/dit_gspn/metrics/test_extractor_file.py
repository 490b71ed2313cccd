"""dit_gspn.metrics.extractor_file: a feature extractor passed by path, as a torch.export program or a
TorchScript file, gives the same numbers, without torch's TorchScript deprecation warning."""
import warnings

import pytest
import torch
import torch.nn as nn

from dit_gspn.module_file import save_exported
from dit_gspn.metrics import evaluate

from helpers.inception import FAST


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_export_and_torchscript_extractors_give_the_same_numbers_without_a_deprecation_warning(sets, tmp_path):
    class Pair(nn.Module):
        """uint8 images -> (6 pooled conv features, 4 logits)."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, images):
            features = self.net(images.float() / 127.5 - 1)
            return features, features[:, :4] * 3

    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    exported = save_exported(Pair(), example, tmp_path / "pair.pt2")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(Pair().eval(), example), str(tmp_path / "pair.pt"))
    reports = {}
    for path in (exported, tmp_path / "pair.pt"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports[path.suffix] = evaluate(sets["root"] / "a.npz", sets["root"] / "b.npz", extractor=path,
                                            settings=FAST)
        assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    pt2, ts = reports[".pt2"], reports[".pt"]
    assert pt2["settings"]["feature_extractor"] == "torch.export pair.pt2"
    assert ts["settings"]["feature_extractor"] == "torchscript pair.pt"
    assert pt2["settings"]["metrics"] == ["fid", "isc", "prc", "kid"]  # no spatial features: no sFID
    assert any(w.startswith("no sFID:") for w in pt2["warnings"])
    for key, value in pt2["metrics"].items():
        assert ts["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert pt2["metrics"]["fid"] > 0.01


def test_statistics_first_and_images_second_with_an_extractor_give_the_fid_of_the_images(sets, tmp_path):
    """The samples' statistics saved with an extractor file, then compared with images: the extractor shows its
    outputs on the second input's images (the first holds none), and the FID is the images' own."""
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, images):
            return self.net(images.float() / 127.5 - 1)

    extractor = save_exported(Features(), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), tmp_path / "features.pt2")
    a, b = sets["root"] / "a.npz", sets["root"] / "b.npz"
    evaluate(a, metrics=[], extractor=extractor, save_stats=tmp_path / "a_stats.npz", settings=FAST)
    from_images = evaluate(a, b, metrics=["fid"], extractor=extractor, settings=FAST)
    from_stats = evaluate(tmp_path / "a_stats.npz", b, extractor=extractor, settings=FAST)
    assert from_stats["settings"]["metrics"] == ["fid"]  # no images first: no IS, no KID, no precision/recall
    assert from_stats["metrics"]["fid"] == pytest.approx(from_images["metrics"]["fid"], rel=1e-9)
    assert from_images["metrics"]["fid"] > 0.01
