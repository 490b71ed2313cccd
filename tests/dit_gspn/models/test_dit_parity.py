"""The attention model is DiT: the official state-dict layout, and diffusers' DiTTransformer2DModel's output.

The official key set is written out below from facebookresearch/DiT's models.py (timm's
PatchEmbed/Attention/Mlp inside); an official checkpoint is exactly such a dict. The numerical
oracle is diffusers' independent implementation, loaded with the same weights through the
mapping of diffusers' scripts/convert_dit_to_diffusers.py. Two known differences are set in
diffusers' model here, not in ours: its timestep frequencies divide by (half - 1)
(``downscale_freq_shift=1``; DiT divides by half) and its MLP LayerNorm eps defaults to 1e-5
(DiT: 1e-6).
"""
import numpy as np
import torch

from dit_gspn.models import DiT, create_model, sincos_pos_embed_2d


def official_dit_shapes(input_size, patch_size, in_channels, hidden_size, depth, num_classes,
                        mlp_ratio=4.0, learn_sigma=True):
    """{key: shape} of facebookresearch/DiT's ``DiT(...).state_dict()`` (class_dropout_prob > 0)."""
    C, p = hidden_size, patch_size
    out_channels = 2 * in_channels if learn_sigma else in_channels
    mlp = int(C * mlp_ratio)
    shapes = {
        "pos_embed": (1, (input_size // p) ** 2, C),
        "x_embedder.proj.weight": (C, in_channels, p, p),
        "x_embedder.proj.bias": (C,),
        "t_embedder.mlp.0.weight": (C, 256),
        "t_embedder.mlp.0.bias": (C,),
        "t_embedder.mlp.2.weight": (C, C),
        "t_embedder.mlp.2.bias": (C,),
        "y_embedder.embedding_table.weight": (num_classes + 1, C),
    }
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3 * C, C),
            f"blocks.{i}.attn.qkv.bias": (3 * C,),
            f"blocks.{i}.attn.proj.weight": (C, C),
            f"blocks.{i}.attn.proj.bias": (C,),
            f"blocks.{i}.mlp.fc1.weight": (mlp, C),
            f"blocks.{i}.mlp.fc1.bias": (mlp,),
            f"blocks.{i}.mlp.fc2.weight": (C, mlp),
            f"blocks.{i}.mlp.fc2.bias": (C,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * C, C),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * C,),
        })
    shapes.update({
        "final_layer.linear.weight": (p * p * out_channels, C),
        "final_layer.linear.bias": (p * p * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * C, C),
        "final_layer.adaLN_modulation.1.bias": (2 * C,),
    })
    return shapes


def test_dit_xl2_has_the_official_checkpoint_layout_and_loads_it_strictly():
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    shapes = official_dit_shapes(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                                 num_classes=1000)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    # DiT's train.py logs "DiT Parameters: 675,129,632" for DiT-XL/2 (its frozen pos_embed included).
    assert sum(int(np.prod(s)) for s in shapes.values()) == 675_129_632
    checkpoint = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model.load_state_dict(checkpoint, strict=True, assign=True)


def official_to_diffusers(sd, depth):
    """Official DiT keys -> DiTTransformer2DModel keys (diffusers' convert_dit_to_diffusers.py mapping)."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"]}
    for i in range(depth):
        pre, blk = f"transformer_blocks.{i}.", f"blocks.{i}."
        emb = pre + "norm1.emb."
        out[emb + "timestep_embedder.linear_1.weight"] = sd["t_embedder.mlp.0.weight"]
        out[emb + "timestep_embedder.linear_1.bias"] = sd["t_embedder.mlp.0.bias"]
        out[emb + "timestep_embedder.linear_2.weight"] = sd["t_embedder.mlp.2.weight"]
        out[emb + "timestep_embedder.linear_2.bias"] = sd["t_embedder.mlp.2.bias"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        out[pre + "norm1.linear.weight"] = sd[blk + "adaLN_modulation.1.weight"]
        out[pre + "norm1.linear.bias"] = sd[blk + "adaLN_modulation.1.bias"]
        for kind in ("weight", "bias"):
            q, k, v = sd[blk + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out[pre + f"attn1.to_q.{kind}"], out[pre + f"attn1.to_k.{kind}"], out[pre + f"attn1.to_v.{kind}"] = q, k, v
            out[pre + f"attn1.to_out.0.{kind}"] = sd[blk + f"attn.proj.{kind}"]
            out[pre + f"ff.net.0.proj.{kind}"] = sd[blk + f"mlp.fc1.{kind}"]
            out[pre + f"ff.net.2.{kind}"] = sd[blk + f"mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"proj_out_1.{kind}"] = sd[f"final_layer.adaLN_modulation.1.{kind}"]
        out[f"proj_out_2.{kind}"] = sd[f"final_layer.linear.{kind}"]
    return out


def test_attention_model_computes_what_diffusers_dit_computes_with_the_same_weights():
    from diffusers import DiTTransformer2DModel

    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_classes=10)
    shapes = official_dit_shapes(**cfg)
    # A random "official checkpoint" (never zeros: adaLN-Zero would make every output 0).
    checkpoint = {k: 0.2 * torch.randn(s) for k, s in shapes.items()}
    checkpoint["pos_embed"] = sincos_pos_embed_2d(32, 4, 4).unsqueeze(0)

    ours = DiT(**cfg, num_heads=4, mixer="attention").eval()
    ours.load_state_dict(checkpoint, strict=True)

    theirs = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
        norm_eps=1e-6,  # DiT's MLP LayerNorm eps (diffusers' default is 1e-5)
    ).eval()
    theirs.load_state_dict(official_to_diffusers(checkpoint, depth=2), strict=True)
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # DiT divides the frequencies by half, not half - 1
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed.pos_embed, rtol=0, atol=1e-6)

    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([3, 9, 10])  # 10 = the null class
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    assert got.shape == (3, 8, 8, 8)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
