"""dit_gspn.sampling.model_loader: a model to sample from a training checkpoint (EMA or raw weights), a
save_pretrained folder or a DiT state dict, and the errors that name what is wrong with one."""
import json

import pytest
import torch

from dit_gspn.models import create_model
from dit_gspn.checkpoint import SamplingInfo
from dit_gspn.sampling.model_loader import load_model
from dit_gspn.vae import DEFAULT_VAE, load_vae

from helpers.tiny_models import tiny_dit, write_training_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread", "reference_scan")


def test_load_training_checkpoint_ema_and_raw_weights(tmp_path):
    model = tiny_dit(num_classes=3)
    ema = write_training_checkpoint(tmp_path, model, class_names=["a", "b", "c"])
    loaded, info = load_model(tmp_path)
    raw, _ = load_model(tmp_path, weights="model")
    for ours, theirs in ((loaded, ema), (raw, model)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert info == SamplingInfo(None, 1.0, (8, 8), 3, ["a", "b", "c"])


def test_load_save_pretrained_folder_and_dit_state_dict(tmp_path):
    model = tiny_dit(in_channels=4, num_classes=3)
    model.save_pretrained(tmp_path / "plain")
    _, info = load_model(tmp_path / "plain")
    assert info.vae == DEFAULT_VAE and info.latent_scale == 0.18215 and info.image_size == (64, 64)

    # An official-style DiT state dict (DiT-S/2 at 64 px = 8x8 latents): the size comes from pos_embed.
    torch.manual_seed(1)
    dit = create_model("DiT-S/2", input_size=8, num_classes=7)
    torch.save(dit.state_dict(), tmp_path / "DiT-S-2-64x64.pt")
    loaded, info = load_model(tmp_path / "DiT-S-2-64x64.pt", model_name="DiT-S/2", num_classes=7)
    assert loaded.input_size == 8 and info.image_size == (64, 64)
    torch.testing.assert_close(loaded.final_layer.adaLN_modulation[-1].weight,
                               dit.final_layer.adaLN_modulation[-1].weight, rtol=0, atol=0)


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither sampling.json"):
        load_model(tmp_path)
    (tmp_path / "sampling.json").write_text(json.dumps({"vae": None}))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['latent_scale', 'image_size', 'num_classes'\]"):
        load_model(tmp_path)
    # A sampling.json from before flow matching: DiT's objective; an unknown one is named with the file.
    info = {"vae": None, "latent_scale": 1.0, "image_size": [8, 8], "num_classes": 3}
    (tmp_path / "sampling.json").write_text(json.dumps(info))
    assert SamplingInfo.read(tmp_path / "sampling.json").objective == "ddpm"
    (tmp_path / "sampling.json").write_text(json.dumps({**info, "objective": "edm"}))
    with pytest.raises(ValueError, match=r"sampling.json: objective 'edm' is not one of ddpm, flow"):
        SamplingInfo.read(tmp_path / "sampling.json")
    with pytest.raises(FileNotFoundError, match="could not load the VAE 'no-such/vae'.*--vae DIR"):
        load_vae("no-such/vae")
