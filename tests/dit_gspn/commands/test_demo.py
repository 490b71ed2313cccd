"""The demo's config (dit_gspn.commands.demo): GSPN in pixel space on the shapes, within its time budget."""
from dit_gspn.commands import demo
from dit_gspn.training import load_config


def test_demo_config_trains_gspn_in_pixel_space_within_the_time_budget():
    config = load_config(demo.DEMO_CONFIG)
    assert config["model"]["name"].startswith("GSPN-")
    assert config["data"]["kind"] == "shapes" and config["train"]["cpu"] is True
    # 5 minutes in all on 2 cores: imports, training capped at 4 minutes (the CPU kernel build, ~30 s on a
    # fresh machine, happens inside it), then the grid (~15 s).
    assert config["train"]["time_limit_minutes"] is not None and config["train"]["time_limit_minutes"] <= 4.0
