"""The built-in demo end to end at toy size (the real one is timed by hand: see the README): it writes a checkpoint
and a labelled grid and says where."""
from PIL import Image

from dit_gspn.commands import demo

from helpers.training import TOY_DEMO


def test_demo_writes_a_checkpoint_and_a_labelled_grid_and_says_where(tmp_path, capsys, fresh_accelerate_state):
    assert demo.main(["--out", str(tmp_path / "run"), *TOY_DEMO]) == 0
    printed = capsys.readouterr().out
    ckpt = tmp_path / "run" / "checkpoints" / "0000002"
    grid = tmp_path / "run" / "samples" / "0000002.png"
    assert str(ckpt) in printed and str(grid) in printed
    assert (ckpt / "ema" / "config.json").is_file() and (ckpt / "sampling.json").is_file()
    width, height = Image.open(grid).size
    assert width >= 10 * 32 and width > 3 * height  # 10 class columns, one labelled sample each
