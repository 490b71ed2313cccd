"""A user's mistake costs one line, never a run: each case runs the command as a user would and checks the
exit code, the one `error: ...` line, and that nothing was lost or corrupted."""
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dit_gspn.cli import USER_ERROR, one_line, run_main
from dit_gspn.errors import UserError
from dit_gspn.training import ConfigError, list_checkpoints, load_config, train
from dit_gspn.checkpoint import folder as checkpoint_module
from dit_gspn.folder_lock import LOCK_FILE
from dit_gspn.training.config import parse_config

from helpers.commands import assert_one_line_error, run_here
from helpers.entry_points import load_script
from helpers.folder_lock import hold_lock
from helpers.images import image_folder
from helpers.repo import REPO
from helpers.training import reset_accelerate, tiny_config, write_config


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DIT_GSPN_DEBUG", None)
    return {**env, **extra}


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository, as a user would."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env or _env(), capture_output=True,
                          text=True, timeout=300)


def _small(run_dir, **sections) -> dict:
    base = dict(train={"steps": 4, "grad_accum_steps": 1, "warmup_steps": 0}, checkpoint={"every": 2, "keep_last": 3})
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return tiny_config(run_dir, **base)


# --- Damage 6 and the config: validated before anything is built -------------------------------------------

def test_negative_steps_and_other_config_mistakes_are_one_line_before_anything_runs(tmp_path, capsys,
                                                                                     monkeypatch):
    config = write_config(tmp_path / "c.yaml", _small(tmp_path / "run"))
    proc = run_cli("train.py", "--config", config, "train.steps=-5")
    assert_one_line_error(proc, "train.steps must be an integer >= 1, got -5")
    assert not (tmp_path / "run").exists()  # nothing was started
    monkeypatch.setenv("DIT_GSPN_DEBUG", "1")
    debug = run_here(load_script("train").main, ["--config", config, "train.steps=-5"], capsys)
    assert debug.returncode == USER_ERROR and "Traceback" in debug.stderr and "parse_config" in debug.stderr
    monkeypatch.delenv("DIT_GSPN_DEBUG")
    assert_one_line_error(run_here(load_script("train").main, ["--config", config, "--reume"], capsys),
                          "unrecognized arguments: --reume")

    def refused(*overrides):
        with pytest.raises(ConfigError) as info:
            parse_config(load_config(config, list(overrides)))
        return str(info.value)

    assert "logging.every must be an integer >= 1, got 0" in refused("logging.every=0")
    assert "checkpoint.keep_last must be an integer >= 1, got 0" in refused("checkpoint.keep_last=0")
    assert "checkpoint.every must be an integer, got 2.5" in refused("checkpoint.every=2.5")
    assert "model.name: unknown zoo model 'GSPN-S/5' (did you mean" in refused("model.name=GSPN-S/5")
    assert "unknown key 'model.hiden_size' (did you mean hidden_size" in refused("model.hiden_size=64")
    assert "model.hidden_size=30 must be divisible by model.num_heads=4" in refused("model.hidden_size=30",
                                                                                   "model.num_heads=4")
    assert "train.lr must be a number > 0, got -0.001" in refused("train.lr=-1e-3")
    assert "train.betas must be two numbers in [0, 1)" in refused("train.betas=[0.9]")
    assert "train.mixed_precision must be one of no, bf16, fp16, got 'fp8'" in refused("train.mixed_precision=fp8")
    assert "train.ema_decay must be a number >= 0 and < 1, got 1.5" in refused("train.ema_decay=1.5")
    assert "train.cpu must be true or false, got 'yes please'" in refused("train.cpu=yes please")
    assert "data.kind: unknown dataset kind 'jpegs'; choose one of latents, shapes" in refused("data.kind=jpegs")
    assert "model.use_pos_embed must be true or false or null, got 'maybe'" in refused("model.use_pos_embed=maybe")
    assert "train.global_batch_size=8 must be divisible by train.grad_accum_steps=3" in refused(
        "train.grad_accum_steps=3")
    assert "logging.sample_classes must be a list of integers or null, got 3" in refused("logging.sample_classes=3")
    with pytest.raises(ConfigError, match=r"logging.sample_classes \[12\] are outside \[0, 10\)"):
        train(load_config(config, ["logging.sample_classes=[1, 12]"]))
    reset_accelerate()
    # What the data decides is checked when it is built, still before the run folder is made.
    with pytest.raises(ConfigError, match=r"model GSPN-S/4: input_size 18 is not divisible by patch_size 4"):
        train(load_config(config, ["data.image_size=18"]))
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"data.path .*none is not a folder"):
        train(_small(tmp_path / "run", data={"kind": "latents", "path": str(tmp_path / "none")}))
    reset_accelerate()
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_dataset_is_refused_before_the_model_is_built(tmp_path, fresh_accelerate_state,
                                                                             monkeypatch):
    from dit_gspn.training import trainer

    monkeypatch.setattr(trainer, "build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match=r"gives 512 samples per micro-batch, but the dataset holds only 60"):
        train(_small(tmp_path / "run", train={"global_batch_size": 512}, data={"flip": False}))


# --- Damage 3: everything a run writes is checked before step 1 --------------------------------------------

def test_an_unwritable_checkpoint_folder_is_found_before_step_one(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", _small(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoint folder goes")
    proc = run_here(load_script("train").main, ["--config", config], capsys)
    assert_one_line_error(proc, str(tmp_path / "run" / "checkpoints"), "is a file, not a folder")
    assert "training GSPN" not in proc.stderr  # refused before the progress bar (step 1) started
    assert not (tmp_path / "run" / "samples").exists() or not any((tmp_path / "run" / "samples").iterdir())


# --- Damage 4: a checkpoint rewrite killed at any point ------------------------------------------------------

class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the point it is raised at runs (no except clause catches it)."""


def _weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model" / "diffusion_pytorch_model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_inside_a_checkpoint_rewrite_loses_nothing_and_is_cleaned_up(tmp_path, monkeypatch, capsys):
    train_main = load_script("train").main
    run = tmp_path / "run"
    config = _small(run)
    path = write_config(tmp_path / "c.yaml", config)
    train(config)
    reset_accelerate()
    first, second = list_checkpoints(run)
    original = _weights(second)

    # Resume from step 2 and re-reach step 4, whose folder exists: killed between the two renames.
    real_replace = os.replace

    def killed_between_renames(src, dst):
        if Path(src).name.startswith(".tmp-") and (run / "checkpoints" / ".old-0000004").exists():
            raise _Killed
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", killed_between_renames)
    with pytest.raises(_Killed):
        train(config, resume=str(first))
    reset_accelerate()
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert not (run / "checkpoints" / "0000004").exists() and (run / "checkpoints" / ".old-0000004").is_dir()

    # The next run puts step 4 back and continues from it; overrides after --resume are accepted.
    proc = run_here(train_main, ["--config", path, "--resume", "train.steps=6"], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restored 0000004 from .old-0000004" in proc.stdout
    assert [p.name for p in list_checkpoints(run)] == ["0000002", "0000004", "0000006"]
    assert _same(_weights(run / "checkpoints" / "0000004"), original)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")) == []

    # Killed while the replaced folder was being removed: the rewrite after it must still work.
    real_rmtree = shutil.rmtree

    def killed_while_removing(target, *args, **kwargs):
        target = Path(target)
        if target.name.startswith(".old-"):
            (target / "trainer_state.json").unlink()
            (target / "config.yaml").unlink()
            raise _Killed
        return real_rmtree(target, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_while_removing)
    with pytest.raises(_Killed):
        train(config, resume=str(first))
    reset_accelerate()
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    assert (run / "checkpoints" / ".old-0000004").is_dir()
    proc = run_here(train_main, ["--config", path, "--resume", first], capsys)  # rewrites step 4 once more
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _same(_weights(run / "checkpoints" / "0000004"), original)  # an exact resume: the same weights
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")) == []


# --- Nothing runs code from a checkpoint; --resume compares configs ------------------------------------------

class _Planted:
    """A pickle that would create ``marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    config = _small(root / "run")
    train(config)
    reset_accelerate()
    return root, config


def test_a_planted_pickle_is_refused_with_one_line_and_never_runs(trained_run, tmp_path, capsys):
    root, config = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    config = dict(config, run_dir=str(run))
    path = write_config(tmp_path / "c.yaml", config)
    marker = tmp_path / "code-ran"
    latest = list_checkpoints(run)[-1]
    for name in ("optimizer.pt", "lr_scheduler.pt", "rng/rank0.pt"):  # the new name, and two legacy ones
        (latest / name).write_bytes(pickle.dumps({"state": _Planted(marker)}))
    proc = run_here(load_script("train").main, ["--config", path, "--resume", "train.steps=6"], capsys)
    assert_one_line_error(proc, str(latest / "optimizer.pt"), "refused")
    assert not marker.exists()

    evil = tmp_path / "weights.pt"
    evil.write_bytes(pickle.dumps({"x_embedder.proj.weight": _Planted(marker)}))
    proc = run_here(load_script("sample").main, ["--model", "GSPN-S/4", "--ckpt", evil,
                                                 "--cpu", "--out", tmp_path / "grid.png"], capsys)
    assert_one_line_error(proc, str(evil), "refused")
    assert not marker.exists()


def test_a_checkpoint_from_before_safetensors_rng_files_still_loads_and_a_planted_one_is_refused(trained_run,
                                                                                               tmp_path):
    from dit_gspn.checkpoint.rng_state import load_rng_state

    root, config = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    latest = list_checkpoints(run)[-1]
    rng = load_rng_state(latest / "rng" / "rank0.safetensors")
    # The files as the previous version wrote them: torch.save of the schedule and of the RNG dict.
    torch.save(__import__("json").loads((latest / "lr_scheduler.json").read_text()), latest / "lr_scheduler.pt")
    torch.save(rng, latest / "rng" / "rank0.pt")
    (latest / "lr_scheduler.json").unlink()
    (latest / "rng" / "rank0.safetensors").unlink()
    state = checkpoint_module.find_rng_state(latest, 0)
    assert state["python"] == rng["python"] and torch.equal(state["noise"], rng["noise"])
    np.testing.assert_array_equal(state["numpy"][1], rng["numpy"][1])
    assert checkpoint_module.load_lr_scheduler_state(latest)["last_epoch"] == 4
    marker = tmp_path / "code-ran"
    (latest / "rng" / "rank0.pt").write_bytes(pickle.dumps({"numpy": _Planted(marker)}))
    with pytest.raises(UserError, match=r"rank0.pt was refused"):
        checkpoint_module.find_rng_state(latest, 0)
    assert not marker.exists()


def test_resume_refuses_a_changed_config_and_a_different_model_is_one_line(trained_run, tmp_path, capsys):
    train_main = load_script("train").main
    root, config = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    path = write_config(tmp_path / "c.yaml", dict(config, run_dir=str(run)))
    before = {p.name: _weights(p) for p in list_checkpoints(run)}
    proc = run_here(train_main, ["--config", path, "model.hidden_size=64", "seed=4", "--resume"], capsys)
    assert_one_line_error(proc, "model.hidden_size: 32 then, 64 now", "seed: 3 then, 4 now", "--allow-config-change")
    proc = run_here(train_main, ["--config", path, "--resume", "--allow-config-change", "model.hidden_size=64"],
                    capsys)
    line = assert_one_line_error(proc, "do not fit the model of this config", "shape mismatches")
    assert len(line) < 600
    after = {p.name: _weights(p) for p in list_checkpoints(run)}
    assert before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before)


# --- Damage 1: re-running an extraction over a changed dataset -----------------------------------------------

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_rerunning_an_extraction_over_a_changed_dataset_refuses_and_keeps_the_shards(tmp_path, tiny_vae, capsys):
    extract_main = load_script("extract_latents").main
    images = image_folder(tmp_path / "images", {"cat": 3, "dog": 3})
    out = tmp_path / "latents"
    command = ["extract_latents.py", "--data", images, "--out", out, "--vae", tiny_vae, "--image-size", "16",
               "--shard-size", "2", "--num-workers", "0", "--latent-dtype", "float32"]
    first = run_here(extract_main, command[1:], capsys)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE}  # the lock names its holder
    assert load_file(out / "shard-00000.safetensors")["labels"].tolist() == [0, 0]  # cats are 0

    image_folder(images, {"ant": 1})  # sorts before cat: every label would shift
    proc = run_cli(*command)
    assert_one_line_error(proc, str(images), "class folder(s) added: ant", "new --out")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE} == kept  # the index included

    shutil.rmtree(images / "ant")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "dog" / "9.png")
    assert_one_line_error(run_here(extract_main, command[1:], capsys), "dog/ has 4 files, 3 then")


# --- Damage 5: batch sampling over damaged shards --------------------------------------------------------------

def test_batch_sampling_redraws_damaged_shards(trained_run, tmp_path, fresh_accelerate_state):
    root, _ = trained_run
    ckpt = list_checkpoints(root / "run")[-1]
    sample_py = load_script("sample")
    args = ["--ckpt", str(ckpt), "--num-samples", "6", "--batch-size", "2", "--num-steps", "2", "--cpu"]
    assert sample_py.main([*args, "--out", str(tmp_path / "a.npz"), "--keep-shards"]) == 0
    shutil.copytree(tmp_path / "a.npz.shards", tmp_path / "b.npz.shards")
    shards = sorted((tmp_path / "b.npz.shards").glob("shard_*.npz"))
    assert len(shards) == 3
    shards[0].write_bytes(shards[0].read_bytes()[:300])  # truncated
    shards[2].write_bytes(b"")  # zero bytes
    proc = run_cli("sample.py", *args, "--out", tmp_path / "b.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"shard {shards[0]} is drawn again" in proc.stderr and f"shard {shards[2]} is drawn again" in proc.stderr
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])

    # Sampler arguments are checked before the model loads, each as one line.
    def refused(*extra):
        with pytest.raises(UserError) as info:
            sample_py.main(["--ckpt", str(ckpt), "--cpu", *extra])
        return str(info.value)

    assert "--num-steps: the ddpm sampler takes an integer number of steps >= 1, got 0" in refused("--num-steps", "0")
    assert "sampler 'heun' does not fit a model trained with the 'ddpm' objective" in refused("--sampler", "heun")
    assert "--classes [12]: the model has 10 classes" in refused("--classes", "12")
    assert "batch mode (--num-samples) writes an .npz" in refused("--num-samples", "4", "--out", "x.png")
    assert "already exists" in refused("--num-samples", "4", "--out", str(tmp_path / "a.npz"))
    assert "invalid choice: 'euler2'" in refused("--sampler", "euler2")
    assert "--num-steps: DDPM takes 1 to 1000 steps, got 1001" in refused("--num-steps", "1001")
    assert "the nearest counts that can are 59 or 63" in refused("--sampler", "ddim", "--num-steps", "60")
    assert "--flow-shift: the timestep shift applies to the samplers euler, heun, sde" in refused("--flow-shift", "3")
    assert "--image-size 18 18 must be divisible by 4" in refused("--image-size", "18", "--num-steps", "1")
    (tmp_path / "file").write_text("")
    assert f"{tmp_path / 'file'} is a file, not a folder" in refused("--out", str(tmp_path / "file" / "g.png"))


# --- NaN rows in latent shards --------------------------------------------------------------------------------

def test_nan_rows_in_a_latent_shard_are_named_not_blamed_on_the_learning_rate(tmp_path, fresh_accelerate_state):
    from dit_gspn.data.latent_shards import ShardError, shard_name, write_index, write_shard

    root = tmp_path / "latents"
    root.mkdir()
    shards = []
    for k in range(2):
        latents = torch.randn(6, 4, 8, 8)
        if k == 1:
            latents[2, 1, 3, 3] = float("nan")
        write_shard(root / shard_name(k), {"latents": latents, "labels": torch.randint(0, 3, (6,))},
                    {"count": 6, "skipped": []})
        shards.append({"file": shard_name(k), "count": 6, "skipped": []})
    write_index(root, {"vae": str(tmp_path / "no-vae"), "latent_scale": 0.18215, "image_size": [16, 16],
                       "latent_shape": [4, 8, 8], "num_classes": 3, "class_names": ["a", "b", "c"],
                       "flipped": False, "shards": shards})
    config = _small(tmp_path / "run", data={"kind": "latents", "path": str(root), "flip": False},
                    train={"global_batch_size": 12})
    with pytest.raises(ShardError, match=r"NaN or infinite values \(not a learning-rate problem\): "
                                         r".*shard-00001.safetensors row 2 \(latents\), read at step 1"):
        train(config)


def test_weights_that_became_infinite_are_never_saved_as_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                fresh_accelerate_state):
    from dit_gspn.training import NonFiniteLossError

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def overflowing_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # the loss of step 4 was finite; its update overflows
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"weights became NaN or infinite by step 4.*last good checkpoint: "
                                                 r".*0000002"):
        train(_small(run, train={"steps": 6}))
    assert [p.name for p in list_checkpoints(run)] == ["0000002"]
    weights = _weights(run / "checkpoints" / "0000002")
    assert all(bool(v.isfinite().all()) for v in weights.values())


# --- The shared mechanism -------------------------------------------------------------------------------------


def test_evaluator_names_a_corrupt_or_odd_sized_image_before_loading_weights(tmp_path, capsys):
    from evaluation.__main__ import main as evaluation_main

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(images / "3.png")
    missing_weights = tmp_path / "no-weights.pt"
    proc = run_cli("-m", "evaluation", images, "--weights", missing_weights, "--device", "cpu")
    assert_one_line_error(proc, str(images / "3.png"), "16x20 pixels", str(images / "0.png"))
    (images / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    proc = run_here(evaluation_main, [images, "--weights", missing_weights, "--device", "cpu"], capsys)
    assert_one_line_error(proc, str(images / "3.png"), "not a readable image")
    (images / "3.png").unlink()
    truncated = tmp_path / "samples.npz"
    np.savez(truncated, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    proc = run_here(evaluation_main, [truncated, images, "--weights", missing_weights, "--device", "cpu"], capsys)
    assert_one_line_error(proc, str(truncated))
    assert_one_line_error(run_here(evaluation_main, [images, "--kid-subset-size", "0"], capsys),
                          "--kid-subset-size must be >= 1, got 0")


# === The second sweep: every kind of mistake at train.py, sample.py (grid), extract_latents.py and the demo ===
#
# Each case runs the command as a user would and gives one verdict, checked in this order: "lost data" (a file
# that was there before is gone or changed), "traceback", "unhelpful" (a path that must not be created was left
# behind; not exit code 2 with exactly one `error:` line naming every fragment; for a case that must run: not
# exit 0 with every fragment in the output), else "handled well".

class _ReachedTheWork(Exception):
    """Raised by a stand-in for the expensive step that a refusal must come before."""


def _stand_in(work: str):
    def reached(*args, **kwargs):
        raise _ReachedTheWork(work)
    return reached


def run_as_user(main, argv, capsys) -> subprocess.CompletedProcess:
    """``run_here``, with what escapes ``run_main`` (a bug of ours) shown as the user would see it: a traceback
    and exit code 1; a stand-in reached (see ``_stand_in``) is exit code 1 saying so."""
    import traceback

    capsys.readouterr()
    extra = ""
    try:
        code = run_main(main, [str(a) for a in argv])
    except _ReachedTheWork as err:
        code, extra = 1, f"went on to {err} instead of refusing first\n"
    except Exception:
        code, extra = 1, traceback.format_exc()
    finally:
        reset_accelerate()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err + extra)


def snapshot(*roots) -> dict:
    """Every file under ``roots`` (path -> bytes) and every folder (path -> None); not a folder's lock file,
    which names whichever process last took the lock."""
    found = {}
    for root in map(Path, roots):
        if root.is_file():
            found[str(root)] = root.read_bytes()
        elif root.is_dir():
            found[str(root)] = None
            for path in root.rglob("*"):
                if path.name != LOCK_FILE:
                    found[str(path)] = path.read_bytes() if path.is_file() else None
    return found


def verdict(*args, **kwargs) -> str:
    """``_verdict``, logged for the count (see ``_logged``)."""
    return _logged(_verdict(*args, **kwargs))


def _verdict(proc, *fragments, before: dict = (), absent=(), runs: bool = False) -> str:
    """The sweep's verdict on ``proc`` (see above); ``before`` is a ``snapshot`` that must still hold, ``absent``
    paths that must not exist afterwards, ``runs``: the command must succeed (saying every fragment)."""
    before = dict(before)
    for path, content in before.items():
        path = Path(path)
        if not path.exists() or (content is None) != path.is_dir() or (content is not None and
                                                                         path.read_bytes() != content):
            return f"lost data: {path} is gone or changed"
    for path in absent:
        if Path(path).exists():
            return f"unhelpful: {path} was left behind"
    if "Traceback" in proc.stderr:
        return "traceback: " + proc.stderr[-1500:]
    if runs:
        said = proc.stdout + proc.stderr
        missing = [f for f in fragments if f not in said]
        if proc.returncode != 0 or missing:
            return f"unhelpful: exit {proc.returncode}, missing {missing}: {said[-1500:]}"
        return "handled well"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    if proc.returncode != USER_ERROR or len(errors) != 1:
        return f"unhelpful: exit {proc.returncode}, {len(errors)} error lines: {proc.stderr[-1500:]}"
    missing = [f for f in fragments if f not in errors[0]]
    if missing:
        return f"unhelpful: {missing} not named in: {errors[0]}"
    return "handled well"


def _logged(result: str) -> str:
    """``result``, also appended to the file ``$SWEEP_LOG`` names (one line per case, to count the sweep)."""
    log = os.environ.get("SWEEP_LOG")
    if log:
        with open(log, "a") as f:
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
            f.write(f"{test}\t{one_line(result)[:300]}\n")
    return result


def assert_handled(*args, **kwargs) -> None:
    result = verdict(*args, **kwargs)
    assert result == "handled well", f"sweep verdict: {result}"


def assert_all_handled(results: list) -> None:
    """Every verdict of a test's several cases is "handled well" (all are listed, not only the first bad one)."""
    assert all(r == "handled well" for r in results), "\n".join(f"sweep verdict: {r}" for r in results)


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty folder this process cannot write into: mode 0o555, or for root (who writes anyway) a read-only
    tmpfs mounted on it; skipped where neither is possible."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"root writes into a 0o555 folder and a read-only tmpfs cannot be mounted: {mounted.stderr}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=False)


@pytest.fixture
def folder_holder():
    """``hold(folder)``: another process that holds ``folder``'s lock as a running command would, having made
    ``leftover`` (a partial checkpoint or shard of its own) first; returns the process."""
    procs = []

    def hold(folder: Path, leftover: Path | None = None) -> subprocess.Popen:
        if leftover is not None:
            leftover.mkdir(parents=True)
            (leftover / "part").write_text("being written by the other process")
        procs.append(hold_lock(folder))
        return procs[-1]

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


# --- train.py: the files of a checkpoint, --resume, the run folder, a full disk, two processes --------------

def _copied_run(trained_run, tmp_path) -> tuple[Path, Path, Path]:
    """(run folder, config file, newest checkpoint) of a copy of the trained run."""
    root, config = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    return run, write_config(tmp_path / "c.yaml", dict(config, run_dir=str(run))), list_checkpoints(run)[-1]


def _truncate(path: Path, keep: int = 25) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _edit_json(path: Path, **changes) -> None:
    import json
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


_DROP = object()


def _metadata(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()

# (case, the damage done to the newest checkpoint, what the one line must name besides the file)
CHECKPOINT_DAMAGE = [
    ("trainer_state.json truncated", "trainer_state.json", lambda p: _truncate(p), []),
    ("trainer_state.json step is a string", "trainer_state.json", lambda p: _edit_json(p, step="four"), ["step"]),
    ("trainer_state.json without global_micro_batch", "trainer_state.json",
     lambda p: _edit_json(p, global_micro_batch=_DROP), ["global_micro_batch"]),
    ("trainer_state.json holds a list", "trainer_state.json", lambda p: p.write_text("[4]"), []),
    ("lr_scheduler.json truncated", "lr_scheduler.json", lambda p: _truncate(p), []),
    ("lr_scheduler.json last_epoch is a string", "lr_scheduler.json", lambda p: _edit_json(p, last_epoch="x"),
     ["last_epoch"]),
    ("lr_scheduler.json holds a list", "lr_scheduler.json", lambda p: p.write_text("[]"), []),
    ("rng file truncated", "rng/rank0.safetensors", lambda p: _truncate(p, 100), []),
    ("rng file of other tensors", "rng/rank0.safetensors",
     lambda p: save_file({**load_file(p), "torch": torch.zeros(7, dtype=torch.uint8)}, str(p), _metadata(p)),
     ["torch"]),
    ("optimizer.pt truncated", "optimizer.pt", lambda p: _truncate(p, 300), []),
    ("config.yaml not YAML", "config.yaml", lambda p: p.write_text("model: [GSPN-S/4\n"), []),
    ("config.yaml holds a list", "config.yaml", lambda p: p.write_text("- 1\n- 2\n"), []),
]


@pytest.mark.parametrize("case, name, damage, fragments", CHECKPOINT_DAMAGE, ids=[c[0] for c in CHECKPOINT_DAMAGE])
def test_sweep_a_damaged_checkpoint_file_is_one_line_naming_it(trained_run, tmp_path, capsys, case, name, damage,
                                                              fragments):
    run, config, latest = _copied_run(trained_run, tmp_path)
    damage(latest / name)
    before = snapshot(run)
    proc = run_as_user(load_script("train").main, ["--config", config, "--resume", "train.steps=6"], capsys)
    assert_handled(proc, str(latest / name), *fragments, before=before)


def test_sweep_a_missing_rng_file_resumes_saying_which_file_and_that_it_is_not_exact(trained_run, tmp_path, capsys):
    run, config, latest = _copied_run(trained_run, tmp_path)
    (latest / "rng" / "rank0.safetensors").unlink()
    before = snapshot(list_checkpoints(run)[0])
    proc = run_as_user(load_script("train").main, ["--config", config, "--resume", "train.steps=6"], capsys)
    assert_handled(proc, str(latest / "rng" / "rank0.safetensors"), "not an exact continuation", before=before,
                   runs=True)


def test_sweep_resume_with_nothing_to_resume_starts_fresh_saying_where_it_looked(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", _small(tmp_path / "run", train={"steps": 2}))
    proc = run_as_user(load_script("train").main, ["--config", config, "--resume"], capsys)
    assert_handled(proc, str(tmp_path / "run" / "checkpoints"), "starting a fresh run", runs=True)


def test_sweep_resume_paths_of_the_wrong_kind_are_named(trained_run, tmp_path, capsys):
    train_main = load_script("train").main
    run, config, latest = _copied_run(trained_run, tmp_path)
    before = snapshot(run)
    missing = tmp_path / "run" / "checkpoints" / "0000005"
    state = latest / "trainer_state.json"
    assert_all_handled([
        verdict(run_as_user(train_main, ["--config", config, "--resume", missing], capsys), str(missing),
                "does not exist", "0000004", before=before),
        verdict(run_as_user(train_main, ["--resume", state], capsys), str(state), "is a file", before=before),
        verdict(run_as_user(train_main, ["--resume", run], capsys), str(run), "run folder", str(latest),
                before=before)])


def test_sweep_a_config_path_of_the_wrong_kind_is_named(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    proc = run_as_user(load_script("train").main, ["--config", tmp_path / "configs"], capsys)
    assert_handled(proc, str(tmp_path / "configs"), "is a folder", absent=[tmp_path / "run"])


def test_sweep_a_run_dir_that_is_a_file_or_read_only_is_refused_before_step_one(tmp_path, read_only_folder, capsys):
    train_main = load_script("train").main
    (tmp_path / "taken").write_text("a file")
    config = write_config(tmp_path / "c.yaml", _small(tmp_path / "taken"))
    results = [verdict(run_as_user(train_main, ["--config", config], capsys), str(tmp_path / "taken"), "is a file",
                       before=snapshot(tmp_path / "taken"))]
    config = write_config(tmp_path / "c.yaml", _small(read_only_folder / "run"))
    results.append(verdict(run_as_user(train_main, ["--config", config], capsys), str(read_only_folder / "run"),
                           "cannot be"))
    assert_all_handled(results)


def test_sweep_train_steps_below_the_checkpoint_is_refused(trained_run, tmp_path, capsys):
    run, config, latest = _copied_run(trained_run, tmp_path)
    before = snapshot(run)
    proc = run_as_user(load_script("train").main, ["--config", config, "--resume", "train.steps=2"], capsys)
    assert_handled(proc, "train.steps=2", str(latest), "step 4", before=before)


def test_sweep_a_second_training_in_the_same_run_folder_is_refused_naming_the_first(trained_run, tmp_path, capsys,
                                                                                    folder_holder):
    run, config, latest = _copied_run(trained_run, tmp_path)
    holder = folder_holder(run, leftover=run / "checkpoints" / ".tmp-0000006")
    before = snapshot(run)
    proc = run_as_user(load_script("train").main, ["--config", config, "--resume", "train.steps=6"], capsys)
    assert_handled(proc, str(run), f"in use by process {holder.pid}", before=before)


def test_sweep_a_lock_left_by_a_killed_run_does_not_block_the_next(trained_run, tmp_path, capsys, folder_holder):
    run, config, latest = _copied_run(trained_run, tmp_path)
    holder = folder_holder(run)
    holder.kill()
    holder.wait()
    before = snapshot(latest)
    proc = run_as_user(load_script("train").main, ["--config", config, "--resume", "train.steps=6"], capsys)
    assert_handled(proc, "trained to step 6", before=before, runs=True)


def test_sweep_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_finished_ones(tmp_path, capsys, monkeypatch):
    import errno

    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", _small(run))
    real_save = checkpoint_module.save_rng_state

    def disk_full_at_step_4(state, path):
        if ".tmp-0000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(state, path)

    monkeypatch.setattr(checkpoint_module, "save_rng_state", disk_full_at_step_4)
    proc = run_as_user(load_script("train").main, ["--config", config], capsys)
    result = _verdict(proc, f"no space left on {run / 'checkpoints'}", "0000002")
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    if result == "handled well" and left != ["0000002"]:  # the partial one removed, the finished one kept
        result = f"unhelpful: the checkpoints folder holds {left}"
    results = [_logged(result)]
    monkeypatch.setattr(checkpoint_module, "save_rng_state", real_save)
    kept = snapshot(run / "checkpoints" / "0000002")
    proc = run_as_user(load_script("train").main, ["--config", config, "--resume"], capsys)
    results.append(verdict(proc, "trained to step 4", before=kept, runs=True))
    assert_all_handled(results)


# --- sample.py, grid mode: sizes, the output location, the checkpoint's sampling.json ----------------------

def _sample_main():
    sample_py = load_script("sample")
    return sample_py


@pytest.mark.parametrize("case, extra, fragments", [
    ("image size 10**12", ["--image-size", str(10**12)], ["--image-size", str(10**12)]),
    ("image size 2**64", ["--image-size", str(2**64), str(2**64)], ["--image-size", str(2**64)]),
    ("per-class 10**12", ["--per-class", str(10**12)], ["--per-class", str(10**12)]),
    ("a grid of 12,000 samples", ["--classes", "0", "1", "--per-class", "6000"], ["12000"]),
    ("seed 2**64", ["--seed", str(2**64)], ["--seed", str(2**64)]),
    ("seed -1", ["--seed", "-1"], ["--seed", "-1"]),
    ("cfg scale 0.5", ["--cfg-scale", "0.5"], ["--cfg-scale", "must be >= 1", "0.5"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_sweep_grid_sizes_out_of_range_are_refused_before_anything_is_allocated(trained_run, tmp_path, capsys,
                                                                                monkeypatch, case, extra, fragments):
    root, _ = trained_run
    sample_py = _sample_main()
    monkeypatch.setattr(sample_py, "load_model", _stand_in("loading the model"))
    out = tmp_path / "out" / "grid.png"
    proc = run_as_user(sample_py.main, ["--ckpt", list_checkpoints(root / "run")[-1], "--cpu", "--out", out, *extra],
                    capsys)
    assert_handled(proc, *fragments, absent=[tmp_path / "out"])


def test_sweep_num_samples_out_of_range_is_refused_before_a_shard_folder_exists(trained_run, tmp_path, capsys):
    root, _ = trained_run
    out = tmp_path / "s.npz"
    proc = run_as_user(_sample_main().main, ["--ckpt", list_checkpoints(root / "run")[-1], "--cpu", "--out", out,
                                          "--num-samples", str(10**12)], capsys)
    assert_handled(proc, "--num-samples", str(10**12), absent=[out, tmp_path / "s.npz.shards"])


def test_sweep_grid_output_locations_are_checked_before_sampling(trained_run, tmp_path, read_only_folder, capsys,
                                                                 monkeypatch):
    root, _ = trained_run
    ckpt = list_checkpoints(root / "run")[-1]
    sample_py = _sample_main()
    real_sample = sample_py.sample
    monkeypatch.setattr(sample_py, "sample", _stand_in("sampling"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("a file")
    before = snapshot(tmp_path / "folder", tmp_path / "file")
    results = []
    for out, fragments in ((tmp_path / "folder", ["is a folder"]),
                           (tmp_path / "file" / "grid.png", [str(tmp_path / "file"), "is a file"]),
                           (read_only_folder / "grid.png", [str(read_only_folder), "cannot be written"])):
        proc = run_as_user(sample_py.main, ["--ckpt", ckpt, "--cpu", "--out", out], capsys)
        results.append(verdict(proc, str(out), *fragments, before=before))
    monkeypatch.setattr(sample_py, "sample", real_sample)
    out = tmp_path / "new" / "deeper" / "grid.png"  # a missing folder is made when the grid is written
    proc = run_as_user(sample_py.main, ["--ckpt", ckpt, "--cpu", "--out", out, "--num-steps", "2"], capsys)
    results.append(verdict(proc, f"wrote {out}", runs=True))
    assert_all_handled(results)


def test_sweep_a_checkpoint_path_of_the_wrong_kind_is_named(trained_run, tmp_path, capsys):
    root, _ = trained_run
    ckpt = list_checkpoints(root / "run")[-1]
    sample_main = _sample_main().main
    out = tmp_path / "g.png"
    results = []
    for argv, fragments in ((["--ckpt", ckpt / "sampling.json"], ["--model"]),
                            (["--ckpt", tmp_path / "nothing"], ["does not exist"]),
                            (["--ckpt", ckpt, "--model", "GSPN-S/4"], [str(ckpt), "is a folder"])):
        proc = run_as_user(sample_main, [*argv, "--cpu", "--out", out], capsys)
        results.append(verdict(proc, *fragments, absent=[out]))
    assert_all_handled(results)


SAMPLING_DAMAGE = [
    ("truncated", lambda p: _truncate(p, 30), []),
    ("num_classes a string", lambda p: _edit_json(p, num_classes="ten"), ["num_classes"]),
    ("class_names a number", lambda p: _edit_json(p, class_names=5), ["class_names"]),
    ("latent_scale a string", lambda p: _edit_json(p, latent_scale="big"), ["latent_scale"]),
    ("vae a number", lambda p: _edit_json(p, vae=3), ["vae"]),
    ("a list", lambda p: p.write_text("[]"), []),
]


@pytest.mark.parametrize("case, damage, fragments", SAMPLING_DAMAGE, ids=[c[0] for c in SAMPLING_DAMAGE])
def test_sweep_a_damaged_sampling_json_is_one_line_naming_it(trained_run, tmp_path, capsys, case, damage, fragments):
    root, _ = trained_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(list_checkpoints(root / "run")[-1], ckpt)
    damage(ckpt / "sampling.json")
    proc = run_as_user(_sample_main().main, ["--ckpt", ckpt, "--cpu", "--out", tmp_path / "g.png"], capsys)
    assert_handled(proc, str(ckpt / "sampling.json"), *fragments, absent=[tmp_path / "g.png"])


# --- extract_latents.py: the settings of a re-run, sizes, the output location, two processes ----------------

@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_vae):
    """(images, a finished extraction into latents/ (3 shards of 2), the command that made it)."""
    root = tmp_path_factory.mktemp("extracted")
    images = image_folder(root / "images", {"cat": 3, "dog": 3})
    out = root / "latents"
    command = ["--data", images, "--out", out, "--vae", tiny_vae, "--image-size", "16", "--shard-size", "2",
               "--num-workers", "0", "--latent-dtype", "float32"]
    assert run_main(load_script("extract_latents").main, [str(a) for a in command]) == 0
    reset_accelerate()
    return images, out, command


def _with(command: list, flag: str, *values) -> list:
    """``command`` with ``flag``'s value(s) replaced (or the flag added)."""
    command = [str(a) for a in command]
    if flag in command:
        i = command.index(flag)
        return [*command[:i], flag, *map(str, values), *command[i + 2:]]
    return [*command, flag, *map(str, values)]


def _copied_latents(extracted, tmp_path) -> tuple[Path, list]:
    images, out, command = extracted
    copy = tmp_path / "latents"
    shutil.copytree(out, copy)
    return copy, _with(command, "--out", copy)


@pytest.mark.parametrize("case, flag, values, fragments", [
    ("image size", "--image-size", ["32"], ["image_size: 16 then, 32 now"]),
    ("no flip", "--no-flip", [], ["flip: True then, False now"]),
    ("latent dtype", "--latent-dtype", ["float16"], ["latent_dtype: 'float32' then, 'float16' now"]),
    ("latent scale", "--latent-scale", ["0.5"], ["latent_scale: 0.18215 then, 0.5 now"]),
    ("seed", "--seed", ["1"], ["seed: 0 then, 1 now"]),
    ("shard size", "--shard-size", ["3"], ["shard_size: 2 then, 3 now"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_sweep_an_extraction_rerun_with_other_settings_is_refused_and_keeps_every_shard(extracted, tmp_path, capsys,
                                                                                       case, flag, values, fragments):
    out, command = _copied_latents(extracted, tmp_path)
    command = [*command, flag] if not values else _with(command, flag, *values)
    before = snapshot(out)
    proc = run_as_user(load_script("extract_latents").main, command, capsys)
    assert_handled(proc, str(out), *fragments, before=before)


def test_sweep_an_extraction_rerun_with_another_vae_is_refused(extracted, tiny_vae, tmp_path, capsys):
    out, command = _copied_latents(extracted, tmp_path)
    other = tmp_path / "other-vae"
    shutil.copytree(tiny_vae, other)
    before = snapshot(out)
    proc = run_as_user(load_script("extract_latents").main, _with(command, "--vae", other), capsys)
    assert_handled(proc, str(out), "vae: ", str(other), before=before)


def test_sweep_an_extraction_rerun_with_the_same_settings_continues(extracted, tmp_path, capsys):
    out, command = _copied_latents(extracted, tmp_path)
    lost = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").unlink()
    before = snapshot(out)
    proc = run_as_user(load_script("extract_latents").main, command, capsys)
    assert_handled(proc, "6 latents", before=before, runs=True)
    assert (out / "shard-00001.safetensors").read_bytes() == lost


def _as_written_before_settings_were_recorded(out: Path) -> None:
    """Rewrite ``out``'s dataset.json and shard metadata as extract_latents.py wrote them before it recorded the
    extraction's settings."""
    import json

    from safetensors import safe_open

    recorded = json.loads((out / "dataset.json").read_text())
    recorded.pop("settings", None)
    (out / "dataset.json").write_text(json.dumps(recorded))
    for shard in out.glob("shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            meta = json.loads(f.metadata()["info"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in meta.items() if k not in ("latent_dtype", "seed", "shard_size", "mixed_precision")}
        save_file(tensors, str(shard), metadata={"info": json.dumps(meta)})


def test_sweep_a_latent_folder_from_before_settings_were_recorded_is_checked_and_still_trains(extracted, tmp_path,
                                                                                             capsys):
    from dit_gspn.data import LatentShardDataset

    extract_main = load_script("extract_latents").main
    refused, command = _copied_latents(extracted, tmp_path / "a")
    _as_written_before_settings_were_recorded(refused)
    before = snapshot(refused)
    proc = run_as_user(extract_main, _with(command, "--image-size", "32"), capsys)
    results = [verdict(proc, "image_size: 16 then, 32 now", before=before)]
    continued, command = _copied_latents(extracted, tmp_path / "b")
    _as_written_before_settings_were_recorded(continued)
    before = snapshot(*continued.glob("shard-*"))
    proc = run_as_user(extract_main, command, capsys)
    results.append(verdict(proc, "6 latents", before=before, runs=True))
    assert_all_handled(results)
    assert "settings" in __import__("json").loads((continued / "dataset.json").read_text())  # recorded now
    assert len(LatentShardDataset(refused, flip=True)) == 12  # training reads such a folder as it is


def test_sweep_extraction_paths_of_the_wrong_kind_are_named_and_nothing_is_created(extracted, tmp_path,
                                                                                  read_only_folder, capsys):
    images, _, command = extracted
    extract_main = load_script("extract_latents").main
    (tmp_path / "file").write_text("a file")
    before = snapshot(tmp_path / "file", images)
    cases = [
        (_with(command, "--out", tmp_path / "file"), [str(tmp_path / "file"), "is a file"], []),
        (_with(command, "--out", tmp_path / "file" / "latents"), [str(tmp_path / "file"), "is a file"], []),
        (_with(command, "--out", read_only_folder / "latents"), [str(read_only_folder), "cannot be written"], []),
        (_with(_with(command, "--out", tmp_path / "new"), "--data", tmp_path / "file"),
         [str(tmp_path / "file"), "is a file, not a folder"], [tmp_path / "new"]),
        (_with(_with(command, "--out", tmp_path / "new"), "--data", tmp_path / "none"),
         [str(tmp_path / "none"), "does not exist"], [tmp_path / "new"]),
        (_with(_with(command, "--out", tmp_path / "new"), "--vae", tmp_path / "no-vae"),
         ["could not load the VAE"], [tmp_path / "new"]),
        (_with(_with(command, "--out", tmp_path / "new"), "--data", tmp_path / "empty"),
         [str(tmp_path / "empty"), "holds no class folders"], [tmp_path / "new"]),
        (_with(_with(command, "--out", tmp_path / "new"), "--image-size", "15"),
         ["--image-size 15", "divisible"], [tmp_path / "new"]),
    ]
    (tmp_path / "empty").mkdir()
    results = []
    for argv, fragments, absent in cases:
        proc = run_as_user(extract_main, argv, capsys)
        results.append(verdict(proc, *fragments, before=before, absent=absent))
    assert_all_handled(results)


@pytest.mark.parametrize("case, flag, value", [
    ("image size 10**12", "--image-size", str(10**12)),
    ("image size 2**64", "--image-size", str(2**64)),
    ("seed -1", "--seed", "-1"),
    ("seed 2**64", "--seed", str(2**64)),
    ("100,000 workers", "--num-workers", "100000"),
], ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_sweep_extraction_sizes_out_of_range_are_refused_before_anything_is_created(extracted, tmp_path, capsys,
                                                                                    monkeypatch, case, flag, value):
    from dit_gspn.data import extract

    monkeypatch.setattr(extract, "load_vae", _stand_in("loading the VAE"))
    _, _, command = extracted
    out = tmp_path / "new"
    proc = run_as_user(load_script("extract_latents").main, _with(_with(command, "--out", out), flag, value), capsys)
    assert_handled(proc, flag, value, absent=[out])


def test_sweep_a_full_disk_during_a_latent_shard_says_so_and_keeps_the_finished_ones(extracted, tmp_path, capsys,
                                                                                      monkeypatch):
    import errno

    from dit_gspn.data import latent_shards

    out, command = _copied_latents(extracted, tmp_path)
    for k in (1, 2):
        (out / f"shard-0000{k}.safetensors").unlink()
    before = snapshot(out)
    real_save = latent_shards.save_file

    def disk_full_at_shard_2(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)  # the partial file is there when the error comes
        if "shard-00002" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(latent_shards, "save_file", disk_full_at_shard_2)
    proc = run_as_user(load_script("extract_latents").main, command, capsys)
    result = _verdict(proc, f"no space left on {out}", "shard-00002.safetensors", before=before)
    left = sorted(p.name for p in out.glob("*shard-*"))
    if result == "handled well" and left != ["shard-00000.safetensors", "shard-00001.safetensors"]:
        result = f"unhelpful: the latent folder holds {left}"  # shard 1 finished, no partial shard 2
    results = [_logged(result)]
    monkeypatch.setattr(latent_shards, "save_file", real_save)
    proc = run_as_user(load_script("extract_latents").main, command, capsys)
    results.append(verdict(proc, "6 latents", before=snapshot(out / "shard-00001.safetensors"), runs=True))
    assert_all_handled(results)


def test_sweep_a_second_extraction_into_the_same_out_is_refused_naming_the_first(extracted, tmp_path, capsys,
                                                                                folder_holder):
    out, command = _copied_latents(extracted, tmp_path)
    (out / "shard-00002.safetensors").unlink()
    holder = folder_holder(out)
    before = snapshot(out)
    proc = run_as_user(load_script("extract_latents").main, command, capsys)
    assert_handled(proc, str(out), f"in use by process {holder.pid}", before=before,
                   absent=[out / "shard-00002.safetensors"])


# --- The demo: its printed commands work as printed, its mistakes name what the demo takes ------------------

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(run folder, what the demo printed) of a toy demo run."""
    from dit_gspn.commands import demo
    import contextlib
    import io

    run = tmp_path_factory.mktemp("demo") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo.main(["--out", str(run), "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                          "data.num_per_class=4", "train.global_batch_size=8", "train.steps=2",
                          "logging.sample_steps=2", "logging.samples_per_class=1", "logging.fid_every=0"]) == 0
    reset_accelerate()
    return run, printed.getvalue()


def test_sweep_the_demos_train_longer_command_works_as_printed(demo_run, capsys):
    import shlex

    run, printed = demo_run
    line = next(line for line in printed.splitlines() if "train longer:" in line)
    command = shlex.split(line.split("train longer:", 1)[1])
    assert command[:2] == ["python", "train.py"]
    before = snapshot(run / "checkpoints" / "0000002")
    proc = run_as_user(load_script("train").main, command[2:], capsys)
    assert_handled(proc, "trained to step 4", before=before, runs=True)


def test_sweep_demo_mistakes_name_what_the_demo_takes(demo_run, tmp_path, capsys, folder_holder):
    from dit_gspn.commands import demo

    run, _ = demo_run
    before = snapshot(run)
    (tmp_path / "file").write_text("a file")
    (tmp_path / "configs").mkdir()
    in_use = tmp_path / "in-use"
    in_use.mkdir()
    holder = folder_holder(in_use)
    results = []
    for argv, fragments in (
            (["--out", run], [str(run), "train.py --resume"]),
            (["--out", tmp_path / "file"], [str(tmp_path / "file"), "is a file"]),
            (["--config", tmp_path / "configs"], [str(tmp_path / "configs"), "is a folder"]),
            (["--config", tmp_path / "none.yaml"], [str(tmp_path / "none.yaml")]),
            (["--out", tmp_path / "x", "train.steps=-1"], ["train.steps"]),
            (["--out", in_use, "train.steps=1"], [f"in use by process {holder.pid}"])):
        proc = run_as_user(demo.main, argv, capsys)
        result = _verdict(proc, *fragments, before=before)
        if "pass --resume" in proc.stderr:  # the demo has no --resume
            result = f"unhelpful: tells the demo's user to pass --resume: {proc.stderr[-500:]}"
        results.append(_logged(result))
    assert_all_handled(results)
