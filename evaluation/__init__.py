"""Evaluation of samples: FID, IS, KID and precision/recall through torch-fidelity (`python -m evaluation`)."""
from .fidelity import METRICS, InceptionFeatures, ScriptedFeatures, Settings, evaluate, fid_stats, write_stats
from .inputs import EvalInput, open_input
from .weights import ENV_WEIGHTS, resolve_inception_weights

__all__ = ["ENV_WEIGHTS", "METRICS", "EvalInput", "InceptionFeatures", "ScriptedFeatures", "Settings", "evaluate", "fid_stats",
           "open_input", "resolve_inception_weights", "write_stats"]
