"""dit_gspn.metrics.weights: where the Inception weights come from, and the error when they are nowhere."""
import pytest

from dit_gspn.metrics import weights as weights_module
from dit_gspn.metrics import ENV_WEIGHTS, resolve_inception_weights


def test_missing_weights_error_names_both_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    monkeypatch.setattr(weights_module.torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(weights_module.torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match=rf"--weights or \${ENV_WEIGHTS}.*network is unreachable"):
        resolve_inception_weights()
    monkeypatch.setenv(ENV_WEIGHTS, str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match=rf"nope.pt \(from \${ENV_WEIGHTS}\) do not exist"):
        resolve_inception_weights()
