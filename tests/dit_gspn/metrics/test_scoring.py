"""dit_gspn.metrics.scoring, the evaluator: ADM's FID, sFID, Inception Score, precision and recall (and KID) in one
report, each checked against an oracle written from ADM's equations (helpers.adm_evaluation) on features taken
straight from torch-fidelity's own Inception forward; ADM's reference batches, saved statistics, the cache, the
report's record of its inputs, and input errors.

These tests run offline with a RANDOMLY INITIALISED Inception-v3 (helpers.inception), saved to a local file and
passed as the weights. What they test is the plumbing and the formulas: which tensors are read, how they are cut,
flattened, accumulated and compared. That these tensors, under the real weights, equal ADM's TF graph's is what
only the real weights can confirm (docs/evaluation.md).
"""
import hashlib
import json

import numpy as np
import pytest

from dit_gspn.metrics import evaluate, frechet_distance, open_input, wanted_metrics
from dit_gspn.metrics.inception import SPATIAL_DIM

from helpers.adm_evaluation import adm_frechet, adm_inception_score, adm_precision_recall, adm_statistics
from helpers.inception import FAST, LAYER, N, SPLIT


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
