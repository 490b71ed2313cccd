"""ADM's Inception-v3 features in one forward pass: the pool features (FID, KID, precision/recall), the spatial
features (sFID) and the logits (IS), from torch-fidelity's port of the same TF graph.

ADM's evaluator runs TF's 2015 Inception graph (``classify_image_graph_def.pb``) and reads three tensors of it:
``pool_3:0`` (2048-d), ``mixed_6/conv:0`` (its first 7 channels) and ``softmax/logits/MatMul`` (the pool
features times the classifier's weights, no bias). torch-fidelity's ``FeatureExtractorInceptionV3`` holds that
graph's weights, converted, and reproduces its input path (TF1's bilinear resize to 299, ``(x - 128) / 128``);
its ``forward`` returns only pooled layers, so the pass here walks its modules and taps the three tensors:

- pool: ``AvgPool`` after ``Mixed_7c`` (torch-fidelity's ``"2048"``); or, for small tests, one of its earlier
  pooled layers ``"64"``, ``"192"``, ``"768"``, which are not ADM's;
- spatial: ``Mixed_6d.branch1x1``. TF names the blocks ``mixed, mixed_1, ..., mixed_10``; torch-fidelity's
  converter maps them in order onto ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c``, so ``mixed_6`` is
  ``Mixed_6d``, and its ``mixed_6/conv/{conv2d_params, batchnorm}`` weights are ``Mixed_6d.branch1x1``'s. The
  tensor ``mixed_6/conv:0`` is the op that closes that scope, the ReLU after the batch norm: ``BasicConv2d``'s
  output, (B, 192, 17, 17). ADM keeps channels ``[..., :7]`` of the NHWC tensor and flattens it row-major, so
  here the map is cut to 7 channels and flattened in (height, width, channel) order: 17 * 17 * 7 = 2023 values,
  in the order of ADM's reference statistics ``mu_s`` / ``sigma_s``;
- logits: ``pool @ fc.weight.T`` (torch-fidelity's ``"logits_unbiased"``), which ADM's softmax graph computes.
"""
from __future__ import annotations

import os
import pickle

import torch
import torch.nn.functional as F

from dit_gspn.errors import UserError
from dit_gspn.hashing import sha256_file

from .weights import resolve_inception_weights

POOL, SPATIAL, LOGITS = "pool", "spatial", "logits"
#: torch-fidelity's pooled Inception layers that may serve as the pool features (2048 = ADM's pool_3).
POOL_LAYERS = ("64", "192", "768", "2048")
ADM_POOL_LAYER = "2048"
#: ADM's sFID keeps this many channels of mixed_6/conv (17 x 17 x 7 = 2023 values an image).
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


class WeightsError(UserError, ValueError):
    """Inception weights that are not a state dict of torch-fidelity's extractor."""


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


class InceptionFeatures:
    """uint8 (B, 3, H, W) images -> {"pool", "spatial", "logits"}: whichever of ADM's features are asked for,
    in float32 on the CPU, from one forward pass that stops after the deepest one."""

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu",
                 pool_layer: str = ADM_POOL_LAYER):
        if pool_layer not in POOL_LAYERS:
            raise UserError(f"the Inception feature layer must be one of {POOL_LAYERS}, got {pool_layer!r}")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = resolve_inception_weights(weights)
        self.sha256 = sha256_file(self.weights_path)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", [pool_layer],
                                              feature_extractor_weights_path=str(self.weights_path))
        except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise WeightsError(f"{self.weights_path} is not a state dict of torch-fidelity's "
                               f"FeatureExtractorInceptionV3: {err}") from err
        self.net = net.to(device)
        self.device = device
        self.pool_layer = pool_layer
        self.name = "inception-v3-compat"
        self.description = str(self.weights_path)

    def outputs(self, example: torch.Tensor | None = None) -> tuple[str, ...]:
        """What this extractor gives, whatever the images: all three of ADM's features."""
        return (POOL, SPATIAL, LOGITS)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, wanted=(POOL, SPATIAL, LOGITS)) -> dict[str, torch.Tensor]:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        net, wanted = self.net, set(wanted)
        found: dict[str, torch.Tensor] = {}

        def tap(name: str, value: torch.Tensor) -> bool:
            """Keep ``value`` as ``name`` if wanted; whether everything wanted is found (the pass can stop)."""
            if name in wanted:
                found[name] = value.float().cpu()
            return wanted <= found.keys()

        x = images.to(self.device).to(net.feature_extractor_internal_dtype)
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for block in (net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.MaxPool_1):
            x = block(x)
        if self.pool_layer == "64" and tap(POOL, _pooled(x)):
            return found
        for block in (net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.MaxPool_2):
            x = block(x)
        if self.pool_layer == "192" and tap(POOL, _pooled(x)):
            return found
        for block in (net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c):
            x = block(x)
        if SPATIAL in wanted:  # TF's mixed_6/conv:0, recomputed beside Mixed_6d (a 1x1 conv: under 1% of the pass)
            spatial = net.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]
            if tap(SPATIAL, spatial.permute(0, 2, 3, 1).flatten(1)):
                return found
        for block in (net.Mixed_6d, net.Mixed_6e):
            x = block(x)
        if self.pool_layer == "768" and tap(POOL, _pooled(x)):
            return found
        for block in (net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, net.AvgPool):
            x = block(x)
        pool = x.flatten(1)
        if self.pool_layer == ADM_POOL_LAYER and tap(POOL, pool):
            return found
        tap(LOGITS, pool @ net.fc.weight.T)
        return found
