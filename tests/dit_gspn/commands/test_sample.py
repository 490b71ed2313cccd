"""sample.py's command (dit_gspn.commands.sample) in this process: grid mode at a non-square size, and the
guidance interval and timestep shift recorded with the shards or refused."""
import json

import pytest
from PIL import Image

from dit_gspn.errors import UserError
from dit_gspn.work_folder import MANIFEST
from dit_gspn.ops.gspn_scan import gspn_scan_impl

from helpers.entry_points import load_script
from helpers.tiny_models import tiny_dit, write_training_checkpoint


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A tiny GSPN-DiT training checkpoint with four named classes."""
    path = tmp_path_factory.mktemp("sample") / "ckpt"
    with gspn_scan_impl("reference"):
        write_training_checkpoint(path, tiny_dit(num_classes=4), class_names=["w", "x", "y", "z"])
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread", "reference_scan")


def _import_sample_py():
    return load_script("sample").main


def test_grid_mode_writes_labelled_png_at_a_non_square_size(training_checkpoint, tmp_path, capsys):
    sample_main = _import_sample_py()
    assert sample_main(["--ckpt", str(training_checkpoint), "--num-steps", "3", "--classes", "1", "3",
                        "--per-class", "2", "--image-size", "8", "16", "--weights", "model",
                        "--out", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png")
    # 2 per row, 2 rows; 8x16 tiles enlarged 6x to 48x96, plus padding and the caption strip
    assert grid.size == (2 * (96 + 4), 2 * (48 + 16 + 4))
    assert "classes [1, 3]" in capsys.readouterr().out


def test_cli_records_the_guidance_interval_and_shift_and_refuses_bad_ones(training_checkpoint, tmp_path):
    sample_main = _import_sample_py()
    out = tmp_path / "interval.npz"
    assert sample_main(["--ckpt", str(training_checkpoint), "--num-steps", "3", "--num-samples", "2",
                        "--batch-size", "2", "--cfg-scale", "2", "--guidance-interval", "0.2", "0.6",
                        "--keep-shards", "--out", str(out)]) == 0
    settings = json.loads((tmp_path / "interval.npz.shards" / MANIFEST).read_text())
    assert settings["guidance_interval"] == [0.2, 0.6] and settings["flow_shift"] == 1.0
    assert settings["num_steps"] == 3 and settings["sampler"] == "ddpm"
    for bad, message in ((["--guidance-interval", "0.7", "0.1"], "--guidance-interval: the guidance interval"),
                         (["--flow-shift", "0"], "--flow-shift: the timestep shift must be")):
        with pytest.raises(UserError, match=message):
            sample_main(["--ckpt", str(training_checkpoint), *bad])
