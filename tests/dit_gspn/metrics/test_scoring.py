"""Evaluation: ADM's FID, sFID, Inception Score, precision and recall (and KID), each checked against an oracle
written from ADM's equations (openai/guided-diffusion evaluations/evaluator.py) in float64 numpy/scipy, on
features taken straight from torch-fidelity's own Inception forward.

These tests run offline with a RANDOMLY INITIALISED Inception-v3 (torch-fidelity's architecture, convolutions
re-initialised Kaiming normal so its features are informative), saved to a local file and passed as the
weights. What they test is the plumbing and the formulas: which tensors are read, how they are cut, flattened,
accumulated and compared. That these tensors, under the real weights, equal ADM's TF graph's is what only the
real weights can confirm (docs/evaluation.md).
"""
import hashlib
import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from dit_gspn.errors import UserError
from dit_gspn.image_npz import write_npz
from dit_gspn.metrics import (InceptionFeatures, InceptionScore, Moments, frechet_distance, manifold_radii,
                              precision_recall, wanted_metrics)
from dit_gspn.metrics import weights as weights_module
from dit_gspn.metrics.inception import SPATIAL_DIM
from dit_gspn.module_file import save_exported
from evaluation import ENV_WEIGHTS, Settings, evaluate, open_input, resolve_inception_weights
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


def _images(seed, tint, n=N):
    """n smooth random 32x32 images (upsampled 4x4 noise), tinted so two sets differ in distribution."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, 4, 4, 3)) * np.asarray(tint)
    fine = np.kron(coarse, np.ones((1, 8, 8, 1))) + rng.normal(0, 0.05, (n, 32, 32, 3))
    return (np.clip(fine, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """a: untinted images; b: half drawn like a, half tinted, so the sets overlap in part."""
    root = tmp_path_factory.mktemp("sets")
    a = _images(0, (1.0, 1.0, 1.0))
    b = np.concatenate([_images(1, (1.0, 1.0, 1.0), N // 2), _images(2, (1.0, 0.4, 0.2), N - N // 2)])
    write_npz(root / "a.npz", a)
    write_npz(root / "b.npz", b)
    (root / "a_folder").mkdir()
    for i, image in enumerate(a):
        Image.fromarray(image).save(root / "a_folder" / f"{i:03d}.png")
    return dict(root=root, a=a, b=b)


# FID, KID and precision/recall read Inception's 64-d layer here (torch-fidelity's feature_layer option): the
# 2048-d pool layer runs the same code, but its 2048x2048 matrix functions take seconds each on 2 busy cores.
# sFID's 2023-d spatial features are what they are.
LAYER = "64"
SPLIT = 4  # IS splits of 4 samples: 4, 4, 2 for N = 10, so a short last split is exercised
FAST = Settings(device="cpu", feature_layer=LAYER, isc_split_size=SPLIT)


@pytest.fixture(scope="module")
def direct_features(random_weights, sets):
    """Both sets' features from torch-fidelity's own forward, no code of ours: the 64-d and 2048-d pools and the
    unbiased logits as it returns them, and TF's mixed_6/conv as a forward hook on Mixed_6d.branch1x1 sees it,
    cut and flattened as ADM's evaluator does (NHWC, channels [..., :7], reshape to (N, -1))."""
    out = {}
    model = FeatureExtractorInceptionV3("inception-v3-compat", [LAYER, "2048", "logits_unbiased"],
                                        feature_extractor_weights_path=str(random_weights))
    seen = []
    model.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, output: seen.append(output.clone()))
    for name in ("a", "b"):
        seen.clear()
        with torch.no_grad():
            pool64, pool, logits = model(torch.from_numpy(sets[name]).permute(0, 3, 1, 2).contiguous())
        nhwc = np.transpose(seen[0].double().numpy(), (0, 2, 3, 1))
        out[name] = {"64": pool64.double().numpy(), "2048": pool.double().numpy(),
                     "logits": logits.double().numpy(), "spatial": nhwc[..., :7].reshape(len(nhwc), -1)}
    return out


@pytest.fixture(scope="module")
def full_report(random_weights, sets):
    root = sets["root"]
    return evaluate(root / "a.npz", root / "b.npz", metrics=["fid", "sfid", "isc", "prc", "kid"],
                    weights=random_weights, cache_dir=root / "cache", save_stats=root / "a_stats.npz", settings=FAST)


# --- ADM's equations, written out ------------------------------------------------------------------------------

def adm_frechet(mu1, sigma1, mu2, sigma2):
    """ADM's FIDStatistics.frechet_distance: scipy's sqrtm of the product, its real part, the trace formula."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def adm_statistics(features):
    """ADM's compute_statistics: np.mean and np.cov over the rows."""
    return {"mu": features.mean(0), "sigma": np.cov(features, rowvar=False)}


def adm_inception_score(logits, split_size):
    """ADM's compute_inception_score: softmax, consecutive splits, exp of the mean KL to the split's marginal."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_precision_recall(reference, samples, k=3):
    """ADM's ManifoldEstimator (k = 3): squared distances, radius = the k-th smallest of a row that includes the
    vector's own 0, membership by <=; precision = samples in the reference manifold, recall the converse."""
    def squared(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(squared(reference, reference), axis=1)[:, k]
    sample_radii = np.sort(squared(samples, samples), axis=1)[:, k]
    precision = (squared(samples, reference) <= ref_radii[None, :]).any(1).mean()
    recall = (squared(reference, samples) <= sample_radii[None, :]).any(1).mean()
    return float(precision), float(recall), ref_radii


# --- the formulas on random data -------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [60, 12], ids=["full-rank", "rank-deficient"])
def test_frechet_distance_equals_adms_sqrtm_formula(rows):
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 20)) @ rng.normal(size=(20, 20))
    y = rng.normal(size=(rows, 20)) @ rng.normal(size=(20, 20)) + 0.3
    a, b = adm_statistics(x), adm_statistics(y)
    expected = adm_frechet(a["mu"], a["sigma"], b["mu"], b["sigma"])
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9 if rows > 20 else 1e-6)
    # float32 statistics (ADM's reference mu is float32) are computed in float64 all the same
    a32 = {k: v.astype(np.float32) for k, v in a.items()}
    assert frechet_distance(a32, b) == pytest.approx(adm_frechet(a32["mu"].astype(np.float64), a32["sigma"].astype(
        np.float64), b["mu"], b["sigma"]), rel=1e-9 if rows > 20 else 1e-6)


def test_moments_in_batches_and_merged_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(53, 7)) * rng.uniform(0.01, 3, 7) + 1e4  # a large offset: no cancellation allowed
    whole, parts = Moments(7), [Moments(7), Moments(7)]
    for start, stop in ((0, 1), (1, 20), (20, 21), (21, 53)):
        whole.add(torch.from_numpy(x[start:stop]))
        parts[start >= 21].add(x[start:stop])
    parts[0].merge(parts[1])
    expected = adm_statistics(x)
    for moments in (whole, parts[0]):
        got = moments.statistics()
        np.testing.assert_allclose(got["mu"], expected["mu"], rtol=1e-13)
        np.testing.assert_allclose(got["sigma"], expected["sigma"], rtol=1e-9, atol=1e-12)


def test_inception_score_streamed_over_batches_equals_adms_splits():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(23, 11)) * 3
    score = InceptionScore(split_size=5)
    for start in range(0, 23, 4):  # batches of 4 cross the splits of 5
        score.add(torch.from_numpy(logits[start:start + 4]))
    mean, std = score.result()
    assert len(score.scores) == 5  # 5, 5, 5, 5, 3
    assert mean == pytest.approx(adm_inception_score(logits, 5), rel=1e-12)
    assert std > 0


def test_precision_recall_in_small_blocks_equals_adms_manifold_estimator():
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(37, 6))
    samples = rng.normal(size=(29, 6)) * 1.3 + 0.4
    precision, recall, ref_radii = adm_precision_recall(reference, samples)
    assert 0 < precision < 1 and 0 < recall < 1
    got = precision_recall(torch.from_numpy(reference), torch.from_numpy(samples), k=3, block=5)
    assert got == (pytest.approx(precision, abs=1e-12), pytest.approx(recall, abs=1e-12))
    radii = manifold_radii(torch.from_numpy(reference).float(), k=3, block=5)
    np.testing.assert_allclose(radii.numpy(), ref_radii, rtol=1e-5)
    with pytest.raises(ValueError, match="needs more than 3 vectors"):
        manifold_radii(torch.zeros(3, 2))


# --- ADM's features, from one pass ----------------------------------------------------------------------------

def test_one_pass_gives_the_pool_spatial_and_logit_tensors_of_torch_fidelitys_forward(random_weights, sets,
                                                                                      direct_features):
    images = torch.from_numpy(sets["a"]).permute(0, 3, 1, 2).contiguous()
    found = InceptionFeatures(random_weights, "cpu")(images)
    assert found["spatial"].shape == (N, SPATIAL_DIM) == (N, 17 * 17 * 7)
    for key, oracle in (("pool", "2048"), ("spatial", "spatial"), ("logits", "logits")):
        torch.testing.assert_close(found[key].double(), torch.from_numpy(direct_features["a"][oracle]))
    small = InceptionFeatures(random_weights, "cpu", pool_layer=LAYER)(images, wanted=("pool",))
    torch.testing.assert_close(small["pool"].double(), torch.from_numpy(direct_features["a"][LAYER]))


def test_the_report_equals_adms_equations_on_torch_fidelitys_features(full_report, direct_features, sets):
    a, b = direct_features["a"], direct_features["b"]
    metrics = full_report["metrics"]
    assert list(metrics) == ["fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "kid",
                             "kid_std"]
    pool_a, pool_b = adm_statistics(a[LAYER]), adm_statistics(b[LAYER])
    expected_fid = adm_frechet(pool_a["mu"], pool_a["sigma"], pool_b["mu"], pool_b["sigma"])
    assert expected_fid > 1.0  # the two sets do differ under this extractor
    assert metrics["fid"] == pytest.approx(expected_fid, rel=1e-4)
    # sFID: the Fréchet distance (checked against sqrtm above) of the spatial features' np.mean / np.cov
    spatial_a, spatial_b = adm_statistics(a["spatial"]), adm_statistics(b["spatial"])
    with np.load(sets["root"] / "a_stats.npz") as saved:
        np.testing.assert_allclose(saved["mu_s"], spatial_a["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved["sigma_s"], spatial_a["sigma"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(saved["mu"], pool_a["mu"], rtol=1e-5, atol=1e-6)
        assert saved["mu_s"].dtype == np.float64 and str(saved["feature_extractor"]) == "inception-v3-compat"
    assert metrics["sfid"] == pytest.approx(frechet_distance(spatial_a, spatial_b), rel=1e-4)
    assert metrics["sfid"] > 1.0
    assert metrics["inception_score"] == pytest.approx(adm_inception_score(a["logits"], SPLIT), rel=1e-5)
    assert full_report["settings"]["isc_splits"] == 3 and metrics["inception_score"] > 1 + 1e-5
    precision, recall, _ = adm_precision_recall(b[LAYER], a[LAYER])
    assert (metrics["precision"], metrics["recall"]) == (precision, recall)
    # KID with subsets of all N samples: every subset is the whole set, so it is the unbiased MMD^2 itself.
    x, y = a[LAYER], b[LAYER]
    kernel = lambda u, v: (u @ v.T / u.shape[1] + 1) ** 3  # noqa: E731 (torch-fidelity's polynomial kernel)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (N * (N - 1)) - 2 * kxy.mean()
    assert metrics["kid"] == pytest.approx(mmd, rel=1e-3)
    assert full_report["settings"]["kid_subset_size"] == N


def test_adms_reference_batch_statistics_are_used_for_fid_and_sfid_and_its_images_for_the_rest(
        full_report, direct_features, sets, random_weights, tmp_path):
    """A reference like VIRTUAL_imagenet256_labeled.npz: arr_0 and mu, sigma, mu_s, sigma_s. Its stored means
    are those of its images shifted by known vectors, so FID and sFID move by exactly what the shift implies;
    precision and recall, from its images, do not move."""
    a, b = direct_features["a"], direct_features["b"]
    pool_b, spatial_b = adm_statistics(b[LAYER]), adm_statistics(b["spatial"])
    rng = np.random.default_rng(11)
    shift, shift_s = rng.normal(size=pool_b["mu"].shape), rng.normal(size=spatial_b["mu"].shape) * 0.1
    reference = tmp_path / "VIRTUAL_reference.npz"
    np.savez(reference, arr_0=sets["b"], mu=(pool_b["mu"] + shift).astype(np.float32), sigma=pool_b["sigma"],
             mu_s=(spatial_b["mu"] + shift_s).astype(np.float32), sigma_s=spatial_b["sigma"])
    report = evaluate(sets["root"] / "a.npz", reference, weights=random_weights, settings=FAST)  # every metric
    assert report["settings"]["metrics"] == ["fid", "sfid", "isc", "prc", "kid"]
    assert report["inputs"][1]["kind"] == "npz" and report["inputs"][1]["fid_statistics"] == "stored"

    def moved(key, features, stored_shift):
        d = features["a"].mean(0) - features["b"].mean(0)
        stored = (features["b"].mean(0) + stored_shift).astype(np.float32).astype(np.float64)
        return full_report["metrics"][key] + float((features["a"].mean(0) - stored) @ (features["a"].mean(0) -
                                                                                          stored) - d @ d)

    assert report["metrics"]["fid"] == pytest.approx(moved("fid", {"a": a[LAYER], "b": b[LAYER]}, shift), rel=1e-4)
    assert report["metrics"]["sfid"] == pytest.approx(moved("sfid", {"a": a["spatial"], "b": b["spatial"]}, shift_s),
                                                      rel=1e-4)
    for key in ("precision", "recall", "inception_score", "kid"):
        assert report["metrics"][key] == full_report["metrics"][key]


# --- the report, the cache, statistics files, the command line -------------------------------------------------

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
    assert settings["metrics"] == ["fid", "sfid", "isc", "prc", "kid"] and settings["feature_layer"] == LAYER
    json.dumps(full_report)  # JSON-ready as it is


def test_same_images_as_folder_and_npz_give_fid_zero(full_report, sets, random_weights):
    root = sets["root"]
    report = evaluate(root / "a_folder", root / "a.npz", metrics=["fid"], weights=random_weights,
                      cache_dir=root / "cache", settings=FAST)
    assert abs(report["metrics"]["fid"]) < 1e-3
    assert report["inputs"][0]["kind"] == "folder" and report["inputs"][0]["count"] == N
    assert report["inputs"][1]["fid_statistics"].startswith("cache")  # a.npz's statistics came from the cache


def test_saved_statistics_serve_as_the_reference(full_report, sets, random_weights):
    root = sets["root"]
    with np.load(root / "a_stats.npz") as stats:
        assert stats["mu"].shape == (64,) and stats["sigma"].shape == (64, 64)
        assert stats["mu_s"].shape == (SPATIAL_DIM,) and stats["sigma_s"].shape == (SPATIAL_DIM, SPATIAL_DIM)
    # By default every metric the inputs allow: KID and precision/recall need images on both sides.
    outputs = ("pool", "spatial", "logits")
    chosen, _ = wanted_metrics(open_input(root / "b.npz"), open_input(root / "a_stats.npz"), None, outputs, FAST)
    assert chosen == ["fid", "sfid", "isc"]
    report = evaluate(root / "b.npz", root / "a_stats.npz", metrics=["fid"], weights=random_weights,
                      cache_dir=root / "cache", settings=FAST)
    assert report["inputs"][1]["kind"] == "stats" and report["inputs"][1]["fid_statistics"] == "stored"
    assert report["metrics"]["fid"] == pytest.approx(full_report["metrics"]["fid"], rel=1e-6)


def test_cli_writes_the_json_report(full_report, sets, random_weights, tmp_path, capsys):
    root = sets["root"]
    code = evaluation_main([str(root / "a.npz"), str(root / "b.npz"), "--metrics", "fid", "--weights",
                            str(random_weights), "--cache-dir", str(root / "cache"), "--report",
                            str(tmp_path / "r.json"), "--quiet", "--device", "cpu", "--feature-layer", LAYER])
    assert code == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["metrics"]["fid"] == pytest.approx(full_report["metrics"]["fid"], rel=1e-9)
    assert json.loads(capsys.readouterr().out)["inputs"] == written["inputs"]


def test_export_and_torchscript_extractors_give_the_same_numbers_without_a_deprecation_warning(sets, tmp_path):
    class Pair(nn.Module):
        """uint8 images -> (6 pooled conv features, 4 logits)."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, images):
            features = self.net(images.float() / 127.5 - 1)
            return features, features[:, :4] * 3

    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    exported = save_exported(Pair(), example, tmp_path / "pair.pt2")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(Pair().eval(), example), str(tmp_path / "pair.pt"))
    reports = {}
    for path in (exported, tmp_path / "pair.pt"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports[path.suffix] = evaluate(sets["root"] / "a.npz", sets["root"] / "b.npz", extractor=path,
                                            settings=FAST)
        assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    pt2, ts = reports[".pt2"], reports[".pt"]
    assert pt2["settings"]["feature_extractor"] == "torch.export pair.pt2"
    assert ts["settings"]["feature_extractor"] == "torchscript pair.pt"
    assert pt2["settings"]["metrics"] == ["fid", "isc", "prc", "kid"]  # no spatial features: no sFID
    assert any(w.startswith("no sFID:") for w in pt2["warnings"])
    for key, value in pt2["metrics"].items():
        assert ts["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert pt2["metrics"]["fid"] > 0.01


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


def test_input_errors_are_actionable(full_report, sets, random_weights, tmp_path):
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
    with np.load(root / "a_stats.npz") as stats:
        np.savez(tmp_path / "no_spatial.npz", mu=stats["mu"], sigma=stats["sigma"])
    with pytest.raises(ValueError, match="cannot compute sfid: a statistics file without mu_s/sigma_s"):
        evaluate(root / "b.npz", tmp_path / "no_spatial.npz", metrics=["sfid"], weights=random_weights, settings=FAST)


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
    # Statistics merged over chunks equal those of one pass over the same images (the batch), sFID's included.
    evaluate(batch, save_stats=tmp_path / "batch_stats.npz", metrics=[], weights=random_weights, settings=FAST)
    with np.load(ref) as chunked, np.load(tmp_path / "batch_stats.npz") as whole:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-9, atol=1e-12, err_msg=key)
    from_stats = evaluate(sets["root"] / "b.npz", ref, metrics=["fid"], weights=random_weights, settings=FAST)
    assert from_stats["inputs"][1]["kind"] == "stats" and from_stats["metrics"]["fid"] > 0
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
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(UserError, match="already exists"):
        reference.build_reference(folder, tmp_path / "whole.npz", 32, **kwargs)


def test_the_report_copies_a_sample_npz_provenance(full_report, sets, random_weights, tmp_path, capsys):
    from dit_gspn.sampling.provenance import write_provenance

    samples = tmp_path / "samples.npz"
    write_npz(samples, sets["b"])
    write_provenance(samples, {"checkpoint_sha256": "ab" * 32, "sampler": "euler", "num_steps": 50}, len(sets["b"]))
    capsys.readouterr()
    assert evaluation_main([str(samples), str(sets["root"] / "a_stats.npz"), "--metrics", "fid", "--weights",
                            str(random_weights), "--feature-layer", LAYER, "--device", "cpu", "--quiet",
                            "--cache-dir", ""]) == 0
    report = json.loads(capsys.readouterr().out)
    provenance = report["inputs"][0]["provenance"]
    assert provenance["checkpoint_sha256"] == "ab" * 32 and provenance["count"] == N
    assert provenance["samples"] == "samples.npz" and "torch" in provenance["versions"]
    assert "provenance" not in report["inputs"][1]
