"""A user's mistake costs one line, never a run (issue 12): each case runs the command as a user would and
checks the exit code, the one `error: ...` line, and that nothing was lost or corrupted."""
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
from safetensors.torch import load_file

from entry_points import load_script
from dit_gspn.cli import USER_ERROR, UserError, run_main
from dit_gspn.training import ConfigError, list_checkpoints, load_config, train
from dit_gspn.checkpoint import folder as checkpoint_module
from dit_gspn.training.config import parse_config
from test_training import tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DIT_GSPN_DEBUG", None)
    return {**env, **extra}


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository, as a user would."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env or _env(), capture_output=True,
                          text=True, timeout=300)


def run_here(main, argv, capsys) -> subprocess.CompletedProcess:
    """``run_main(main, argv)`` in this process (what the command does after its imports), as a
    CompletedProcess; cheaper than a subprocess on a busy 2-core machine."""
    capsys.readouterr()
    code = run_main(main, [str(a) for a in argv])
    _reset_accelerate()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with USER_ERROR and one `error: ...` line containing every fragment, no traceback."""
    assert proc.returncode == USER_ERROR, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def _reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


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
    assert "model.name 'GSPN-S/5' is not a zoo model (did you mean" in refused("model.name=GSPN-S/5")
    assert "unknown key 'model.hiden_size' (did you mean hidden_size" in refused("model.hiden_size=64")
    assert "model.hidden_size=30 must be divisible by model.num_heads=4" in refused("model.hidden_size=30",
                                                                                   "model.num_heads=4")
    assert "train.lr must be a number > 0, got -0.001" in refused("train.lr=-1e-3")
    assert "train.betas must be two numbers in [0, 1)" in refused("train.betas=[0.9]")
    assert "train.mixed_precision must be one of no, bf16, fp16, got 'fp8'" in refused("train.mixed_precision=fp8")
    assert "train.ema_decay must be a number >= 0 and < 1, got 1.5" in refused("train.ema_decay=1.5")
    assert "train.cpu must be true or false, got 'yes please'" in refused("train.cpu=yes please")
    assert "data.kind must be one of latents, shapes" in refused("data.kind=jpegs")
    assert "model.use_pos_embed must be true or false or null, got 'maybe'" in refused("model.use_pos_embed=maybe")
    assert "train.global_batch_size=8 must be divisible by train.grad_accum_steps=3" in refused(
        "train.grad_accum_steps=3")
    assert "logging.sample_classes must be a list of integers or null, got 3" in refused("logging.sample_classes=3")
    with pytest.raises(ConfigError, match=r"logging.sample_classes \[12\] are outside \[0, 10\)"):
        train(load_config(config, ["logging.sample_classes=[1, 12]"]))
    _reset_accelerate()
    # What the data decides is checked when it is built, still before the run folder is made.
    with pytest.raises(ConfigError, match=r"model GSPN-S/4: input_size 18 is not divisible by patch_size 4"):
        train(load_config(config, ["data.image_size=18"]))
    _reset_accelerate()
    with pytest.raises(ConfigError, match=r"data.path .*none is not a folder"):
        train(_small(tmp_path / "run", data={"kind": "latents", "path": str(tmp_path / "none")}))
    _reset_accelerate()
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
    _reset_accelerate()
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
    _reset_accelerate()
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
    _reset_accelerate()
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    assert (run / "checkpoints" / ".old-0000004").is_dir()
    proc = run_here(train_main, ["--config", path, "--resume", first], capsys)  # rewrites step 4 once more
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _same(_weights(run / "checkpoints" / "0000004"), original)  # an exact resume: the same weights
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")) == []


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
    _reset_accelerate()
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


def _image_folder(root: Path, classes: dict) -> Path:
    rng = np.random.default_rng(5)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_rerunning_an_extraction_over_a_changed_dataset_refuses_and_keeps_the_shards(tmp_path, tiny_vae, capsys):
    extract_main = load_script("extract_latents").main
    images = _image_folder(tmp_path / "images", {"cat": 3, "dog": 3})
    out = tmp_path / "latents"
    command = ["extract_latents.py", "--data", images, "--out", out, "--vae", tiny_vae, "--image-size", "16",
               "--shard-size", "2", "--num-workers", "0", "--latent-dtype", "float32"]
    first = run_here(extract_main, command[1:], capsys)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    assert load_file(out / "shard-00000.safetensors")["labels"].tolist() == [0, 0]  # cats are 0

    _image_folder(images, {"ant": 1})  # sorts before cat: every label would shift
    proc = run_cli(*command)
    assert_one_line_error(proc, str(images), "class folder(s) added: ant", "new --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept  # nothing rewritten, the index included

    shutil.rmtree(images / "ant")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "dog" / "9.png")
    assert_one_line_error(run_here(extract_main, command[1:], capsys), "dog/ has 4 files, 3 then")


# --- Damage 2: 16-bit PNGs ------------------------------------------------------------------------------------

def test_16_bit_greyscale_pngs_are_scaled_not_clipped_in_extraction_and_evaluation(tmp_path):
    from dit_gspn.data import ClassFolderImages
    from evaluation import open_input

    rng = np.random.default_rng(2)
    grey16 = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(grey16).save(tmp_path / "imgs" / "a" / "x.png")
    assert Image.open(tmp_path / "imgs" / "a" / "x.png").mode.startswith("I")  # it is stored as 16 bits
    expected = np.round(grey16 / 257.0).astype(np.uint8)  # 65535 -> 255, linearly

    batch = next(open_input(tmp_path / "imgs").batches(4))
    assert batch.shape == (1, 3, 16, 16)
    for channel in range(3):
        np.testing.assert_array_equal(batch[0, channel].numpy(), expected)
    item = ClassFolderImages(tmp_path / "imgs", 16)[0]
    np.testing.assert_allclose(item["image"][0].numpy(), expected / 127.5 - 1.0, atol=1e-6)
    assert (item["image"] >= 1.0).float().mean() < 0.05  # not white


def test_an_empty_class_folder_is_named_when_the_class_list_is_built(tmp_path):
    from dit_gspn.data import ClassFolderImages

    images = _image_folder(tmp_path / "images", {"cat": 1, "dog": 1})
    (images / "bird").mkdir()
    with pytest.raises(UserError, match=r"class folder .*bird holds no files"):
        ClassFolderImages(images, 16)


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

    assert "--num-steps must be >= 1, got 0" in refused("--num-steps", "0")
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

def test_run_main_prints_user_errors_as_one_line_and_keeps_the_traceback_of_a_bug(capsys, monkeypatch):
    monkeypatch.delenv("DIT_GSPN_DEBUG", raising=False)

    def mistake(argv):
        raise ConfigError("train.steps must be an integer >= 1, got -5\n(second line folded)")

    assert run_main(mistake, []) == USER_ERROR
    err = capsys.readouterr().err
    assert err == "error: train.steps must be an integer >= 1, got -5 (second line folded)\n"
    assert run_main(mistake, ["--debug"]) == USER_ERROR
    assert "Traceback" in capsys.readouterr().err

    def bug(argv):
        raise KeyError("a bug of ours")

    with pytest.raises(KeyError):
        run_main(bug, [])


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
