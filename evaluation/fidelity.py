"""FID, Inception Score, KID and precision/recall between two inputs, computed by torch-fidelity.

Features come from torch-fidelity's ``inception-v3-compat`` extractor (the TF-FID Inception) with weights from
a local file (see ``weights.py``); the metrics are torch-fidelity's own functions on those features.
Precision/recall use the same Inception pool features (2048-d, k = 3), as ADM's evaluator does, so no VGG16
download is needed. FID statistics of image inputs are cached under ``cache_dir``, keyed by the input's
sha256 *and* the weights' sha256 (torch-fidelity's own cache key leaves the weights out).
"""
from __future__ import annotations

import os
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor
from tqdm.auto import tqdm

from dit_gspn.atomic_write import savez_atomically
from dit_gspn.hashing import sha256_file

from .inputs import EvalInput, EvalInputError, open_input
from .weights import resolve_inception_weights

FEATURE_EXTRACTOR = "inception-v3-compat"
POOL = "2048"
LOGITS = "logits_unbiased"
#: Inception layers torch-fidelity offers for FID / KID / precision-recall (2048 = the standard pool features).
FEATURE_LAYERS = ("64", "192", "768", "2048")
METRICS = ("fid", "isc", "kid", "prc")
#: FID from fewer samples than this is biased far above its 50K value (ADM, DiT and torch-fidelity use 50K).
FID_MIN_SAMPLES = 10_000


@dataclass
class Settings:
    """The knobs of the metrics (torch-fidelity's names and defaults, ADM's k = 3 for precision/recall)."""

    batch_size: int = 50
    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_neighborhood: int = 3
    prc_batch_size: int = 10000
    rng_seed: int = 2020
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    stats_from_images: bool = False
    feature_layer: str = POOL

    def __post_init__(self):
        if self.feature_layer not in FEATURE_LAYERS:
            raise EvalInputError(f"feature_layer must be one of {FEATURE_LAYERS}, got {self.feature_layer!r}")


class InceptionFeatures:
    """torch-fidelity's Inception-v3 with local weights: uint8 images -> the requested layers' features.

    ``layers`` is a subset of ``FEATURE_LAYERS`` and ``logits_unbiased`` (for IS); torch-fidelity stops the
    forward pass at the deepest one requested.
    """

    name = FEATURE_EXTRACTOR
    label = "inception"

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu",
                 layers: tuple[str, ...] = (POOL, LOGITS)):
        self.weights_path = resolve_inception_weights(weights)
        self.weights_sha256 = sha256_file(self.weights_path)
        try:
            model = create_feature_extractor(FEATURE_EXTRACTOR, list(layers), cuda=False, verbose=False,
                                             feature_extractor_weights_path=str(self.weights_path))
        except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise EvalInputError(f"{self.weights_path} is not a state dict of torch-fidelity's "
                                 f"FeatureExtractorInceptionV3: {err}") from err
        self.model = model.to(device)
        self.device = device
        self.layers = tuple(layers)

    @torch.no_grad()
    def __call__(self, source: EvalInput, batch_size: int, progress: bool = False) -> dict[str, torch.Tensor]:
        parts = {layer: [] for layer in self.layers}
        with tqdm(total=source.count, unit="img", desc=f"features {source.path.name}", disable=not progress,
                  leave=False) as bar:
            for batch in source.batches(batch_size):
                for layer, feature in self.batch_features(batch).items():
                    parts[layer].append(feature)
                bar.update(len(batch))
        return {layer: torch.cat(chunks) for layer, chunks in parts.items()}

    @torch.no_grad()
    def batch_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) images -> {layer: (B, D) features on the CPU}."""
        features = self.model.convert_features_tuple_to_dict(self.model(images.to(self.device)))
        return {layer: features[layer].cpu() for layer in self.layers}


class ScriptedFeatures(InceptionFeatures):
    """A TorchScript feature extractor in Inception's place (``--extractor FILE``): its module maps uint8
    (B, 3, H, W) images to (B, D) features, or to a pair (features, logits) whose logits serve IS. It stands
    for the layer ``layer``; the reports and statistics files name it ``torchscript <file name>`` and record
    the file's sha256, so that statistics of one extractor are never compared with another's."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", layers: tuple[str, ...] = (POOL, LOGITS)):
        self.weights_path = Path(path)
        if not self.weights_path.is_file():
            raise EvalInputError(f"feature extractor {self.weights_path} does not exist")
        self.weights_sha256 = sha256_file(self.weights_path)
        try:
            self.model = torch.jit.load(str(self.weights_path), map_location=device).eval()
        except (RuntimeError, ValueError) as err:
            raise EvalInputError(f"{self.weights_path} is not a TorchScript file (torch.jit.save): {err}") from err
        self.name = f"torchscript {self.weights_path.name}"
        self.label = self.weights_path.stem
        self.device = device
        self.layers = tuple(layers)

    @torch.no_grad()
    def batch_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(images.to(self.device))
        features, logits = out if isinstance(out, (tuple, list)) else (out, None)
        found = {}
        for layer in self.layers:
            if layer == LOGITS and logits is None:
                raise EvalInputError(f"{self.weights_path} returns features only, no logits: IS needs them "
                                     f"(pass --metrics without isc)")
            found[layer] = (logits if layer == LOGITS else features).float().flatten(1).cpu()
        return found


def fid_stats(features: torch.Tensor) -> dict[str, np.ndarray]:
    """torch-fidelity's mean and covariance of pool features, in float64 (ADM's reference files are float64)."""
    stats = fid_features_to_statistics(features)
    return {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}


def write_stats(path: str | Path, stats: dict, *, weights_sha256: str, count: int, source_sha256: str,
                feature_extractor: str = FEATURE_EXTRACTOR) -> Path:
    """A reference-statistics ``.npz`` (``mu``, ``sigma``, as ADM's) that records which extractor made it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return savez_atomically(path, mu=stats["mu"], sigma=stats["sigma"], feature_extractor=feature_extractor,
                            weights_sha256=weights_sha256, count=np.int64(count), source_sha256=source_sha256)


def _stored_stats(source: EvalInput, weights_sha256: str, layer: str, scripted: bool = False) -> dict:
    meta = source.metadata()
    made_with = meta.get("weights_sha256")
    what = "the feature extractor" if scripted else "Inception weights"
    if made_with is not None and made_with != weights_sha256:
        raise EvalInputError(f"{source.path} was computed with {what} sha256 {made_with[:12]}…, but these "
                         f"are {weights_sha256[:12]}…: recompute it with the same {'--extractor' if scripted else '--weights'}")
    stats = source.stats()
    if not scripted and stats["mu"].shape[0] != int(layer):
        raise EvalInputError(f"{source.path} holds statistics of {stats['mu'].shape[0]}-d features, but the feature "
                         f"layer is {layer}: pass --feature-layer {stats['mu'].shape[0]} or recompute them")
    return stats


def wanted_metrics(first: EvalInput, second: EvalInput | None, requested: list[str] | None) -> list[str]:
    """The metrics to compute: those requested (checked against what the inputs allow), or all they allow."""
    possible = {
        "isc": first.has_images,
        "fid": second is not None,
        "kid": second is not None and first.has_images and second.has_images,
        "prc": second is not None and first.has_images and second.has_images,
    }
    if requested is None:
        return [m for m in METRICS if possible[m]]
    for metric in requested:
        if metric not in METRICS:
            raise EvalInputError(f"unknown metric {metric!r}; choose from {METRICS}")
        if not possible[metric]:
            why = ("it needs two inputs" if second is None else
                   "it needs images on both sides, and a statistics file holds none" if metric in ("kid", "prc")
                   else "the first input holds statistics only, no images")
            raise EvalInputError(f"cannot compute {metric}: {why}")
    return [m for m in METRICS if m in requested]


def _sample_count_warnings(first: EvalInput, second: EvalInput | None, chosen: list[str],
                           settings: Settings, scripted: bool = False) -> list[str]:
    """What makes these metrics less meaningful than they look: too few samples for FID, a shrunk KID subset."""
    notes = []
    dim = int(settings.feature_layer)
    if "fid" in chosen:
        for source in (first, second):
            if source.has_images and not (source.has_stats and not settings.stats_from_images):
                if source.count <= dim and not scripted:  # a scripted extractor's width is not the layer's
                    notes.append(f"FID from {source.count} samples of {source.path}: the {dim}-d feature covariance "
                                 f"needs more than {dim} samples to be full rank, so this FID is not meaningful "
                                 f"(50,000 is the standard)")
                elif source.count < FID_MIN_SAMPLES:
                    notes.append(f"FID from {source.count} samples of {source.path} is biased upwards and not "
                                 f"comparable with published 50,000-sample FIDs")
    if "kid" in chosen:
        smallest = min(first.count, second.count)
        if smallest < settings.kid_subset_size:
            notes.append(f"KID subset size shrunk from {settings.kid_subset_size} to {smallest}, the smaller input's "
                         f"sample count")
    return notes


def evaluate(input1: str | Path, input2: str | Path | None = None, *, metrics: list[str] | None = None,
             weights: str | os.PathLike | None = None, settings: Settings | None = None,
             cache_dir: str | Path | None = None, save_stats: str | Path | None = None,
             progress: bool = False, extractor: str | os.PathLike | None = None) -> dict:
    """Compare ``input1`` (the samples) with ``input2`` (the reference); returns the JSON-ready report.

    IS is computed on input1; precision is input1's samples inside input2's manifold, recall the converse
    (torch-fidelity's convention). ``save_stats`` writes input1's FID statistics to a reusable ``.npz``.
    ``extractor``: a TorchScript feature extractor (``ScriptedFeatures``) instead of Inception.
    """
    if extractor is not None and weights is not None:
        raise EvalInputError("give Inception --weights or an --extractor, not both")
    settings = settings or Settings()
    start = time.perf_counter()
    first = open_input(input1)
    second = open_input(input2) if input2 is not None else None
    chosen = wanted_metrics(first, second, metrics)
    if not chosen and save_stats is None:
        raise EvalInputError("nothing to compute: give two inputs, or images for IS, or --save-stats")
    for source in (first, second):
        if source is not None:
            source.check()  # a corrupt or odd-sized input is named before the weights load
    layer = settings.feature_layer
    warnings = _sample_count_warnings(first, second, chosen, settings, scripted=extractor is not None)
    layers = (layer, LOGITS) if "isc" in chosen else (layer,)
    scripted = extractor is not None
    extractor = (ScriptedFeatures(extractor, settings.device, layers) if scripted
                 else InceptionFeatures(weights, settings.device, layers))
    cache = Path(cache_dir) if cache_dir is not None else None
    sources = [s for s in (first, second) if s is not None]

    need_features = {id(first): first.has_images and (bool({"isc", "kid", "prc"} & set(chosen)))}
    if second is not None:
        need_features[id(second)] = bool({"kid", "prc"} & set(chosen))
    stats, stats_origin, features = {}, {}, {}

    def get_features(source):
        if id(source) not in features:
            features[id(source)] = extractor(source, settings.batch_size, progress)
        return features[id(source)]

    for source in sources:
        needs_stats = "fid" in chosen or (source is first and save_stats is not None)
        if not needs_stats:
            continue
        if source.has_stats and not (settings.stats_from_images and source.has_images):
            stats[id(source)] = _stored_stats(source, extractor.weights_sha256, layer, scripted)
            stats_origin[id(source)] = "stored"
            continue
        cached = (cache / f"{source.sha256[:32]}-{extractor.weights_sha256[:16]}-fid{layer}-stats.npz"
                  if cache else None)
        if cached is not None and cached.is_file() and not need_features.get(id(source)):
            stats[id(source)], stats_origin[id(source)] = open_input(cached).stats(), f"cache {cached}"
            continue
        stats[id(source)] = fid_stats(get_features(source)[layer])
        stats_origin[id(source)] = "computed"
        if cached is not None:
            write_stats(cached, stats[id(source)], weights_sha256=extractor.weights_sha256, count=source.count,
                        source_sha256=source.sha256, feature_extractor=extractor.name)

    results, used = {}, {}
    if "fid" in chosen:
        if stats[id(first)]["mu"].shape != stats[id(second)]["mu"].shape:
            raise EvalInputError(f"the FID statistics of {first.path} and {second.path} have different feature "
                                 f"widths ({stats[id(first)]['mu'].shape[0]} and {stats[id(second)]['mu'].shape[0]}): "
                                 f"they come from different extractors")
        results.update(fid_statistics_to_metric(stats[id(first)], stats[id(second)], verbose=False))
    if "isc" in chosen:
        splits = min(settings.isc_splits, first.count)
        results.update(isc_features_to_metric(get_features(first)[LOGITS], splits, True, settings.rng_seed))
        used["isc_splits"] = splits
    if "kid" in chosen:
        subset = min(settings.kid_subset_size, first.count, second.count)
        results.update(kid_features_to_metric(get_features(first)[layer], get_features(second)[layer],
                                              kid_subsets=settings.kid_subsets, kid_subset_size=subset,
                                              rng_seed=settings.rng_seed, verbose=False))
        used["kid_subset_size"] = subset
    if "prc" in chosen:
        results.update(prc_features_to_metric(get_features(first)[layer], get_features(second)[layer],
                                              prc_neighborhood=settings.prc_neighborhood,
                                              prc_batch_size=settings.prc_batch_size, save_cpu_ram=True,
                                              verbose=False))
    if save_stats is not None:
        write_stats(save_stats, stats[id(first)], weights_sha256=extractor.weights_sha256, count=first.count or 0,
                    source_sha256=first.sha256, feature_extractor=extractor.name)

    inputs = []
    for source in sources:
        entry = source.describe()
        if id(source) in stats_origin:
            entry["fid_statistics"] = stats_origin[id(source)]
        inputs.append(entry)
    return {
        "metrics": results,
        "warnings": warnings,
        "inputs": inputs,
        "settings": dict(asdict(settings), **used, metrics=chosen, feature_extractor=extractor.name,
                         prc_features=f"{extractor.name} {layer}", weights=str(extractor.weights_path),
                         weights_sha256=extractor.weights_sha256, torch_fidelity=torch_fidelity.__version__,
                         save_stats=str(save_stats) if save_stats else None),
        "seconds": round(time.perf_counter() - start, 2),
    }
