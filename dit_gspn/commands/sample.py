"""Sample a trained GSPN-DiT / DiT: a labelled grid PNG, or (with --num-samples) an ADM-layout .npz for FID
(``dit-gspn-sample``, or ``python sample.py`` in the checkout).

    python sample.py --ckpt runs/exp/checkpoints/0050000 --classes 1 2 3 --out grid.png
    accelerate launch sample.py --ckpt PATH --num-samples 50000 --out samples.npz --cfg-scale 1.5
    python sample.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --vae stabilityai/sd-vae-ft-ema

Batch mode is resumable: run the same command again after a kill and finished shards are kept.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from dit_gspn.checkpoint import WEIGHT_FOLDERS
from dit_gspn.cli import MAX_IMAGE_SIDE, MAX_SEED, ArgumentParser, check_output_file, command, int_range
from dit_gspn.errors import UserError
from dit_gspn.diffusion import SAMPLERS, check_sampling, default_sampler
from dit_gspn.diffusion.samplers import SamplerSettingError
from dit_gspn.host_memory import retain_freed_host_memory
from dit_gspn.sampling.batch import CLASS_MODES, BatchPlan, check_batch_output, index_generators, run_batch
from dit_gspn.sampling.labelled_grid import default_grid_classes, save_labelled_grid
from dit_gspn.sampling.model_loader import checkpoint_sha256, load_model, read_checkpoint_info
from dit_gspn.sampling.sampler import check_cfg_scale, check_guidance_interval, model_size, sample
from dit_gspn.vae import decode, load_vae, vae_scale_factor

#: The most samples one grid image holds (a grid is for looking at; --num-samples writes an .npz of any size).
MAX_GRID_SAMPLES = 10_000
#: The most samples a batch .npz holds: 200 times ADM's 50,000 (a typo such as 10**12 is refused at once).
MAX_BATCH_SAMPLES = 10_000_000


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    src = p.add_argument_group("model")
    src.add_argument("--ckpt", required=True, help="a training checkpoint dir (sampling.json, ema/, model/), a "
                     "save_pretrained folder, or with --model DiT's or SiT's .pt (a released state dict or their "
                     "train.py checkpoint)")
    src.add_argument("--weights", choices=WEIGHT_FOLDERS, default="ema", help="which weights of a training checkpoint")
    src.add_argument("--model", default=None, help="zoo name (e.g. DiT-XL/2), or SiT-XL/2 etc. for a SiT model, "
                     "of a .pt --ckpt; its sizes and class count are read from the state dict's shapes")
    src.add_argument("--num-heads", type=int_range(1), default=None,
                     help="attention heads of a .pt --ckpt whose width is not the zoo model's")
    src.add_argument("--vae", default=None, help="AutoencoderKL hub name or local folder (overrides the checkpoint's)")
    src.add_argument("--image-size", type=int, nargs="+", default=None, metavar=("H", "W"),
                     help="pixels; another size than the training one needs a model without positional embedding")

    smp = p.add_argument_group("sampler")
    smp.add_argument("--sampler", choices=SAMPLERS.names(), default=None,
                     help="default: the checkpoint's objective's (ddpm for DiT's diffusion, euler for flow matching)")
    smp.add_argument("--num-steps", type=int, default=None, help="default: the sampler's (" + ", ".join(
                     f"{name} {spec.default_steps}" for name, spec in SAMPLERS.items()) + ")")
    smp.add_argument("--cfg-scale", type=float, default=1.0, help="1 = no classifier-free guidance")
    smp.add_argument("--guided-channels", type=int_range(1), default=None,
                     help="guide only the first N channels (3 = DiT's published FIDs); default all")
    smp.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                     help="guide only steps whose noise level (model timestep / 1000) is in [LOW, HIGH]")
    smp.add_argument("--flow-shift", type=float, default=1.0,
                     help="flow samplers: SD3's timestep shift of the grid, s' = k s / (1 + (k - 1) s); 1 = none")
    smp.add_argument("--seed", type=int_range(0, MAX_SEED), default=0)
    smp.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the model and the VAE decode")
    smp.add_argument("--batch-size", type=int_range(1), default=32, help="images per forward pass (= per shard)")
    smp.add_argument("--decode-batch-size", type=int_range(1), default=32)
    smp.add_argument("--cpu", action="store_true", help="sample on CPU even if a GPU is there")

    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, help="grid PNG (default samples/grid.png) or .npz in batch mode")
    out.add_argument("--classes", type=int, nargs="+", default=None, help="grid mode: class ids")
    out.add_argument("--per-class", type=int_range(1), default=1, help="grid mode: samples per class (one row each)")
    out.add_argument("--num-samples", type=int_range(1), default=None, help="batch mode: how many samples in the .npz")
    out.add_argument("--class-mode", choices=CLASS_MODES, default="uniform",
                     help="batch mode: i.i.d. uniform classes, or balanced (N / num_classes each)")
    out.add_argument("--keep-shards", action="store_true", help="batch mode: keep <out>.shards/ after assembling")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args) -> None:
    """The arguments' ranges and combinations, before anything is loaded."""
    if args.image_size is not None and (len(args.image_size) not in (1, 2) or min(args.image_size) < 1):
        p.error(f"--image-size takes H or H W (positive pixels), got {' '.join(map(str, args.image_size))}")
    if args.image_size is not None and max(args.image_size) > MAX_IMAGE_SIDE:
        p.error(f"--image-size {' '.join(map(str, args.image_size))}: at most {MAX_IMAGE_SIDE} pixels a side")
    if args.per_class > MAX_GRID_SAMPLES:
        p.error(f"--per-class {args.per_class}: a grid holds at most {MAX_GRID_SAMPLES} samples; draw more with "
                f"--num-samples (an .npz)")
    if args.num_samples is not None and args.num_samples > MAX_BATCH_SAMPLES:
        p.error(f"--num-samples {args.num_samples}: at most {MAX_BATCH_SAMPLES} samples in one .npz")
    for option, check, value in (("--cfg-scale", check_cfg_scale, args.cfg_scale),
                                 ("--guidance-interval", check_guidance_interval, args.guidance_interval)):
        try:
            check(value)
        except ValueError as err:
            p.error(f"{option}: {err}")
    if args.classes is not None and min(args.classes) < 0:
        p.error(f"--classes are class ids >= 0, got {args.classes}")
    batch = args.num_samples is not None
    if batch and args.classes is not None:
        p.error("--classes is for a grid; batch mode (--num-samples) draws classes by --class-mode")
    if args.out is not None:
        suffix = Path(args.out).suffix.lower()
        if batch and suffix != ".npz":
            p.error(f"--out {args.out}: batch mode (--num-samples) writes an .npz")
        # An existing folder is named as such by check_output_file.
        if not batch and suffix not in (".png", ".jpg", ".jpeg", ".webp") and not Path(args.out).is_dir():
            p.error(f"--out {args.out}: a grid is written as an image (.png), or pass --num-samples for an .npz")


def _pixel_size(args) -> tuple[int, int] | None:
    if args.image_size is None:
        return None
    return (args.image_size[0], args.image_size[-1])


def map_size(model, info, vae, pixels: tuple[int, int] | None) -> tuple[int, int]:
    """The (H, W) of the map the model samples for an image of ``pixels`` (None: the training size)."""
    if pixels is None:
        return model_size(model)
    factor = (vae_scale_factor(vae) if vae is not None else 1) * model.patch_size
    if pixels[0] % factor or pixels[1] % factor:
        raise UserError(f"--image-size {pixels[0]} {pixels[1]} must be divisible by {factor} (the VAE's factor "
                        f"{factor // model.patch_size} x the model's patch size {model.patch_size})")
    factor //= model.patch_size
    return (pixels[0] // factor, pixels[1] // factor)


def check_classes(classes: list[int] | None, num_classes: int) -> None:
    bad = [c for c in (classes or []) if c >= num_classes]
    if bad:
        raise UserError(f"--classes {bad}: the model has {num_classes} classes, ids 0..{num_classes - 1}")


def grid_classes(args, num_classes: int) -> list[int]:
    """The grid's classes (``--classes``, or the model's defaults), at most ``MAX_GRID_SAMPLES`` samples in all."""
    classes = args.classes if args.classes is not None else default_grid_classes(num_classes)
    if len(classes) * args.per_class > MAX_GRID_SAMPLES:
        raise UserError(f"--per-class {args.per_class} x {len(classes)} classes = {len(classes) * args.per_class} "
                        f"samples: a grid holds at most {MAX_GRID_SAMPLES}; draw more with --num-samples (an .npz)")
    return classes


def main(argv=None) -> int:
    from accelerate import PartialState

    args = parse_args(argv)
    retain_freed_host_memory()
    # Everything the arguments and the checkpoint's sampling.json can tell is checked before any weights load.
    info = read_checkpoint_info(args.ckpt, args.weights, args.model, _pixel_size(args), args.vae)
    sampler = args.sampler or default_sampler(info.objective)
    try:
        _, num_steps = check_sampling(sampler, info.objective, args.num_steps, args.flow_shift)
    except SamplerSettingError as err:
        raise UserError(f"--{err.setting.replace('_', '-')}: {err}") from err
    if args.guided_channels is not None and info.vae is None and args.guided_channels > 3:
        raise UserError(f"--guided-channels {args.guided_channels}: a pixel-space model has 3 channels")
    if args.model is None:  # a .pt file's class count is known once its shapes are read
        check_classes(args.classes, info.num_classes)
    if args.num_samples is not None:
        check_batch_output(args.out or "samples/samples.npz")
    else:
        grid_classes(args, info.num_classes)  # its size, before the model loads
        check_output_file(args.out or "samples/grid.png")

    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    model, info = load_model(args.ckpt, args.weights, args.model, _pixel_size(args), args.vae, args.num_heads)
    check_classes(args.classes, info.num_classes)
    model.to(state.device)
    vae = load_vae(info.vae, state.device) if info.vae is not None else None
    size = map_size(model, info, vae, _pixel_size(args))
    if size != model_size(model) and getattr(model, "pos_embed", None) is not None and state.is_main_process:
        print(f"note: sampling at {size} instead of the training size {model_size(model)} with a model that has a "
              f"positional embedding (recomputed for the new grid); GSPN models without one are built for this",
              file=sys.stderr)
    sampler_kwargs = dict(sampler=sampler, num_steps=num_steps, cfg_scale=args.cfg_scale,
                          guided_channels=args.guided_channels, guidance_interval=args.guidance_interval,
                          flow_shift=args.flow_shift, clip_denoised=info.clip_denoised)

    if args.num_samples is not None:
        out = args.out or "samples/samples.npz"
        plan = BatchPlan(args.num_samples, info.num_classes, args.batch_size, args.class_mode, args.seed)
        settings = dict(ckpt=str(Path(args.ckpt).resolve()), checkpoint_sha256=checkpoint_sha256(args.ckpt, args.weights),
                        weights=args.weights, model=args.model, objective=info.objective, vae=info.vae,
                        size=list(size), bf16=args.bf16, **sampler_kwargs)
        run_batch(model, plan, out, info=info, settings=settings, vae=vae, rank=state.process_index,
                  world_size=state.num_processes, barrier=state.wait_for_everyone, keep_shards=args.keep_shards,
                  size=size, bf16=args.bf16, decode_batch_size=args.decode_batch_size, **sampler_kwargs)
    elif state.is_main_process:
        classes = grid_classes(args, info.num_classes)
        labels = [c for c in classes for _ in range(args.per_class)]
        autocast = torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=args.bf16)
        with autocast:
            out = sample(model, labels, generator=index_generators(args.seed, range(len(labels))), size=size,
                         progress=True, **sampler_kwargs)
            images = decode(out, info, vae, args.decode_batch_size)
        path = save_labelled_grid(images, labels, args.out or "samples/grid.png", info.class_names,
                                  nrow=args.per_class if args.per_class > 1 else None)
        print(f"wrote {path} ({len(labels)} samples of classes {classes})", flush=True)

    state.wait_for_everyone()  # the main process's grid is written before any process leaves
    return 0


run = command(main)

if __name__ == "__main__":
    sys.exit(run())
