"""dit_gspn.metrics.inception_score: streamed over batches, the score equals ADM's over its splits."""
import numpy as np
import pytest
import torch

from dit_gspn.metrics import InceptionScore

from helpers.adm_evaluation import adm_inception_score


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
