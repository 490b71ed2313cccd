"""FID (and IS) while training: every ``logging.fid_every`` steps the EMA draws ``logging.fid_samples`` images
and the metric core that ``python -m evaluation`` runs (``dit_gspn.metrics.evaluate``) scores them against a
reference statistics file.

The images are the same at every evaluation but for the weights: sample i has class ``class_labels(N, K,
"balanced", seed)[i]`` and its own noise generator (``index_generators``), so the result does not depend on
how many processes drew it. Each process draws its share (indices rank, rank + P, ...); they are gathered
(accelerate's ``gather``) and the main process writes them to ``<run_dir>/fid/samples.npz`` (ADM's layout,
replaced at each evaluation), scores that file with ``dit_gspn.metrics.evaluate`` and appends the metrics to
``<run_dir>/fid/metrics.jsonl`` and TensorBoard (``eval/fid_<extractor>``, ``eval/is_<extractor>``). So
``python -m evaluation <run_dir>/fid/samples.npz REFERENCE [--extractor FILE]`` gives the logged numbers.
Every RNG the sampling could touch is saved before and restored after, so a run with the monitor on trains
the same weights as one with it off, and resumes exactly.

``logging.fid_extractor``: null for Inception (``logging.fid_weights``, else the metrics' search order), an
extractor file, ``torch.export`` (.pt2) or TorchScript (see ``dit_gspn.metrics.ExtractorFile``), or ``dataset``:
the dataset kind's own features (``TrainingData.fid_features``), made once into ``<run_dir>/fid/`` with the
reference statistics of the training images. The built-in shapes' are a silhouette classifier trained on fresh
shapes, its pooled conv features and logits (``dit_gspn.metrics.shapes_classifier``, ``shapes_reference``). That
FID is not an Inception FID.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dit_gspn.checkpoint.rng_state import rng_state, set_rng_state
from dit_gspn.image_npz import to_uint8, write_npz
from dit_gspn.sampling import sample
from dit_gspn.sampling.batch import class_labels, index_generators
from dit_gspn.vae import decode, load_vae

from .config import DATASET_FEATURES, ConfigError, LoggingConfig

#: The demo's silhouette classifier for FID: trained on this many shapes per class for this many epochs, on a
#: seed of its own (which the training data never uses).
SHAPES_CLASSIFIER_PER_CLASS, SHAPES_CLASSIFIER_EPOCHS, SHAPES_CLASSIFIER_SEED = 200, 2, 90_001


@contextmanager
def untouched_rng():
    """Whatever runs inside leaves Python's, NumPy's and torch's global RNGs (CPU and CUDA) as it found them."""
    spare = torch.Generator()
    state = rng_state(spare)
    try:
        yield
    finally:
        set_rng_state(state, spare)


def shapes_reference(folder: Path, dataset, image_size: int) -> tuple[Path, Path]:
    """(extractor file, reference statistics file) for FID on the built-in shapes in ``folder``, made if missing:
    the silhouette classifier as a ``FeatureExtractor`` ``torch.export`` program, and the FID statistics of every
    image of ``dataset`` under it, computed by ``dit_gspn.metrics.evaluate``."""
    from dit_gspn.metrics import Settings, evaluate
    from dit_gspn.metrics.shapes_classifier import FeatureExtractor, silhouette, train_classifier
    from dit_gspn.module_file import save_exported

    extractor, reference = folder / "silhouette_classifier.pt2", folder / "reference_stats.npz"
    if extractor.is_file() and reference.is_file():
        return extractor, reference
    folder.mkdir(parents=True, exist_ok=True)
    reference.unlink(missing_ok=True)  # statistics under an extractor that is gone are made again with the new one
    with untouched_rng():
        classifier, _ = train_classifier(image_size, SHAPES_CLASSIFIER_PER_CLASS, SHAPES_CLASSIFIER_EPOCHS,
                                         SHAPES_CLASSIFIER_SEED, view=silhouette)
        save_exported(FeatureExtractor(classifier), torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8),
                      extractor)
    images = write_npz(folder / "reference_images.npz",
                       to_uint8(torch.stack([dataset[i][0] for i in range(len(dataset))])))
    evaluate(images, metrics=[], extractor=extractor, save_stats=reference, settings=Settings(device="cpu"))
    images.unlink()  # the statistics are what FID needs; the images are the run's own training data
    return extractor, reference


def _has_logits(extractor: Path, image_size: tuple[int, int]) -> bool:
    """Whether an extractor file returns (features, logits), so that IS can be computed."""
    from dit_gspn.metrics import ExtractorFile

    example = torch.zeros(1, 3, *image_size, dtype=torch.uint8)
    return "logits" in ExtractorFile(extractor).outputs(example)


class FidMonitor:
    """Draws, gathers and scores the EMA's samples every ``logging.fid_every`` steps; every process calls it. Its
    caller runs ``FidMonitor.check`` first, before the run starts."""

    def __init__(self, accelerator, run_dir: str | Path, data, logging: LoggingConfig, seed: int):
        self.acc = accelerator
        self.folder = Path(run_dir) / "fid"
        self.info, self.logging, self.seed = data.sampling_info, logging, seed
        self.every, self.count, self.batch_size = logging.fid_every, logging.fid_samples, logging.fid_batch_size
        self.labels = class_labels(self.count, self.info.num_classes, "balanced", seed)
        self.indices = np.arange(self.acc.process_index, self.count, self.acc.num_processes)
        self.weights, self.extractor, self.reference = logging.fid_weights, logging.fid_extractor, \
            logging.fid_reference
        if self.extractor == DATASET_FEATURES:
            if self.acc.is_main_process:  # only the main process scores
                self.extractor, own_reference = data.fid_features(self.folder)
                self.reference = self.reference or own_reference
            self.acc.wait_for_everyone()
        #: The TensorBoard tags' suffix: which features the FID is of (an extractor file's name, or Inception).
        self.label = "inception" if self.extractor is None else Path(self.extractor).stem
        #: What the main process scores: FID, and IS where the features come with logits.
        self.metrics = (["fid", "isc"] if self.extractor is None or _has_logits(self.extractor, self.info.image_size)
                        else ["fid"]) if self.acc.is_main_process else None
        self._vae = None

    @staticmethod
    def check(logging: LoggingConfig, data) -> None:
        """What the FID monitor needs of the data, checked before a run starts: the dataset kind's own features
        for ``logging.fid_extractor=dataset``."""
        if logging.fid_extractor == DATASET_FEATURES and data.fid_features is None:
            raise ConfigError(f"logging.fid_extractor={DATASET_FEATURES} takes the dataset's own features, and this "
                              f"dataset kind has none: use Inception (null) or a feature-extractor file")

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def _draw(self, ema: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share: (uint8 (n, H, W, 3) images, their indices), padded to the largest share."""
        if self.info.vae is not None and self._vae is None:
            self._vae = load_vae(self.info.vae).to(self.acc.device)
        share = -(-self.count // self.acc.num_processes)
        images = []
        for chunk in np.array_split(self.indices, max(1, -(-len(self.indices) // self.batch_size))):
            if not len(chunk):
                continue
            out = sample(ema, torch.as_tensor(self.labels[chunk], device=self.acc.device),
                         sampler=self.logging.sampler, num_steps=self.logging.sample_steps,
                         cfg_scale=self.logging.cfg_scale, guidance_interval=self.logging.guidance_interval,
                         flow_shift=self.logging.flow_shift, generator=index_generators(self.seed, chunk),
                         clip_denoised=self.info.clip_denoised)
            images.append(torch.from_numpy(to_uint8(decode(out, self.info, self._vae))))
        h, w = self.info.image_size
        images = torch.cat(images) if images else torch.zeros(0, h, w, 3, dtype=torch.uint8)
        indices = torch.full((share,), -1, dtype=torch.long)
        indices[:len(self.indices)] = torch.as_tensor(self.indices)
        padded = torch.zeros(share, *images.shape[1:], dtype=torch.uint8)
        padded[:len(images)] = images
        return padded.to(self.acc.device), indices.to(self.acc.device)

    def evaluate(self, ema: torch.nn.Module, step: int, tensorboard=None) -> dict | None:
        """Draw and gather the samples and, on the main process, score them, log them and return the entry
        appended to ``metrics.jsonl`` (None on the other processes)."""
        from dit_gspn.metrics import Settings, evaluate  # torch-fidelity: imported only where FID is measured

        start = time.perf_counter()
        with untouched_rng():
            images, indices = self._draw(ema)
        images, indices = self.acc.gather(images).cpu(), self.acc.gather(indices).cpu()
        entry = None
        if self.acc.is_main_process:
            keep = indices >= 0
            order = indices[keep].argsort()
            samples = write_npz(self.folder / "samples.npz", images[keep][order].numpy(),
                                self.labels[indices[keep][order].numpy()])
            sample_seconds = time.perf_counter() - start
            report = evaluate(samples, self.reference, metrics=self.metrics, weights=self.weights,
                              extractor=self.extractor, settings=Settings(device=str(self.acc.device)),
                              cache_dir=None)
            values = report["metrics"]
            entry = {"step": step, "fid": values["fid"], "is": values.get("inception_score"),
                     "feature_extractor": report["settings"]["feature_extractor"],
                     "reference": str(self.reference), "num_samples": self.count,
                     "sample_seconds": round(sample_seconds, 2), "seconds": round(time.perf_counter() - start, 2)}
            with open(self.folder / "metrics.jsonl", "a") as log:
                log.write(json.dumps(entry) + "\n")
            if tensorboard is not None:
                tensorboard.add_scalar(f"eval/fid_{self.label}", entry["fid"], step)
                if entry["is"] is not None:
                    tensorboard.add_scalar(f"eval/is_{self.label}", entry["is"], step)
        self.acc.wait_for_everyone()
        return entry

    def describe(self, entry: dict) -> str:
        """One line for the console: the step, the FID (and IS) and the file that keeps every entry."""
        score = f"FID {entry['fid']:.2f}" + (f", IS {entry['is']:.2f}" if entry["is"] is not None else "")
        return (f"step {entry['step']}: {score} of {entry['num_samples']} EMA samples ({self.label} features, "
                f"{entry['seconds']:.0f} s) -> {self.folder / 'metrics.jsonl'}")
