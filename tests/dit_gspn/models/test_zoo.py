"""dit_gspn.models.zoo: DiT's names for both mixers, an unknown name refused with the known ones, and every GSPN
model within 3% of its DiT twin's parameter count (DiT's published sizes for DiT)."""
import pytest
import torch

from dit_gspn.models import MODELS, GSPNMixer, create_model
from dit_gspn.registry import UnknownNameError


def test_zoo_names_are_dits_for_both_mixers():
    expected = {f"{fam}-{s}/{p}" for fam in ("GSPN", "DiT") for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    assert {name for name in MODELS if name.startswith(("GSPN-", "DiT-")) and "paper" not in name} == expected
    model = create_model("GSPN-S/4", input_size=16, depth=1)
    assert (model.config.hidden_size, model.config.num_heads, model.patch_size) == (384, 6, 4)
    assert model.config.mixer == "gspn" and create_model("DiT-S/8", depth=1).config.mixer == "attention"
    assert isinstance(model.blocks[0].mixer, GSPNMixer)
    # The zoo's GSPN models share gates, lam and u over 8 channel groups; overrides restore per-channel maps.
    assert model.blocks[0].mixer.gate_groups == 8 and model.blocks[0].mixer.lam_proj.out_features == 4 * 8
    assert model.blocks[0].mixer.proxy_dim == 384 // 4
    per_channel = create_model("GSPN-S/4", depth=1, mixer_kwargs=dict(group_lam_u=False)).blocks[0].mixer
    assert per_channel.lam_proj.out_features == per_channel.u_proj.out_features == 4 * 384
    assert create_model("GSPN-S/4", depth=1, mixer_kwargs=dict(gate_groups=None)).blocks[0].mixer.gate_groups == 384


def test_unknown_model_name_lists_the_known_names():
    with pytest.raises(UnknownNameError, match=r"unknown zoo model 'GSPN-M/2'.*GSPN-XL/2.*DiT-S/8"):
        create_model("GSPN-M/2")


def test_gspn_parameter_counts_are_within_three_percent_of_dit():
    counts = {}
    with torch.device("meta"):
        for name in MODELS:
            counts[name] = create_model(name).num_parameters()
    for size in ("S", "B", "L", "XL"):
        for p in (2, 4, 8):
            ratio = counts[f"GSPN-{size}/{p}"] / counts[f"DiT-{size}/{p}"]
            assert 0.97 <= ratio <= 1.03, (size, p, ratio)
    # DiT's published sizes (million parameters, the frozen pos_embed not counted).
    assert round(counts["DiT-XL/2"] / 1e6, 1) == 674.8 and round(counts["DiT-S/2"] / 1e6, 1) == 32.9
