"""Small CNNs that classify the built-in shapes, and their features as an Inception-free extractor.

``train_classifier`` fits one on fresh shapes (flipped too) and reports its accuracy on held-out ones. With
``view=silhouette`` it sees only each image's grey silhouette, so it names a class by its shape, never its
colour: ``benchmarks/demo_quality.py`` scores samples with it, REPA's demo aligns with its conv features
(``silhouette_features``), and the demo's FID while training uses its pooled features and logits
(``FeatureExtractor``, saved as a ``torch.export`` program for ``python -m evaluation --extractor`` by
``dit_gspn.module_file.save_exported``). It is an evaluation model, so it lives with the metrics. FIDs from these
features are not Inception FIDs and are not comparable with published ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_gspn.data.shapes import ShapesDataset


def shape_classifier(num_classes: int = 10) -> nn.Sequential:
    """Three 3x3 conv layers (32, 64, 64 channels, ReLU, two 2x2 max-pools), global average pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


#: Index in ``shape_classifier`` after its last ReLU: the layers before it give the (B, 64, H/4, W/4) map.
CONV_LAYERS = 8


def silhouette(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, 3, H, W) grey silhouettes: the channel mean stretched per image
    so that its 2nd and 98th percentiles map to 0 and 1 (which colour a shape has, and how bright it is,
    no longer tell the classes apart)."""
    grey = images.mean(dim=1, keepdim=True)
    flat = grey.flatten(1)
    lo = flat.quantile(0.02, dim=1).view(-1, 1, 1, 1)
    hi = flat.quantile(0.98, dim=1).view(-1, 1, 1, 1)
    return ((grey - lo) / (hi - lo).clamp(min=1e-3)).clamp(0, 1).expand(-1, 3, -1, -1)


class View(nn.Module):
    """``net`` applied to ``view(x)``."""

    def __init__(self, view, net: nn.Module):
        super().__init__()
        self.view, self.net = view, net

    def forward(self, x):
        return self.net(self.view(x))


def train_classifier(image_size: int, per_class: int, epochs: int, seed: int,
                     view=None) -> tuple[nn.Module, float]:
    """(classifier in eval mode, its accuracy on held-out real shapes), trained on shapes from ``seed`` (with
    flips). ``view``: a map applied to every image before the classifier sees it (e.g. ``silhouette``).
    Seeds torch's global RNG with ``seed``."""
    torch.manual_seed(seed)
    train_set = ShapesDataset(num_per_class=per_class, image_size=image_size, seed=seed, flip=True)
    test_set = ShapesDataset(num_per_class=max(20, per_class // 5), image_size=image_size, seed=seed + 1)
    net = shape_classifier() if view is None else View(view, shape_classifier())
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    x, y = zip(*(test_set[i] for i in range(len(test_set))))
    with torch.no_grad():
        accuracy = (net(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean().item()
    return net, accuracy


def silhouette_features(classifier: View) -> nn.Module:
    """A silhouette classifier's conv features: images in [-1, 1] -> its last ReLU's (B, 64, H/4, W/4) map."""
    return View(classifier.view, classifier.net[:CONV_LAYERS])


class FeatureExtractor(nn.Module):
    """A classifier as an evaluation feature extractor: uint8 (B, 3, H, W) images -> (pooled features (B, 64),
    logits (B, classes)), the pair that ``python -m evaluation --extractor`` takes (FID from the features, IS
    from the logits)."""

    def __init__(self, classifier: View):
        super().__init__()
        self.view = classifier.view if isinstance(classifier, View) else nn.Identity()
        net = classifier.net if isinstance(classifier, View) else classifier
        self.trunk, self.head = net[:-1], net[-1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(self.view(images.float() / 127.5 - 1))
        return features, self.head(features)
