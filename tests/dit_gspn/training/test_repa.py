"""dit_gspn.training.repa: the loss against cosine similarity written out, where its gradient goes (the projector and
the blocks up to the chosen one, never the encoder or what comes after), and training runs with it: off or at
coefficient 0 the weights are bitwise those of a run without it, and a resumed run is bitwise an uninterrupted one."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_gspn.models import create_model
from dit_gspn.checkpoint import SamplingInfo
from dit_gspn.training import ConfigError, list_checkpoints, train
from dit_gspn.training.encoders import load_encoder
from dit_gspn.training.repa import PROJECTOR_DIR, RepresentationAlignment, alignment_loss, features_on_grid

from helpers.training import tiny_config


def test_loss_is_the_mean_negative_cosine_similarity_written_out():
    g = torch.Generator().manual_seed(0)
    projected, target = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(3, 5, 7, generator=g,
                                                                                             dtype=torch.float64)
    by_hand = []
    for b in range(3):
        for n in range(5):
            p, t = projected[b, n].tolist(), target[b, n].tolist()
            dot = sum(a * c for a, c in zip(p, t))
            by_hand.append(-dot / (math.sqrt(sum(a * a for a in p)) * math.sqrt(sum(c * c for c in t))))
    assert alignment_loss(projected, target).item() == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-12)
    assert alignment_loss(target * 3.0, target).item() == pytest.approx(-1.0, abs=1e-12)  # scale does not count
    with pytest.raises(ValueError, match="differ in shape"):
        alignment_loss(projected, target[:, :4])


def test_features_become_row_major_tokens_and_are_resized_bilinearly_to_the_grid():
    features = torch.randn(2, 4, 3, 5)
    tokens = features_on_grid(features, (3, 5))
    assert tokens.shape == (2, 15, 4)
    assert torch.equal(tokens[1, 2 * 5 + 3], features[1, :, 2, 3])  # token (i, j) is row-major index i * w + j
    # Halving the grid by bilinear interpolation (no corner alignment) averages each 2 x 2 block.
    fine = torch.randn(2, 4, 6, 10)
    coarse = features_on_grid(fine, (3, 5))
    blocks = fine.reshape(2, 4, 3, 2, 5, 2).mean((3, 5))
    torch.testing.assert_close(coarse, blocks.flatten(2).transpose(1, 2))


def _random_model(depth=4, name="GSPN-S/4"):
    torch.manual_seed(5)
    heads = {} if name.startswith("GSPN-paper") else {"num_heads": 2}
    model = create_model(name, hidden_size=32, depth=depth, input_size=16, in_channels=3, num_classes=4,
                         learn_sigma=False, **heads)
    with torch.no_grad():  # away from adaLN-Zero's zeros, so that every parameter takes part
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.train()


@pytest.mark.parametrize("name", ["GSPN-S/4", "GSPN-paper-S/4"])  # DiT blocks; the authors' pre-norm U-ViT blocks
def test_gradient_reaches_the_projector_and_the_blocks_up_to_the_chosen_one_only(encoder_file, name):
    model = _random_model(name=name)
    encoder = load_encoder(str(encoder_file))
    info = SamplingInfo(vae=None, latent_scale=1.0, image_size=(16, 16), num_classes=4)
    repa = RepresentationAlignment(model, encoder, block=2, coefficient=0.5, projector_dim=16, info=info)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    targets = repa.targets(x)
    assert targets.shape == (3, 16, 6) and not targets.requires_grad
    model(x + 0.1 * torch.randn_like(x), torch.rand(3) * 1000, torch.tensor([0, 1, 3]))
    term, alignment = repa.loss(repa.projector, targets)
    assert term.item() == pytest.approx(0.5 * alignment.item(), rel=1e-6)
    term.backward()

    def reached(module):
        return [n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]

    assert len(reached(repa.projector)) == len(list(repa.projector.parameters()))
    for k, block in enumerate(model.blocks):
        names = reached(block)
        if k < 2:
            assert names, f"block {k + 1} got no gradient"
        else:
            assert not names, f"block {k + 1} (after the aligned one) got a gradient in {names}"
    assert not reached(model.final_layer)
    assert reached(model.x_embedder) and reached(model.t_embedder) and reached(model.y_embedder)
    assert not encoder.training and all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    model.train()  # training the model does not put the encoder (not a submodule) into training mode
    assert not encoder.training
    with pytest.raises(RuntimeError, match="did not run"):
        repa.loss(repa.projector, targets)  # each forward's tokens are used once


def _repa_config(run_dir, encoder_file, **repa):
    return {**tiny_config(run_dir, train={"objective": "flow", "steps": 4}),
            "repa": {"block": 1, "encoder": str(encoder_file), "projector_dim": 16, **repa}}


def _weights(checkpoint: Path, folder: str) -> dict:
    return load_file(str(next((checkpoint / folder).glob("*.safetensors"))))


def _assert_equal_states(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_repa_at_coefficient_zero_trains_bitwise_the_weights_of_a_run_without_it(tmp_path, encoder_file,
                                                                                 fresh_accelerate_state):
    off = train(tiny_config(tmp_path / "off", train={"objective": "flow", "steps": 4}))
    assert not (off.checkpoint / PROJECTOR_DIR).exists()  # off: nothing of REPA in the checkpoint
    zero = train(_repa_config(tmp_path / "zero", encoder_file, coefficient=0.0))
    for folder in ("model", "ema"):
        _assert_equal_states(_weights(off.checkpoint, folder), _weights(zero.checkpoint, folder))
    on = train(_repa_config(tmp_path / "on", encoder_file, coefficient=0.5))
    assert not torch.equal(_weights(off.checkpoint, "model")["blocks.0.adaLN_modulation.1.weight"],
                           _weights(on.checkpoint, "model")["blocks.0.adaLN_modulation.1.weight"])
    assert _weights(on.checkpoint, PROJECTOR_DIR).keys() == {f"{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")}


def test_resume_with_repa_is_bitwise_an_uninterrupted_run(tmp_path, encoder_file, fresh_accelerate_state):
    whole = train(_repa_config(tmp_path / "whole", encoder_file))
    halfway = _repa_config(tmp_path / "parts", encoder_file)
    halfway["train"]["steps"] = 2
    train(halfway)
    resumed = train(_repa_config(tmp_path / "parts", encoder_file), resume="latest")
    assert resumed.step == whole.step == 4 and [p.name for p in list_checkpoints(tmp_path / "parts")][-1] == "0000004"
    for folder in ("model", "ema", PROJECTOR_DIR):
        _assert_equal_states(_weights(whole.checkpoint, folder), _weights(resumed.checkpoint, folder))


def test_repa_settings_are_checked(tmp_path, encoder_file, fresh_accelerate_state):
    with pytest.raises(ConfigError, match="repa.block=1 needs repa.encoder"):
        train({**tiny_config(tmp_path / "a"), "repa": {"block": 1}})
    with pytest.raises(ConfigError, match=r"repa.block=3 must lie in \[1, 2\]"):
        train(_repa_config(tmp_path / "b", encoder_file, block=3))


def test_on_latents_the_encoder_sees_the_vae_decoding_on_the_token_grid(tmp_path, encoder_file):
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    model = create_model("GSPN-S/2", hidden_size=32, depth=2, num_heads=2, input_size=8, in_channels=4,
                         num_classes=3, learn_sigma=False)
    info = SamplingInfo(vae=str(tmp_path / "vae"), latent_scale=0.18215, image_size=(16, 16), num_classes=3)
    encoder = load_encoder(str(encoder_file))
    repa = RepresentationAlignment(model, encoder, block=1, coefficient=0.5, projector_dim=8, info=info)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        images = vae.eval().decode(latents / 0.18215).sample.clamp(-1, 1)
        expected = encoder(images)  # (2, 6, 8, 8): the 16 px images' features, on the 4 x 4 grid of patch 2
    expected = torch.nn.functional.interpolate(expected, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(repa.targets(latents), expected.flatten(2).transpose(1, 2))
