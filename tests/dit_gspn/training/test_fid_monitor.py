"""FID while training: the logged FID and IS equal `python -m evaluation` on the same samples with the same extractor
(and FID from the features by scipy), a run with the monitor on trains bitwise the weights of one with it off and
resumes exactly, and the demo's Inception-free extractor is built into the run folder as a torch.export program,
labelled as such, without torch's TorchScript deprecation warning."""
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from safetensors.torch import load_file

from dit_gspn.data import ShapesDataset
from dit_gspn.image_npz import to_uint8, write_npz
from dit_gspn.metrics import evaluate
from dit_gspn.module_file import load_module, save_exported
from dit_gspn.training import ConfigError, train
from dit_gspn.training import fid_monitor
from evaluation.__main__ import main as evaluation_main
from helpers.training import tiny_config


class _TinyExtractor(nn.Module):
    """uint8 images -> (8 pooled conv features, 4 logits): a stand-in for Inception with the same contract."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, images):
        features = torch.tanh(self.conv(images.float() / 127.5 - 1)).mean((2, 3))
        return features, self.head(features)


@pytest.fixture
def extractor_and_reference(tmp_path):
    torch.manual_seed(21)
    extractor = save_exported(_TinyExtractor(), torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
                              tmp_path / "tiny_extractor.pt2")
    real = ShapesDataset(num_per_class=6, image_size=16, seed=77)
    images = write_npz(tmp_path / "real.npz", to_uint8(torch.stack([real[i][0] for i in range(len(real))])))
    reference = tmp_path / "real_stats.npz"
    evaluate(images, metrics=[], extractor=extractor, save_stats=reference)
    return extractor, reference


def _fid_config(run_dir, extractor, reference, **logging):
    config = tiny_config(run_dir, train={"objective": "flow", "steps": 4})
    config["logging"].update({"fid_every": 2, "fid_samples": 12, "fid_batch_size": 5, "fid_extractor": str(extractor),
                              "fid_reference": str(reference), **logging})
    return config


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "fid" / "metrics.jsonl").read_text().splitlines()]


def _scipy_fid(a: np.ndarray, b_mu: np.ndarray, b_sigma: np.ndarray) -> float:
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma @ b_sigma).real
    return float(((mu - b_mu) ** 2).sum() + np.trace(sigma + b_sigma - 2 * covmean))


def test_logged_fid_equals_python_m_evaluation_on_the_same_samples(tmp_path, extractor_and_reference,
                                                                   fresh_accelerate_state, capsys):
    extractor, reference = extractor_and_reference
    run = train(_fid_config(tmp_path / "run", extractor, reference))
    log = _log(run.run_dir)
    assert [e["step"] for e in log] == [2, 4]
    assert log[-1]["feature_extractor"] == "torch.export tiny_extractor.pt2" and log[-1]["num_samples"] == 12
    samples = run.run_dir / "fid" / "samples.npz"
    with np.load(samples) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (12, 16, 16, 3) and sorted(np.bincount(labels, minlength=10)) == [1] * 8 + [2] * 2

    printed = "".join(capsys.readouterr())  # one console line per evaluation, naming the log that keeps them all
    for entry in log:
        assert f"step {entry['step']}: FID {entry['fid']:.2f}, IS {entry['is']:.2f} of 12 EMA samples" in printed
    assert printed.count(str(run.run_dir / "fid" / "metrics.jsonl")) == 2
    assert evaluation_main([str(samples), str(reference), "--extractor", str(extractor), "--metrics", "fid", "isc",
                            "--cache-dir", "", "--quiet"]) == 0
    cli = json.loads(capsys.readouterr().out)["metrics"]
    assert log[-1]["fid"] == cli["fid"]
    assert log[-1]["is"] == cli["inception_score"]
    # and both equal FID written out with scipy on the extractor's own features
    features = load_module(extractor)(torch.from_numpy(images).permute(0, 3, 1, 2))[0].detach().double().numpy()
    with np.load(reference) as ref:
        assert log[-1]["fid"] == pytest.approx(_scipy_fid(features, ref["mu"], ref["sigma"]), rel=1e-5, abs=1e-8)


def _weights(checkpoint: Path, folder: str) -> dict:
    return load_file(str(next((checkpoint / folder).glob("*.safetensors"))))


def test_the_monitor_changes_no_weight_and_resumes_exactly(tmp_path, extractor_and_reference,
                                                           fresh_accelerate_state):
    extractor, reference = extractor_and_reference
    off = train(tiny_config(tmp_path / "off", train={"objective": "flow", "steps": 4}))
    on = train(_fid_config(tmp_path / "on", extractor, reference))
    halfway = _fid_config(tmp_path / "parts", extractor, reference)
    halfway["train"]["steps"] = 2
    train(halfway)
    resumed = train(_fid_config(tmp_path / "parts", extractor, reference), resume="latest")
    for folder in ("model", "ema"):
        expected = _weights(off.checkpoint, folder)
        for run in (on, resumed):
            got = _weights(run.checkpoint, folder)
            assert all(torch.equal(expected[k], got[k]) for k in expected), (folder, run.run_dir)
    def without_timings(log):
        return [{k: v for k, v in entry.items() if not k.endswith("seconds")} for entry in log]

    assert without_timings(_log(on.run_dir)) == without_timings(_log(resumed.run_dir))  # the same samples


def test_the_shapes_extractor_and_reference_are_built_into_the_run_and_labelled(tmp_path, monkeypatch, recwarn,
                                                                                fresh_accelerate_state):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(fid_monitor, "SHAPES_CLASSIFIER_PER_CLASS", 8)
    monkeypatch.setattr(fid_monitor, "SHAPES_CLASSIFIER_EPOCHS", 1)
    config = tiny_config(tmp_path / "run", train={"objective": "flow", "steps": 2})
    config["logging"].update(fid_every=2, fid_samples=10, fid_extractor="dataset", tensorboard=True)
    run = train(config)
    folder = run.run_dir / "fid"
    assert (folder / "silhouette_classifier.pt2").is_file() and (folder / "reference_stats.npz").is_file()
    with np.load(folder / "reference_stats.npz") as ref:
        assert ref["mu"].shape == (64,) and int(ref["count"]) == 120  # 6 per class, 10 classes, and their flips
    entry = _log(run.run_dir)[0]
    assert entry["feature_extractor"] == "torch.export silhouette_classifier.pt2" and entry["is"] is not None
    assert not [str(w.message) for w in recwarn if "torch.jit" in str(w.message)]  # no TorchScript anywhere
    events = EventAccumulator(str(run.run_dir / "tensorboard")).Reload()
    assert {"eval/fid_silhouette_classifier", "eval/is_silhouette_classifier"} <= set(events.Tags()["scalars"])


def test_fid_settings_are_checked(tmp_path, extractor_and_reference):
    extractor, reference = extractor_and_reference
    with pytest.raises(ConfigError, match="needs logging.fid_reference"):
        train(_fid_config(tmp_path / "a", extractor, reference, fid_reference=None))
    with pytest.raises(ConfigError, match="missing.npz does not exist"):
        train(_fid_config(tmp_path / "b", extractor, tmp_path / "missing.npz"))
    with pytest.raises(ConfigError, match="is not a file"):
        train(_fid_config(tmp_path / "c", tmp_path / "none.pt", reference))
    with pytest.raises(ConfigError, match="fid_weights are Inception's"):
        train(_fid_config(tmp_path / "d", extractor, reference, fid_weights=str(reference)))
