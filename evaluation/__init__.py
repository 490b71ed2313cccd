"""The evaluation jobs' command line, built on ``dit_gspn.metrics``: ``python -m evaluation`` (ADM's FID, sFID,
Inception Score, precision and recall, and KID, between samples and a reference) and ``python -m
evaluation.reference`` (a reference's statistics from a folder of images)."""
from dit_gspn.metrics import (ENV_WEIGHTS, METRICS, EvalInput, EvalInputError, InceptionFeatures, Settings, evaluate,
                              open_input, resolve_inception_weights, write_statistics)

__all__ = ["ENV_WEIGHTS", "METRICS", "EvalInput", "EvalInputError", "InceptionFeatures", "Settings", "evaluate",
           "open_input", "resolve_inception_weights", "write_statistics"]
