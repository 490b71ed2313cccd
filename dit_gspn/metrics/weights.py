"""Where the Inception-v3 weights come from: ``--weights``, ``$DIT_GSPN_INCEPTION_WEIGHTS``, or torch-fidelity's download."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dit_gspn.errors import MissingFileError

ENV_WEIGHTS = "DIT_GSPN_INCEPTION_WEIGHTS"


def inception_url() -> str:
    """torch-fidelity's URL of its converted Inception-v3 weights (torch-fidelity is imported only when needed)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def default_weights_path() -> Path:
    """Where torch-fidelity's download lands (and is picked up from): ``$TORCH_HOME/hub/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_url().rsplit("/", 1)[-1]


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """A local file holding the ``FeatureExtractorInceptionV3`` state dict.

    Order: ``path`` (``--weights``), then ``$DIT_GSPN_INCEPTION_WEIGHTS``, then torch-fidelity's cached
    download, then the download itself. Raises FileNotFoundError naming all of them when none works.
    """
    given = path or os.environ.get(ENV_WEIGHTS)
    if given:
        given = Path(given)
        if not given.is_file():
            source = "--weights" if path else f"${ENV_WEIGHTS}"
            raise MissingFileError(f"Inception weights {given} (from {source}) do not exist")
        return given
    cached = default_weights_path()
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(inception_url(), str(cached), progress=False)
    except Exception as err:  # no network, proxy, HTTP error: all end the same way for the user
        raise MissingFileError(
            f"no Inception-v3 weights: none given with --weights or ${ENV_WEIGHTS}, and torch-fidelity's "
            f"download from {inception_url()} failed ({type(err).__name__}: {err}). Download that file where "
            f"there is network and pass it with --weights PATH or ${ENV_WEIGHTS}=PATH (or put it at {cached})."
        ) from err
    return cached
