"""dit_gspn.metrics.frechet: the Frechet distance equals ADM's scipy sqrtm formula, full rank or not, from
float32 statistics as from float64."""
import numpy as np
import pytest

from dit_gspn.metrics import frechet_distance

from helpers.adm_evaluation import adm_frechet, adm_statistics


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
