"""dit_gspn.sampling.batch in this process: the plan (classes, per-index seeds, shards), the .npz assembled
shard by shard, and bf16 sampling. tests/integration/test_batch_sampling.py runs sample.py as processes."""
import numpy as np
import pytest

from dit_gspn.image_npz import read_npz
from dit_gspn.sampling.batch import BatchPlan, assemble, class_labels, index_seed, run_batch, shard_path
from dit_gspn.checkpoint import SamplingInfo

from helpers.tiny_models import tiny_dit


pytestmark = pytest.mark.usefixtures("one_torch_thread", "reference_scan")


def test_class_plans_and_per_index_seeds():
    uniform = class_labels(1000, 10, "uniform", seed=3)
    assert uniform.min() == 0 and uniform.max() == 9 and not np.array_equal(uniform, class_labels(1000, 10, seed=4))
    balanced = class_labels(1000, 10, "balanced", seed=3)
    assert np.bincount(balanced).tolist() == [100] * 10
    assert len({index_seed(0, i) for i in range(1000)} | {index_seed(1, i) for i in range(1000)}) == 2000
    plan = BatchPlan(num_samples=10, num_classes=3, shard_size=3)
    shards = [k for rank in range(3) for k in plan.shards_of(rank, 3)]
    assert sorted(shards) == [0, 1, 2, 3]
    assert np.concatenate([plan.shard_indices(k) for k in range(4)]).tolist() == list(range(10))


def test_the_streamed_npz_is_bitwise_the_file_np_savez_writes_from_whole_arrays(tmp_path):
    """assemble() writes one shard at a time; the oracle concatenates every shard in memory and calls np.savez."""
    plan = BatchPlan(num_samples=11, num_classes=3, shard_size=4, seed=2)  # shards of 4, 4 and 3
    shard_dir = tmp_path / "out.npz.shards"
    shard_dir.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 6, 10, 3), dtype=np.uint8)
    for k in range(plan.num_shards):
        idx = plan.shard_indices(k)
        np.savez(shard_path(shard_dir, k), images=images[idx], labels=plan.labels()[idx], indices=idx)
    streamed = assemble(plan, shard_dir, tmp_path / "out.npz")
    np.savez(tmp_path / "in_memory.npz", images, plan.labels())
    assert streamed.read_bytes() == (tmp_path / "in_memory.npz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_memory.npz", "out.npz", "out.npz.shards"]
    assert sorted(p.name for p in shard_dir.iterdir()) == [f"shard_{k:06d}.npz" for k in range(3)]  # no partial


def test_bf16_batch_sampling_stays_close_to_float32(tmp_path):
    model = tiny_dit(num_classes=3)
    plan = BatchPlan(num_samples=4, num_classes=3, shard_size=2, seed=1)
    info = SamplingInfo(None, 1.0, (8, 8), 3)
    paths = {}
    for bf16 in (False, True):
        paths[bf16] = run_batch(model, plan, tmp_path / f"bf16_{bf16}.npz", info=info, settings={}, bf16=bf16,
                                num_steps=4, sampler="ddim")
    full, _ = read_npz(paths[False])
    half, _ = read_npz(paths[True])
    diff = np.abs(full.astype(int) - half.astype(int))
    assert diff.mean() < 2 and diff.max() > 0  # bf16 did run, and gives nearly the same pixels
    with pytest.raises(FileExistsError, match="already exists"):
        run_batch(model, plan, paths[True], info=info, settings={}, num_steps=4)
