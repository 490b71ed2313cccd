"""Encode an ImageNet-style folder into sharded VAE latents for training (resumable; one or many GPUs;
``dit-gspn-extract``, or ``python extract_latents.py`` in the checkout).

    python extract_latents.py --data /data/imagenet/train --out latents/imagenet256 --image-size 256
    accelerate launch --multi_gpu --num_processes 8 extract_latents.py --data ... --out ...

Re-running the same command skips the shards already written.
"""
from __future__ import annotations

import os
import sys

from dit_gspn.cli import MAX_IMAGE_SIDE, MAX_SEED, ArgumentParser, command, int_range
from dit_gspn.data.extract import DEFAULT_VAE, LATENT_SCALE, extract_latents

#: The most data-loader workers: four per CPU of this machine (more only compete for the same cores).
MAX_WORKERS = 4 * (os.cpu_count() or 1)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    parser.add_argument("--out", required=True, help="folder for the shards and index.json")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: hub name or local folder")
    parser.add_argument("--image-size", type=int_range(1, MAX_IMAGE_SIDE), default=256)
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="do not also encode mirrored images")
    parser.add_argument("--shard-size", type=int_range(1), default=4096, help="images per shard")
    parser.add_argument("--batch-size", type=int_range(1), default=32)
    parser.add_argument("--num-workers", type=int_range(0, MAX_WORKERS), default=4)
    parser.add_argument("--latent-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--latent-scale", type=float, default=LATENT_SCALE)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--seed", type=int_range(0, MAX_SEED), default=0,
                        help="seeds the sampling from the VAE posterior")
    args = parser.parse_args(argv)
    if not args.latent_scale > 0:
        parser.error(f"--latent-scale must be > 0, got {args.latent_scale}")
    index = extract_latents(args.data, args.out, vae=args.vae, image_size=args.image_size, flip=args.flip,
                            shard_size=args.shard_size, batch_size=args.batch_size, num_workers=args.num_workers,
                            latent_dtype=args.latent_dtype, seed=args.seed, latent_scale=args.latent_scale,
                            mixed_precision=args.mixed_precision)
    print(f"{index['num_latents']} latents of shape {tuple(index['latent_shape'])} in {len(index['shards'])} "
          f"shard(s) under {args.out}; {index['num_skipped']} unreadable file(s) skipped (listed in index.json)")
    return 0


run = command(main)

if __name__ == "__main__":
    sys.exit(run())
