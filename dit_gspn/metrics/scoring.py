"""ADM's five numbers (FID, sFID, Inception Score, precision, recall) and KID between two inputs, each input read
once, in memory that grows with the number of images only by the pool features precision/recall and KID need.

One pass over an input's images gives everything asked of it: the running moments of the pool and spatial
features (FID and sFID statistics, ``Moments``), the Inception Score's split sums (``InceptionScore``) and, for
precision/recall and KID, the pool features themselves (D floats an image). Stored statistics (a statistics
file, or ADM's reference batch with ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` beside ``arr_0``) are used as they
are, as ADM's evaluator uses them. Statistics computed from images are cached under ``cache_dir``, keyed by the
input's sha256 and the extractor's (torch-fidelity's own cache key leaves the weights out).

The report's ``metrics``: ``fid``, ``sfid``, ``inception_score`` (and ``_std`` over its splits), ``precision``,
``recall``, ``kid`` (and ``kid_std``), whichever were computed.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dit_gspn.errors import OutputExistsError

from .extractor_file import ExtractorFile
from .frechet import frechet_distance
from .inception import ADM_POOL_LAYER, LOGITS, POOL, SPATIAL, InceptionFeatures
from .inception_score import ADM_SPLIT_SIZE, InceptionScore
from .inputs import EvalInput, EvalInputError, open_input
from .moments import Moments
from .precision_recall import ADM_NEIGHBOURHOOD, precision_recall
from .statistics import write_statistics

#: Every metric, in the order of ADM's table (KID last: ADM does not report it).
METRICS = ("fid", "sfid", "isc", "prc", "kid")
#: FID from fewer samples than this is biased far above its 50K value (ADM, DiT and torch-fidelity use 50K).
FID_MIN_SAMPLES = 10_000


@dataclass
class Settings:
    """The knobs of the metrics, at ADM's values where ADM has them (k = 3, IS splits of 5000)."""

    batch_size: int = 64
    isc_split_size: int = ADM_SPLIT_SIZE
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_neighborhood: int = ADM_NEIGHBOURHOOD
    #: Rows and columns of one block of pairwise distances (memory only: any size gives the same result).
    prc_block_size: int = 2048
    rng_seed: int = 2020
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    stats_from_images: bool = False
    #: Inception's pool layer for FID (one of ``POOL_LAYERS``; ``InceptionFeatures`` checks it).
    feature_layer: str = ADM_POOL_LAYER


def load_extractor(extractor=None, weights=None, settings: Settings | None = None):
    """The feature source: Inception with ``weights`` (default), an extractor file (a path), or ``extractor``
    itself when it is already one (an object with ``name``, ``sha256``, ``description``, ``outputs(example)``
    and ``__call__(images, wanted)``)."""
    settings = settings or Settings()
    if extractor is not None and weights is not None:
        raise EvalInputError("give Inception --weights or an --extractor, not both")
    if extractor is None:
        return InceptionFeatures(weights, settings.device, settings.feature_layer)
    if isinstance(extractor, (str, os.PathLike)):
        return ExtractorFile(extractor, settings.device)
    return extractor


def _spatial_stats_of(source: EvalInput, outputs, settings: Settings) -> bool:
    """Whether ``source`` can give sFID statistics: stored ones, or images and an extractor with spatial features."""
    if source.uses_stored_stats(settings.stats_from_images):
        return "spatial" in source.stored
    return source.has_images and SPATIAL in outputs


def check_metrics(requested: list[str] | None) -> None:
    """An EvalInputError naming the first of ``requested`` that is not in ``METRICS``."""
    unknown = [m for m in requested or () if m not in METRICS]
    if unknown:
        raise EvalInputError(f"unknown metric {unknown[0]!r}; choose from {METRICS}")


def wanted_metrics(first: EvalInput, second: EvalInput | None, requested: list[str] | None, outputs,
                   settings: Settings) -> tuple[list[str], list[str]]:
    """(the metrics to compute, notes on the ones left out): those requested (names in ``METRICS``:
    ``check_metrics``), checked against what the inputs and the extractor allow, or all they allow."""
    possible = {
        "fid": second is not None,
        "sfid": second is not None and all(_spatial_stats_of(s, outputs, settings) for s in (first, second)),
        "isc": first.has_images and LOGITS in outputs,
        "prc": second is not None and first.has_images and second.has_images,
        "kid": second is not None and first.has_images and second.has_images,
    }
    if requested is None:
        notes = []
        if second is not None and not possible["sfid"]:
            lacking = [str(s.path) for s in (first, second) if not _spatial_stats_of(s, outputs, settings)]
            notes.append(f"no sFID: {' and '.join(lacking)} give no spatial statistics (mu_s, sigma_s: a statistics "
                         f"file from before sFID, or an extractor without spatial features)")
        return [m for m in METRICS if possible[m]], notes
    check_metrics(requested)
    for metric in requested:
        if not possible[metric]:
            if second is None and metric != "isc":
                why = "it needs two inputs"
            elif metric in ("kid", "prc"):
                why = "it needs images on both sides, and a statistics file holds none"
            elif metric == "sfid":
                why = ("a statistics file without mu_s/sigma_s, or an extractor without spatial features, gives "
                       "no spatial statistics")
            elif not first.has_images:
                why = "the first input holds statistics only, no images"
            else:
                why = "the feature extractor returns no logits"
            raise EvalInputError(f"cannot compute {metric}: {why}")
    return [m for m in METRICS if m in requested], []


def _sample_count_warnings(first: EvalInput, second: EvalInput | None, chosen: list[str], settings: Settings,
                           inception: bool) -> list[str]:
    """What makes these metrics less meaningful than they look: too few samples for FID, a shrunk KID subset."""
    notes = []
    dim = int(settings.feature_layer) if inception else None  # an extractor file's width is not the layer's
    if "fid" in chosen:
        for source in (first, second):
            if source.has_images and not source.uses_stored_stats(settings.stats_from_images):
                if dim is not None and source.count <= dim:
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


@dataclass
class Measured:
    """What one pass over an input's images gave."""

    pool: Moments | None = None
    spatial: Moments | None = None
    score: InceptionScore | None = None
    features: torch.Tensor | None = None  # (N, D) pool features, kept for precision/recall and KID
    count: int = 0


def measure(source: EvalInput, net, wanted: set[str], *, moments: bool, keep_features: bool, settings: Settings,
            progress: bool = False) -> Measured:
    """One pass over ``source``'s images through ``net``: the moments of the pool (and spatial, if wanted)
    features when ``moments``, the IS sums if LOGITS is wanted, the pool features themselves if
    ``keep_features``; nothing else of the images stays in memory."""
    result = Measured(score=InceptionScore(settings.isc_split_size) if LOGITS in wanted else None)
    with tqdm(total=source.count, unit="img", desc=f"features {source.path.name}", disable=not progress,
              leave=False) as bar:
        for images in source.batches(settings.batch_size):
            found = net(images, wanted=tuple(wanted))
            n = len(images)
            if moments:
                result.pool = result.pool or Moments(found[POOL].shape[1])
                result.pool.add(found[POOL])
                if SPATIAL in found:
                    result.spatial = result.spatial or Moments(found[SPATIAL].shape[1])
                    result.spatial.add(found[SPATIAL])
            if keep_features:
                if result.features is None:
                    result.features = torch.empty(source.count, found[POOL].shape[1])
                result.features[result.count:result.count + n] = found[POOL]
            if result.score is not None:
                result.score.add(found[LOGITS])
            result.count += n
            bar.update(n)
    return result


def _stored(source: EvalInput, net, settings: Settings, spatial: bool) -> tuple[dict, dict | None]:
    """A statistics input's (pool, spatial or None) statistics, after checking they came from this extractor."""
    inception = isinstance(net, InceptionFeatures)
    made_with = source.metadata().get("weights_sha256")
    what, flag = ("Inception weights", "--weights") if inception else ("the feature extractor", "--extractor")
    if made_with is not None and made_with != net.sha256:
        raise EvalInputError(f"{source.path} was computed with {what} sha256 {made_with[:12]}…, but these are "
                             f"{net.sha256[:12]}…: recompute it with the same {flag}")
    pool = source.stats()
    if inception and pool["mu"].shape[0] != int(settings.feature_layer):
        raise EvalInputError(f"{source.path} holds statistics of {pool['mu'].shape[0]}-d features, but the feature "
                             f"layer is {settings.feature_layer}: pass --feature-layer {pool['mu'].shape[0]} or "
                             f"recompute them")
    return pool, (source.stats(spatial=True) if spatial else None)


def _first_image(sides: list) -> torch.Tensor | None:
    """One image (1, 3, H, W) of the first input that holds images, for an extractor to show its outputs on; None
    when both hold statistics only."""
    for side in sides:
        if side.source.has_images:
            batches = side.source.batches(1)
            example = next(batches)
            batches.close()
            return example
    return None


@dataclass
class _Side:
    """One input's statistics and where they came from."""

    source: EvalInput
    pool: dict | None = None
    spatial: dict | None = None
    origin: str | None = None
    measured: Measured = field(default_factory=Measured)


def _same_width(a: _Side, b: _Side, key: str, metric: str) -> tuple[dict, dict]:
    """The two sides' ``key`` ("pool" or "spatial") statistics, after checking they have the same feature width."""
    first, second = getattr(a, key), getattr(b, key)
    if first["mu"].shape != second["mu"].shape:
        raise EvalInputError(f"the {'sFID' if metric == 'sfid' else 'FID'} statistics of {a.source.path} and "
                             f"{b.source.path} have different feature widths ({first['mu'].shape[0]} and "
                             f"{second['mu'].shape[0]}): they come from different extractors or feature layers; "
                             f"recompute one with the other's")
    return first, second


def evaluate(input1: str | Path, input2: str | Path | None = None, *, metrics: list[str] | None = None,
             weights: str | os.PathLike | None = None, settings: Settings | None = None,
             cache_dir: str | Path | None = None, save_stats: str | Path | None = None,
             progress: bool = False, extractor=None) -> dict:
    """Compare ``input1`` (the samples) with ``input2`` (the reference); returns the JSON-ready report.

    IS is computed on input1; precision is input1's samples inside input2's manifold, recall the converse.
    ``save_stats`` writes input1's statistics (FID's and, with Inception, sFID's) to a new, reusable ``.npz``
    (an existing file there is refused, not replaced).
    ``extractor``: an extractor file (``ExtractorFile``) or feature source instead of Inception.
    """
    import torch_fidelity
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    settings = settings or Settings()
    start = time.perf_counter()
    if save_stats is not None and Path(save_stats).exists():  # a reference's statistics would be replaced by these
        raise OutputExistsError(f"--save-stats {save_stats} already exists (the statistics of other images?): "
                                f"delete it or choose another path")
    first = open_input(input1)
    second = open_input(input2) if input2 is not None else None
    sides = [_Side(s) for s in (first, second) if s is not None]
    for side in sides:
        side.source.check()  # a corrupt or odd-sized input is named before the weights load
    check_metrics(metrics)  # before the weights load
    net = load_extractor(extractor, weights, settings)
    outputs = net.outputs(_first_image(sides))
    chosen, warnings = wanted_metrics(first, second, metrics, outputs, settings)
    if not chosen and save_stats is None:
        raise EvalInputError("nothing to compute: give two inputs, or images for IS, or --save-stats")
    warnings += _sample_count_warnings(first, second, chosen, settings, isinstance(net, InceptionFeatures))
    cache = Path(cache_dir) if cache_dir is not None else None

    for side in sides:
        source, is_first = side.source, side.source is first
        needs_stats = "fid" in chosen or "sfid" in chosen or (is_first and save_stats is not None)
        keep_features = bool({"prc", "kid"} & set(chosen))
        wanted = {POOL} if keep_features else set()
        if is_first and "isc" in chosen:
            wanted.add(LOGITS)
        moments = False
        if needs_stats and source.uses_stored_stats(settings.stats_from_images):
            side.pool, side.spatial = _stored(source, net, settings, "spatial" in source.stored)
            side.origin = "stored"
        elif needs_stats:
            cached = (cache / f"{source.sha256[:32]}-{net.sha256[:16]}-{settings.feature_layer}-stats.npz"
                      if cache is not None else None)
            hit = cached is not None and cached.is_file() and ("sfid" not in chosen or
                                                                "spatial" in open_input(cached).stored)
            if hit:  # a pass that other metrics need does not recompute the moments
                cached_input = open_input(cached)
                side.pool = cached_input.stats()
                side.spatial = cached_input.stats(spatial=True) if "spatial" in cached_input.stored else None
                side.origin = f"cache {cached}"
            else:
                moments = True
                wanted |= {POOL} | ({SPATIAL} if SPATIAL in outputs else set())
        if wanted:
            side.measured = measure(source, net, wanted, moments=moments, keep_features=keep_features,
                                    settings=settings, progress=progress)
        if moments:
            side.pool = side.measured.pool.statistics()
            side.spatial = side.measured.spatial.statistics() if side.measured.spatial is not None else None
            side.origin = "computed"
            if cache is not None:
                write_statistics(cached, side.pool, side.spatial, feature_extractor=net.name,
                                 weights_sha256=net.sha256, count=source.count, source_sha256=source.sha256)

    results, used = {}, {}
    a, b = sides[0], (sides[1] if len(sides) > 1 else None)
    for metric, key in (("fid", "pool"), ("sfid", "spatial")):
        if metric in chosen:
            results[metric] = frechet_distance(*_same_width(a, b, key, metric), settings.device)
    if "isc" in chosen:
        results["inception_score"], results["inception_score_std"] = a.measured.score.result()
        used["isc_splits"] = len(a.measured.score.scores)
    if "prc" in chosen:
        results["precision"], results["recall"] = precision_recall(
            b.measured.features, a.measured.features, k=settings.prc_neighborhood, block=settings.prc_block_size,
            device=settings.device)
    if "kid" in chosen:
        subset = min(settings.kid_subset_size, first.count, second.count)
        kid = kid_features_to_metric(a.measured.features, b.measured.features, kid_subsets=settings.kid_subsets,
                                     kid_subset_size=subset, rng_seed=settings.rng_seed, verbose=False)
        results["kid"], results["kid_std"] = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
        used["kid_subset_size"] = subset
    if save_stats is not None:
        write_statistics(save_stats, a.pool, a.spatial, feature_extractor=net.name, weights_sha256=net.sha256,
                         count=first.count or 0, source_sha256=first.sha256)

    layer = settings.feature_layer if isinstance(net, InceptionFeatures) else POOL
    inputs = []
    for side in sides:
        entry = side.source.describe()
        if side.origin is not None:
            entry["fid_statistics"] = side.origin
        inputs.append(entry)
    return {
        "metrics": results,
        "warnings": warnings,
        "inputs": inputs,
        "settings": dict(asdict(settings), **used, metrics=chosen, feature_extractor=net.name,
                         prc_features=f"{net.name} {layer}", weights=net.description, weights_sha256=net.sha256,
                         torch_fidelity=torch_fidelity.__version__, save_stats=str(save_stats) if save_stats else None),
        "seconds": round(time.perf_counter() - start, 2),
    }

