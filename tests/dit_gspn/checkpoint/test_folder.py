"""dit_gspn.checkpoint.folder: what the writer puts in a checkpoint folder is what its readers give back, and every
state a kill can leave is recovered."""
import copy
import os
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from dit_gspn.checkpoint import (CONFIG_FILE, SAMPLING_FILE, CheckpointWriter, SamplingInfo, find_rng_state,
                                 is_training_checkpoint, latest_checkpoint, list_checkpoints, load_lr_scheduler_state,
                                 load_optimizer_state, load_weights, read_trainer_state, folder as checkpoint_module)
from dit_gspn.models import DiT
from dit_gspn.training import list_checkpoints


class OneProcess:
    """What CheckpointWriter asks of an accelerate.Accelerator, for one process."""

    is_main_process = True
    process_index = 0

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def _tiny_run(seed: int):
    torch.manual_seed(seed)
    model = DiT(input_size=4, patch_size=2, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=3,
                mixer="attention")
    ema = copy.deepcopy(model)
    projector = torch.nn.Linear(16, 8)
    optimizer = torch.optim.AdamW([*model.parameters(), *projector.parameters()], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    loss = sum(p.square().sum() for p in [*model.parameters(), *projector.parameters()])
    loss.backward()
    optimizer.step()
    scheduler.step()
    return model, ema, projector, optimizer, scheduler


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("seed", [0, 1])
def test_what_the_writer_writes_the_readers_give_back(tmp_path, seed):
    model, ema, projector, optimizer, scheduler = _tiny_run(seed)
    info = SamplingInfo(None, 1.0, (4, 4), 3, ["a", "b", "c"], "flow")
    config = {"seed": seed, "train": {"lr": 1e-3, "steps": 7}, "data": {"kind": "shapes"}}
    noise = torch.Generator().manual_seed(seed + 100)
    random.seed(seed)
    np.random.seed(seed)
    expected_rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(), noise.get_state())

    writer = CheckpointWriter(OneProcess(), tmp_path / "run", keep_last=2)
    folder = writer.write(7, model=model, ema=ema, optimizer=optimizer, lr_scheduler=scheduler, sampling_info=info,
                          config=config, trainer_state={"epoch": 1, "loss": 0.5}, noise_generator=noise,
                          extra_weights={"repa_projector": projector})

    assert folder == tmp_path / "run" / "checkpoints" / "0000007" and latest_checkpoint(tmp_path / "run") == folder
    assert is_training_checkpoint(folder)
    assert read_trainer_state(folder) == {"epoch": 1, "loss": 0.5, "step": 7}
    assert _same_state(load_weights(folder / "model"), model.state_dict())
    assert _same_state(load_weights(folder / "ema"), ema.state_dict())
    assert _same_state(load_weights(folder / "repa_projector"), projector.state_dict())
    assert SamplingInfo.read(folder / SAMPLING_FILE) == info
    assert yaml.safe_load((folder / CONFIG_FILE).read_text()) == config
    assert load_lr_scheduler_state(folder) == scheduler.state_dict()
    saved_opt, own_opt = load_optimizer_state(folder), optimizer.state_dict()
    assert saved_opt["param_groups"] == own_opt["param_groups"]
    for k, state in own_opt["state"].items():
        assert _same_state(saved_opt["state"][k], state)
    rng = find_rng_state(folder, 0)
    assert rng["python"] == expected_rng[0]
    np.testing.assert_array_equal(rng["numpy"][1], expected_rng[1])
    assert torch.equal(rng["torch"], expected_rng[2]) and torch.equal(rng["noise"], expected_rng[3])
    assert find_rng_state(folder, 1) is None


def test_a_rewritten_step_replaces_the_old_one_and_only_the_last_k_are_kept(tmp_path):
    model, ema, _, optimizer, scheduler = _tiny_run(0)
    info = SamplingInfo(None, 1.0, (4, 4), 3)
    writer = CheckpointWriter(OneProcess(), tmp_path / "run", keep_last=2)

    def write(step, loss):
        return writer.write(step, model=model, ema=ema, optimizer=optimizer, lr_scheduler=scheduler,
                            sampling_info=info, config={}, trainer_state={"loss": loss},
                            noise_generator=torch.Generator())

    for step in (2, 4, 6):
        write(step, float(step))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["0000004", "0000006"]
    write(6, -1.0)  # after a resume from step 4
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["0000004", "0000006"]
    assert read_trainer_state(tmp_path / "run" / "checkpoints" / "0000006")["loss"] == -1.0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["0000004", "0000006"]


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _writer_and_write(root):
    model, ema, _, optimizer, scheduler = _tiny_run(0)
    writer = CheckpointWriter(OneProcess(), root, keep_last=3)

    def write(step):
        return writer.write(step, model=model, ema=ema, optimizer=optimizer, lr_scheduler=scheduler,
                            sampling_info=SamplingInfo(None, 1.0, (4, 4), 3), config={},
                            trainer_state={"loss": 0.5}, noise_generator=torch.Generator())
    return writer, write


def test_a_full_disk_removes_the_partial_checkpoint_and_keeps_the_finished_ones(tmp_path, monkeypatch):
    import errno

    from dit_gspn.checkpoint import CheckpointDiskFullError
    from dit_gspn.checkpoint import folder as checkpoint_folder

    _, write = _writer_and_write(tmp_path / "run")
    first = write(2)
    kept = _files(first)
    real_save = checkpoint_folder.torch.save

    def disk_full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # a partial file is there when the error comes
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint_folder.torch, "save", disk_full)
    with pytest.raises(CheckpointDiskFullError, match=rf"no space left on {tmp_path / 'run' / 'checkpoints'} while "
                                                      rf"writing checkpoint 4: .*newest: {first}"):
        write(4)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["0000002"]
    assert _files(first) == kept

    def a_bug(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(checkpoint_folder.torch, "save", a_bug)
    with pytest.raises(RuntimeError, match="a bug of ours"):  # not a disk-full message: the fault keeps its error
        write(4)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["0000002"]


def test_a_real_full_disk_is_named_whichever_writer_hits_it(tmp_path):
    """On a small tmpfs (root only; skipped elsewhere): safetensors and torch.save each run out of space."""
    import shutil
    import subprocess

    from dit_gspn.checkpoint import CheckpointDiskFullError

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        _, write = _writer_and_write(disk / "run")
        first = write(2)
        kept = _files(first)
        sizes = {name: len(data) for name, data in kept.items()}
        # Room for everything of a checkpoint up to the optimizer state (4 KiB pages each), not for that: the
        # failure comes from torch.save, which says only "unexpected pos"; then room for less: from safetensors.
        before_optimizer = sum(-(-size // 4096) * 4096 for name, size in sizes.items() if not name.startswith(
            ("optimizer", "lr_scheduler", "trainer_state")))
        for room, writer_error in ((before_optimizer + 4096, "RuntimeError"), (2048, "SafetensorError")):
            filler = disk / "filler"
            filler.unlink(missing_ok=True)
            filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - room))
            with pytest.raises(CheckpointDiskFullError, match=r"no space left on .*writing checkpoint 4") as info:
                write(4)
            assert type(info.value.__cause__).__name__ == writer_error
            assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == ["0000002"]
            assert _files(first) == kept
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)  # a failed writer may hold a file open


def test_a_resume_path_that_is_not_a_complete_checkpoint_says_what_it_is(tmp_path):
    from dit_gspn.checkpoint import CheckpointError, check_checkpoint_folder
    from dit_gspn.errors import MissingFileError

    _, write = _writer_and_write(tmp_path / "run")
    done = write(2)
    unfinished = tmp_path / "run" / "checkpoints" / "0000004"
    unfinished.mkdir()
    assert check_checkpoint_folder(done) == done
    listed = r".*complete ones under .*: \['0000002'\]"
    for path, error, pattern in ((tmp_path / "none", MissingFileError, "does not exist" + listed),
                                 (done / "trainer_state.json", CheckpointError, "is a file" + listed),
                                 (tmp_path / "run", CheckpointError, f"is a run folder, not a checkpoint: .*the newest "
                                                                     f"complete one is {done}"),
                                 (unfinished, CheckpointError, "is not a complete training checkpoint" + listed)):
        with pytest.raises(error, match=f"{path} {pattern}"):
            check_checkpoint_folder(path, tmp_path / "run")


def test_recovery_handles_every_state_a_kill_can_leave(tmp_path):
    root = tmp_path / "run" / "checkpoints"

    def folder(name, complete=True, tag=""):
        (root / name / "model").mkdir(parents=True)
        (root / name / "model" / "tag").write_text(tag or name)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")

    folder("0000002", complete=False)  # pruning killed after its trainer_state.json went
    folder("0000004")
    folder(".old-0000004")  # the rewrite of step 4 was done; removing the old folder was not
    folder(".old-0000006", tag="the old step 6")  # killed between the renames of step 6's rewrite
    folder(".tmp-0000006")
    folder(".tmp-0000008", complete=False)  # killed while writing step 8
    notes = checkpoint_module.recover_leftovers(tmp_path / "run")
    assert sorted(p.name for p in root.iterdir()) == ["0000004", "0000006"]
    assert (root / "0000006" / "model" / "tag").read_text() == "the old step 6"
    assert "restored 0000006 from .old-0000006" in notes and len(notes) == 5
    assert checkpoint_module.recover_leftovers(tmp_path / "run") == []
