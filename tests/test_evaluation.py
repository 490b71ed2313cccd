"""Evaluation: FID / IS / KID / precision-recall through torch-fidelity, checked against direct computations.

These tests run offline with a RANDOMLY INITIALISED Inception-v3 (torch-fidelity's architecture, convolutions
re-initialised Kaiming normal so its features are informative), saved to a local file and passed as the
weights. The numbers are therefore not comparable with published FIDs; what is tested is that the pipeline
computes the metrics of the features that this extractor gives.
"""
import hashlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from dit_gspn.cli import UserError
from dit_gspn.sampling.batch import write_npz
from evaluation import ENV_WEIGHTS, Settings, evaluate, resolve_inception_weights
from evaluation import open_input
from evaluation import weights as weights_module
from evaluation.fidelity import wanted_metrics
from evaluation.__main__ import main as evaluation_main

N = 10


class _Unloaded(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its constructor's weight loading skipped (there is no file yet)."""

    def load_state_dict(self, *args, **kwargs):
        return None


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A random Inception-v3 state dict (Kaiming-normal convolutions and classifier) saved to a local file."""
    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pt")
    torch.manual_seed(0)
    model = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(root / "empty.pt"))
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
    torch.save(model.state_dict(), root / "random-inception.pt")
    return root / "random-inception.pt"


def _images(seed, tint):
    """N smooth random 32x32 images (upsampled 4x4 noise), tinted so two sets differ in distribution."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (N, 4, 4, 3)) * np.asarray(tint)
    fine = np.kron(coarse, np.ones((1, 8, 8, 1))) + rng.normal(0, 0.05, (N, 32, 32, 3))
    return (np.clip(fine, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    a, b = _images(0, (1.0, 1.0, 1.0)), _images(1, (1.0, 0.4, 0.2))
    write_npz(root / "a.npz", a)
    write_npz(root / "b.npz", b)
    (root / "a_folder").mkdir()
    for i, image in enumerate(a):
        Image.fromarray(image).save(root / "a_folder" / f"{i:03d}.png")
    return dict(root=root, a=a, b=b)


# FID, KID and precision/recall read Inception's 64-d layer here (torch-fidelity's feature_layer option): the
# 2048-d pool layer runs the same code, but its 2048x2048 matrix functions take minutes on 2 busy cores.
LAYER = "64"
FAST = Settings(device="cpu", feature_layer=LAYER)


@pytest.fixture(scope="module")
def direct_features(random_weights, sets):
    """Features of both sets straight from torch-fidelity's extractor (no evaluation code involved)."""
    out = {}
    with torch.no_grad():
        for name, layers in (("a", [LAYER, "logits_unbiased"]), ("b", [LAYER])):
            model = FeatureExtractorInceptionV3("inception-v3-compat", layers,
                                                feature_extractor_weights_path=str(random_weights))
            features = model(torch.from_numpy(sets[name]).permute(0, 3, 1, 2).contiguous())
            out[name] = [f.double() for f in features]
            out[name][0] = out[name][0].numpy()
    return out


@pytest.fixture(scope="module")
def full_report(random_weights, sets):
    root = sets["root"]
    return evaluate(root / "a.npz", root / "b.npz", metrics=["fid", "kid", "prc"], weights=random_weights,
                    cache_dir=root / "cache", save_stats=root / "a_stats.npz", settings=FAST)


def _scipy_fid(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_equals_scipy_sqrtm_on_the_same_features(full_report, direct_features):
    expected = _scipy_fid(direct_features["a"][0], direct_features["b"][0])
    assert expected > 1.0  # the two sets do differ under this extractor
    assert full_report["metrics"]["frechet_inception_distance"] == pytest.approx(expected, rel=1e-3)


def test_inception_score_equals_direct_formula(random_weights, sets, direct_features):
    report = evaluate(sets["root"] / "a.npz", weights=random_weights, settings=Settings(isc_splits=1, device="cpu"))
    assert report["settings"]["metrics"] == ["isc"]  # one input: IS is all there is
    p = direct_features["a"][1].softmax(1)
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()
    assert report["metrics"]["inception_score_mean"] == pytest.approx(float(kl.exp()), rel=1e-5)
    assert report["metrics"]["inception_score_mean"] > 1 + 1e-4


def test_kid_and_precision_recall(full_report, direct_features):

    # KID with subsets of all N samples: every subset is the whole set, so it is the unbiased MMD^2 itself.
    x, y = direct_features["a"][0], direct_features["b"][0]
    kernel = lambda u, v: (u @ v.T / u.shape[1] + 1) ** 3  # noqa: E731 (torch-fidelity's polynomial kernel)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (N * (N - 1)) - 2 * kxy.mean()
    assert full_report["metrics"]["kernel_inception_distance_mean"] == pytest.approx(mmd, rel=1e-3)
    assert full_report["settings"]["kid_subset_size"] == N
    assert 0 <= full_report["metrics"]["precision"] <= 1 and 0 <= full_report["metrics"]["recall"] <= 1


def test_report_warns_of_too_few_samples_for_fid_and_a_shrunk_kid_subset(full_report):
    fid, fid_b, kid = full_report["warnings"]
    assert fid.startswith(f"FID from {N} samples of ") and "not meaningful" in fid and "b.npz" in fid_b
    assert kid == f"KID subset size shrunk from 1000 to {N}, the smaller input's sample count"


def test_report_names_inputs_hashes_counts_and_settings(full_report, sets, random_weights):
    root = sets["root"]
    first, second = full_report["inputs"]
    assert first["sha256"] == hashlib.sha256((root / "a.npz").read_bytes()).hexdigest()
    assert (first["kind"], first["count"], second["count"]) == ("npz", N, N)
    settings = full_report["settings"]
    assert settings["weights_sha256"] == hashlib.sha256(random_weights.read_bytes()).hexdigest()
    assert settings["metrics"] == ["fid", "kid", "prc"] and settings["feature_layer"] == LAYER
    json.dumps(full_report)  # JSON-ready as it is


def test_same_images_as_folder_and_npz_give_fid_zero(full_report, sets, random_weights):
    root = sets["root"]
    report = evaluate(root / "a_folder", root / "a.npz", metrics=["fid"], weights=random_weights,
                      cache_dir=root / "cache", settings=FAST)
    assert abs(report["metrics"]["frechet_inception_distance"]) < 1e-3
    assert report["inputs"][0]["kind"] == "folder" and report["inputs"][0]["count"] == N
    assert report["inputs"][1]["fid_statistics"].startswith("cache")  # a.npz's statistics came from the cache


def test_saved_statistics_serve_as_the_reference(full_report, sets, random_weights):
    root = sets["root"]
    with np.load(root / "a_stats.npz") as stats:
        assert stats["mu"].shape == (64,) and stats["sigma"].shape == (64, 64)
    # By default every metric the inputs allow: KID and precision/recall need images on both sides.
    assert wanted_metrics(open_input(root / "b.npz"), open_input(root / "a_stats.npz"), None) == ["fid", "isc"]
    report = evaluate(root / "b.npz", root / "a_stats.npz", metrics=["fid"], weights=random_weights,
                      cache_dir=root / "cache", settings=FAST)
    assert report["inputs"][1]["kind"] == "stats" and report["inputs"][1]["fid_statistics"] == "stored"
    assert report["metrics"]["frechet_inception_distance"] == pytest.approx(
        full_report["metrics"]["frechet_inception_distance"], rel=1e-6)


def test_cli_writes_the_json_report(full_report, sets, random_weights, tmp_path, capsys):
    root = sets["root"]
    code = evaluation_main([str(root / "a.npz"), str(root / "b.npz"), "--metrics", "fid", "--weights",
                            str(random_weights), "--cache-dir", str(root / "cache"), "--report",
                            str(tmp_path / "r.json"), "--quiet", "--device", "cpu", "--feature-layer", LAYER])
    assert code == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["metrics"]["frechet_inception_distance"] == pytest.approx(
        full_report["metrics"]["frechet_inception_distance"], rel=1e-9)
    assert json.loads(capsys.readouterr().out)["inputs"] == written["inputs"]


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


def test_input_errors_are_actionable(sets, random_weights, tmp_path):
    root = sets["root"]
    with pytest.raises(ValueError, match="cannot compute kid: it needs images on both sides"):
        evaluate(root / "b.npz", root / "a_stats.npz", metrics=["kid"], weights=random_weights, settings=FAST)
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="has neither arr_0"):
        evaluate(tmp_path / "junk.npz", root / "b.npz", weights=random_weights, settings=FAST)
    other = tmp_path / "other_stats.npz"
    with np.load(root / "a_stats.npz") as stats:
        np.savez(other, mu=stats["mu"], sigma=stats["sigma"], weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="computed with Inception weights sha256 000000000000"):
        evaluate(other, root / "b.npz", metrics=["fid"], weights=random_weights, settings=FAST)
    with pytest.raises(ValueError, match="statistics of 64-d features, but the feature layer is 2048"):
        evaluate(root / "a_stats.npz", root / "b.npz", metrics=["fid"], weights=random_weights)


def _user_folder(root):
    """Class folders as users have them: sizes that differ, PNG and JPEG, a nested folder, one corrupt file."""
    rng = np.random.default_rng(3)
    sizes = {"cat/a.png": (40, 52), "cat/sub/b.jpg": (64, 48), "cat/c.png": (33, 33), "dog/d.png": (32, 90),
             "dog/e.jpg": (70, 70), "dog/f.png": (48, 40)}
    for name, (h, w) in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_images(int(rng.integers(100)), (1.0, 0.7, 0.5))[0]).resize((w, h)).save(root / name)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return sorted(root / name for name in sizes)


def test_reference_from_a_user_folder_skips_the_corrupt_file_and_serves_the_evaluator(random_weights, sets,
                                                                                      tmp_path, capsys):
    from dit_gspn.data import center_crop_arr
    from evaluation.reference import main as reference_main

    folder = tmp_path / "my_images"
    good = _user_folder(folder)
    with pytest.raises(UserError, match="(readable image|same size).*evaluation.reference"):
        evaluate(sets["root"] / "a.npz", folder, metrics=["fid"], weights=random_weights, settings=FAST)

    ref, batch = tmp_path / "ref.npz", tmp_path / "ref_batch.npz"
    assert reference_main([str(folder), "--image-size", "32", "--out", str(ref), "--images-npz", str(batch),
                           "--weights", str(random_weights), "--chunk-size", "3", "--feature-layer", LAYER,
                           "--device", "cpu", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "from 6 of 7 files, skipped 1 unreadable" in out and "broken.png" in err
    assert "broken.png" in (tmp_path / "ref.npz.skipped.txt").read_text()
    assert not (tmp_path / "ref.npz.parts").exists()
    # The batch holds ADM's crop of every readable file, in sorted order.
    crops = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 32) for p in good])
    with np.load(batch) as data:
        np.testing.assert_array_equal(data["arr_0"], crops)
    # Statistics summed over chunks equal torch-fidelity's of the same images (evaluated from the batch).
    from_stats = evaluate(sets["root"] / "b.npz", ref, metrics=["fid"], weights=random_weights, settings=FAST)
    from_images = evaluate(sets["root"] / "b.npz", batch, metrics=["fid"], weights=random_weights, settings=FAST)
    assert from_stats["inputs"][1]["kind"] == "stats"
    assert from_stats["metrics"]["frechet_inception_distance"] == pytest.approx(
        from_images["metrics"]["frechet_inception_distance"], rel=1e-6)
    assert evaluation_main([str(sets["root"] / "b.npz"), str(ref), "--weights", str(random_weights),
                            "--metrics", "fid", "--feature-layer", LAYER, "--device", "cpu", "--quiet"]) == 0


def test_reference_resumes_from_its_finished_chunks(random_weights, tmp_path, monkeypatch, capsys):
    import evaluation.reference as reference

    folder = tmp_path / "my_images"
    _user_folder(folder)
    kwargs = dict(weights=random_weights, chunk_size=2, feature_layer=LAYER, progress=False)
    whole = reference.build_reference(folder, tmp_path / "whole.npz", 32, **kwargs)
    process, calls = reference.process_chunk, []

    def killed_after_two(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        process(*args, **kw)

    monkeypatch.setattr(reference, "process_chunk", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        reference.build_reference(folder, tmp_path / "resumed.npz", 32, **kwargs)
    monkeypatch.setattr(reference, "process_chunk", process)
    resumed = reference.build_reference(folder, tmp_path / "resumed.npz", 32, **kwargs)
    assert resumed["reused_chunks"] == 2 and whole["reused_chunks"] == 0 and resumed["count"] == whole["count"] == 6
    with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        np.testing.assert_allclose(a["sigma"], b["sigma"], rtol=1e-12, atol=0)
        np.testing.assert_array_equal(a["mu"], b["mu"])
    with pytest.raises(UserError, match="already exists"):
        reference.build_reference(folder, tmp_path / "whole.npz", 32, **kwargs)


def test_the_report_copies_a_sample_npz_provenance(full_report, sets, random_weights, tmp_path):
    from dit_gspn.sampling.provenance import write_provenance

    samples = tmp_path / "samples.npz"
    write_npz(samples, sets["b"])
    write_provenance(samples, {"checkpoint_sha256": "ab" * 32, "sampler": "euler", "num_steps": 50}, len(sets["b"]))
    report = evaluate(samples, sets["root"] / "a_stats.npz", metrics=["fid"], weights=random_weights, settings=FAST)
    provenance = report["inputs"][0]["provenance"]
    assert provenance["checkpoint_sha256"] == "ab" * 32 and provenance["count"] == N
    assert provenance["samples"] == "samples.npz" and "torch" in provenance["versions"]
    assert "provenance" not in report["inputs"][1]
