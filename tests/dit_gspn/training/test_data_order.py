"""dit_gspn.training.data_order: each epoch's order split over processes, equal to one process's with the
same global micro-batch, and resumable at any batch."""
from dit_gspn.training.data_order import EpochBatchSampler


def test_data_order_splits_ranks_and_resumes_mid_epoch():
    full = [EpochBatchSampler(50, 4, 2, r, seed=1, epoch=3) for r in (0, 1)]
    batches = [list(s) for s in full]
    assert len(batches[0]) == 6  # 50 // 8
    flat = [i for b0, b1 in zip(*batches) for i in b0 + b1]
    assert len(set(flat)) == 48 and all(0 <= i < 50 for i in flat)
    assert list(EpochBatchSampler(50, 4, 2, 1, seed=1, epoch=3, start=4)) == batches[1][4:]
    assert list(EpochBatchSampler(50, 4, 2, 1, seed=1, epoch=4)) != batches[1]
    # One process with the same global micro-batch reads the same samples in the same order.
    single = list(EpochBatchSampler(50, 8, 1, 0, seed=1, epoch=3))
    assert single == [b0 + b1 for b0, b1 in zip(*batches)]
