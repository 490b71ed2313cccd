"""``sampling.json``: how a checkpoint's samples become images, read by sampling without loading any weights.

    {"vae": null | "<AutoencoderKL hub name or local path>", "latent_scale": 0.18215 | 1.0,
     "image_size": [H, W], "num_classes": int, "class_names": [...] | null, "objective": "ddpm" | "flow"}

(``objective``: a name in ``dit_gspn.diffusion.objective``'s registry; absent: "ddpm", DiT's.)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dit_gspn.diffusion import OBJECTIVES, DiffusionObjective
from dit_gspn.sizes import size_pair

from .json_values import is_count, is_number
from .safe_load import CheckpointError

SAMPLING_FILE = "sampling.json"


@dataclass
class SamplingInfo:
    """How a model's output becomes images: the VAE (None = pixel space), its latent scale, the image size,
    and the objective it was trained with, which decides the samplers that fit it
    (``dit_gspn.diffusion.samplers.check_sampling``)."""

    vae: str | None
    latent_scale: float
    image_size: tuple[int, int]
    num_classes: int
    class_names: list[str] | None = field(default=None)
    objective: str = DiffusionObjective.name

    @property
    def clip_denoised(self) -> bool:
        """Whether sampling clips predicted images to [-1, 1]: in pixel space, as ADM; never for latents."""
        return self.vae is None

    @classmethod
    def read(cls, path: str | Path) -> "SamplingInfo":
        """The SamplingInfo in ``path``; a CheckpointError naming the file and the key when it is missing,
        truncated, or holds a key of the wrong type."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} holds a {type(raw).__name__}, not the JSON object of a checkpoint's "
                                  f"sampling settings")
        missing = [k for k in ("vae", "latent_scale", "image_size", "num_classes") if k not in raw]
        if missing:
            raise CheckpointError(f"{path} lacks the key(s) {missing}; expected vae, latent_scale, image_size, "
                                  f"num_classes and class_names")

        def wrong(key: str, want: str):
            return CheckpointError(f"{path}: {key} must be {want}, got {raw[key]!r}")

        if raw["vae"] is not None and not isinstance(raw["vae"], str):
            raise wrong("vae", "null (pixel space) or an AutoencoderKL name or folder")
        scale = raw["latent_scale"]
        if not is_number(scale) or not scale > 0:
            raise wrong("latent_scale", "a number > 0")
        count = raw["num_classes"]
        if not is_count(count, 1):
            raise wrong("num_classes", "an integer >= 1")
        size = size_pair(raw["image_size"], f"{path}: image_size", CheckpointError)
        names = raw.get("class_names")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise wrong("class_names", "null or a list of strings")
        if names is not None and len(names) != count:
            raise CheckpointError(f"{path}: class_names has {len(names)} entries but num_classes is {count}")
        objective = raw.get("objective", DiffusionObjective.name)
        if objective not in OBJECTIVES:
            raise CheckpointError(f"{path}: objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
        return cls(raw["vae"], float(scale), size, count, names, objective)

    def write(self, path: str | Path) -> None:
        data = asdict(self)
        data["image_size"] = list(self.image_size)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
