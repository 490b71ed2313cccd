"""What the evaluation tests measure with: a RANDOMLY INITIALISED Inception-v3 (torch-fidelity's architecture,
convolutions re-initialised Kaiming normal so its features are informative) saved to a local file, two small sets
of images that differ in part, their features from torch-fidelity's own forward, and the full report on them.

The fixtures of tests/conftest.py (``random_weights``, ``sets``, ``direct_features``, ``full_report``) call these;
they import this module only when a test asks for one, so that a machine without torch-fidelity collects the rest.
"""
import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from dit_gspn.image_npz import write_npz
from dit_gspn.metrics import Settings, evaluate


#: Images in each set.
N = 10
# FID, KID and precision/recall read Inception's 64-d layer here (torch-fidelity's feature_layer option): the
# 2048-d pool layer runs the same code, but its 2048x2048 matrix functions take seconds each on 2 busy cores.
# sFID's 2023-d spatial features are what they are.
LAYER = "64"
SPLIT = 4  # IS splits of 4 samples: 4, 4, 2 for N = 10, so a short last split is exercised
FAST = Settings(device="cpu", feature_layer=LAYER, isc_split_size=SPLIT)


class _Unloaded(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its constructor's weight loading skipped (there is no file yet)."""

    def load_state_dict(self, *args, **kwargs):
        return None


def random_inception_weights(root):
    """A random Inception-v3 state dict (Kaiming-normal convolutions and classifier) saved to a file in root."""
    torch.save({}, root / "empty.pt")
    torch.manual_seed(0)
    model = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(root / "empty.pt"))
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
    torch.save(model.state_dict(), root / "random-inception.pt")
    return root / "random-inception.pt"


def images(seed, tint, n=N):
    """n smooth random 32x32 images (upsampled 4x4 noise), tinted so two sets differ in distribution."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, 4, 4, 3)) * np.asarray(tint)
    fine = np.kron(coarse, np.ones((1, 8, 8, 1))) + rng.normal(0, 0.05, (n, 32, 32, 3))
    return (np.clip(fine, 0, 1) * 255).round().astype(np.uint8)


def image_sets(root):
    """a: untinted images; b: half drawn like a, half tinted, so the sets overlap in part. Written to root as
    a.npz, b.npz and a_folder/ (a's images as PNG files)."""
    a = images(0, (1.0, 1.0, 1.0))
    b = np.concatenate([images(1, (1.0, 1.0, 1.0), N // 2), images(2, (1.0, 0.4, 0.2), N - N // 2)])
    write_npz(root / "a.npz", a)
    write_npz(root / "b.npz", b)
    (root / "a_folder").mkdir()
    for i, image in enumerate(a):
        Image.fromarray(image).save(root / "a_folder" / f"{i:03d}.png")
    return dict(root=root, a=a, b=b)


def torch_fidelity_features(weights, sets):
    """Both sets' features from torch-fidelity's own forward, no code of ours: the 64-d and 2048-d pools and the
    unbiased logits as it returns them, and TF's mixed_6/conv as a forward hook on Mixed_6d.branch1x1 sees it,
    cut and flattened as ADM's evaluator does (NHWC, channels [..., :7], reshape to (N, -1))."""
    out = {}
    model = FeatureExtractorInceptionV3("inception-v3-compat", [LAYER, "2048", "logits_unbiased"],
                                        feature_extractor_weights_path=str(weights))
    seen = []
    model.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, output: seen.append(output.clone()))
    for name in ("a", "b"):
        seen.clear()
        with torch.no_grad():
            pool64, pool, logits = model(torch.from_numpy(sets[name]).permute(0, 3, 1, 2).contiguous())
        nhwc = np.transpose(seen[0].double().numpy(), (0, 2, 3, 1))
        out[name] = {"64": pool64.double().numpy(), "2048": pool.double().numpy(),
                     "logits": logits.double().numpy(), "spatial": nhwc[..., :7].reshape(len(nhwc), -1)}
    return out


def full_report(weights, sets):
    """Every metric between a.npz and b.npz, with a's statistics saved to a_stats.npz and the cache in cache/."""
    root = sets["root"]
    return evaluate(root / "a.npz", root / "b.npz", metrics=["fid", "sfid", "isc", "prc", "kid"],
                    weights=weights, cache_dir=root / "cache", save_stats=root / "a_stats.npz", settings=FAST)
