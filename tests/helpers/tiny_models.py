"""Tiny models for CPU tests, and the checkpoint folder training writes, made without training."""
import copy

import torch
import torch.nn as nn

from dit_gspn.models import create_model
from dit_gspn.checkpoint import SamplingInfo


def tiny_dit(in_channels=3, num_classes=5, input_size=8, learn_sigma=True, mixer="gspn", seed=0):
    """A 2-block DiT small enough for CPU tests; its zero-initialised output layer gets random weights so
    that samples depend on the model."""
    torch.manual_seed(seed)
    model = create_model("GSPN-S/2" if mixer == "gspn" else "DiT-S/2", depth=2, hidden_size=32, num_heads=2,
                         input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                         learn_sigma=learn_sigma)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.05)
    return model.eval()


def write_training_checkpoint(path, model, class_names=None, vae=None, latent_scale=1.0, image_size=(8, 8)):
    """The layout the trainer writes: model/ and ema/ (save_pretrained) and sampling.json."""
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(path / "model")
    ema.save_pretrained(path / "ema")
    SamplingInfo(vae, latent_scale, image_size, model.num_classes, class_names).write(path / "sampling.json")
    return ema


def tiny_encoder() -> nn.Module:
    """A frozen-to-be conv encoder: (B, 3, 16, 16) images -> (B, 6, 8, 8) features."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1))
