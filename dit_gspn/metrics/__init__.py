"""ADM's evaluation metrics (FID, sFID, Inception Score, precision, recall) and KID, the feature extractors they
run on (torch-fidelity's Inception-v3 port, a user's extractor file, the demo's silhouette classifier), and the
statistics files they read and write. The evaluation commands (``python -m evaluation``) and the FID monitor of
training are built on this package. torch-fidelity is imported where it is used, so the package (and the shapes
classifier in it) imports on a machine without it."""
from .scoring import METRICS, Settings, evaluate, load_extractor, measure, wanted_metrics
from .extractor_file import ExtractorFile
from .frechet import frechet_distance
from .inception import LOGITS, POOL, POOL_LAYERS, SPATIAL, InceptionFeatures
from .inception_score import InceptionScore
from .inputs import EvalInput, EvalInputError, open_input
from .moments import Moments
from .precision_recall import manifold_radii, precision_recall
from .statistics import read_statistics, write_statistics
from .weights import ENV_WEIGHTS, resolve_inception_weights

__all__ = ["ENV_WEIGHTS", "EvalInput", "EvalInputError", "ExtractorFile", "InceptionFeatures", "InceptionScore",
           "LOGITS", "METRICS", "Moments", "POOL", "POOL_LAYERS", "SPATIAL", "Settings", "evaluate",
           "frechet_distance", "load_extractor", "manifold_radii", "measure", "open_input", "precision_recall",
           "read_statistics", "resolve_inception_weights", "wanted_metrics", "write_statistics"]
