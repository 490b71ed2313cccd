"""dit_gspn.metrics.moments: mean and covariance accumulated in batches, and merged, equal numpy's."""
import numpy as np
import torch

from dit_gspn.metrics import Moments

from helpers.adm_evaluation import adm_statistics


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
