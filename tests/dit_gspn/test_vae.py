"""dit_gspn.vae: latents decoded in batches through the VAE, divided by the latent scale first."""
import torch
from diffusers import AutoencoderKL

from dit_gspn.checkpoint import SamplingInfo
from dit_gspn.vae import decode, vae_scale_factor


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def test_decode_batches_through_the_vae_with_the_latent_scale():
    vae = tiny_vae()
    latents = torch.randn(5, 4, 4, 4)
    info = SamplingInfo("local", 0.18215, (8, 8), 3)
    images = decode(latents, info, vae, batch_size=2)
    with torch.no_grad():
        expected = vae.decode(latents / 0.18215).sample.clamp(-1, 1)
    assert images.shape == (5, 3, 8, 8)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-5)
    assert vae_scale_factor(vae) == 2
