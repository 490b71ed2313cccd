"""dit_gspn.training.config: OmegaConf structured configs typed once, overrides, errors naming the key, the
objective's settings checked, config.yaml round trips, the registered kinds' options checked as the built-in keys
are, and older configs upgraded."""
import pytest
import yaml

from dit_gspn.checkpoint.folder import write_config
from dit_gspn.training.config import DEFAULTS, ConfigError, config_changes, load_config, parse_config, read_saved_config

from helpers.repo import REPO


def test_defaults_are_the_schema():
    assert list(DEFAULTS) == ["run_dir", "seed", "model", "data", "train", "checkpoint", "logging", "repa"]
    assert DEFAULTS["model"] == {"name": "GSPN-XL/2"} and list(DEFAULTS["train"]["betas"]) == [0.9, 0.999]
    assert DEFAULTS["data"] == {"kind": "latents", "num_workers": 4}


def test_values_are_typed_once_and_the_objective_is_resolved():
    config = parse_config(load_config(None, ["train.lr=1", "train.betas=[0, 0.5]", "train.grad_clip=2",
                                             "train.objective=flow", "train.steps=7", "logging.cfg_scale=4"]))
    assert isinstance(config.train.lr, float) and config.train.lr == 1.0
    assert config.train.betas == (0.0, 0.5) and isinstance(config.train.grad_clip, float)
    assert config.train.steps == 7 and config.logging.cfg_scale == 4.0
    assert (config.logging.sampler, config.logging.sample_steps) == ("euler", 50)
    assert config.model.options["learn_sigma"] is False and config.objective.learn_sigma is False
    assert config.train.objective_kwargs == {"timestep_sampling": "uniform", "shift": 1.0}
    assert parse_config({}).logging.sampler == "ddpm"


@pytest.mark.parametrize("override, message", [
    ("train.steps=ten", "train.steps must be an integer, got 'ten'"),
    ("train.steps=0", "train.steps must be an integer >= 1, got 0"),
    ("train.steps=true", "train.steps must be an integer, got True"),
    ("train.lr=.nan", "train.lr must be a number > 0, got nan"),
    ("train.grad_clip=0", "train.grad_clip must be a number > 0 or null, got 0.0"),
    ("train.compile=maybe", "train.compile must be true or false, got 'maybe'"),
    ("train.betas=[0.9]", "train.betas"),
    ("train.stpes=3", "unknown key 'train.stpes' (did you mean steps?)"),
    ("train.objective=edm", "train.objective: unknown training objective 'edm'; choose one of ddpm, flow"),
    ("train.objective=flow train.objective_kwargs.timestep_sampling=cosine",
     "train.objective_kwargs: timestep_sampling must be one of"),
    ("train.objective_kwargs.shift=2", "unknown key 'train.objective_kwargs.shift'; the ddpm objective takes: "
                                       "snr_gamma"),
    ("train.min_lr=1e-6", "train.min_lr=1e-06 has no effect with train.lr_schedule=constant"),
    ("train.lr_decay_steps=100", "train.lr_decay_steps=100 has no effect with train.lr_schedule=constant"),
    ("train.lr_schedule=cosine train.warmup_steps=100 train.lr_decay_steps=100",
     "train.lr_decay_steps=100 must be above train.warmup_steps=100: the cosine would drop to train.min_lr"),
    ("train.lr_schedule=linear", "train.lr_schedule must be one of constant, cosine, got 'linear'"),
    ("data.flip=maybe", "data.flip must be true or false, got 'maybe'"),
    ("data.image_size=32", "unknown key 'data.image_size'; the latents dataset takes: path, flip"),
    ("data.kind=imagenet", "data.kind: unknown dataset kind 'imagenet'; choose one of latents, shapes"),
    ("model.depth=deep", "model.depth must be an integer, got 'deep'"),
    ("model.dpth=4", "unknown key 'model.dpth' (did you mean depth"),
    ("model.mixer=mamba", "model.mixer: unknown mixer 'mamba'; choose one of gspn, attention, gspn-paper"),
    ("model.mixer_kwargs.chunk=two", "model.mixer_kwargs.chunk must be an integer or null, got 'two'"),
    ("model.mixer_kwargs.chunks=2", "unknown key 'model.mixer_kwargs.chunks' (did you mean chunk?)"),
    ("model.name=GSPN-XL/3", "model.name: unknown zoo model 'GSPN-XL/3' (did you mean"),
    ("logging.sample_steps=0", "logging.sample_steps: the ddpm sampler takes an integer number of steps >= 1"),
    ("logging.sampler=euler", "logging.sampler: sampler 'euler' does not fit a model trained with the 'ddpm'"),
    ("logging.flow_shift=3", "logging.flow_shift: the timestep shift applies to the samplers euler, heun, sde"),
    ("logging.guidance_interval=[0.5]", "logging.guidance_interval: "),
    ("logging.cfg_scale=0.5", "logging.cfg_scale: the guidance scale must be >= 1 (1 = no guidance), got 0.5"),
    ("seed=-1", "seed must be an integer >= 0 and <= 2**63 - 1, got -1"),
    ("run_dir=", "run_dir must be a string, got None"),
    ('run_dir="\\t"', "run_dir must be a folder path, got '\\t'"),
    ("train.lr=[1,", "override 'train.lr=[1,': the value is not valid YAML"),
    ("train", "override 'train' must look like section.key=value"),
])
def test_each_mistake_names_its_key(override, message):
    with pytest.raises(ConfigError) as info:
        parse_config(load_config(None, override.split(" ")))
    assert message in str(info.value)


def test_mixed_precision_no_unquoted_is_no():
    """YAML 1.1 reads an unquoted `no` as false; `train.mixed_precision: no` still means no mixed precision."""
    assert parse_config(load_config(None, ["train.mixed_precision=no"])).train.mixed_precision == "no"


def test_a_file_names_itself_in_its_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  steps: ten\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.steps must be an integer, got 'ten'"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "latin1.yaml").write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match=r"is a folder, not a YAML file"):
        load_config(tmp_path)


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word: a second ``train:`` appended to a copy of a preset
    would silently drop the first one's settings."""
    text = (REPO / "configs" / "demo.yaml").read_text() + "train:\n  steps: 10\n"
    (tmp_path / "twice.yaml").write_text(text)
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("train:"))
    last = len(text.splitlines()) - 1
    with pytest.raises(ConfigError, match=rf"'train' is written twice, on lines {first} and {last}"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "inner.yaml").write_text("train:\n  lr: 1.0e-4\n  steps: 3\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"'train.lr' is written twice, on lines 2 and 4"):
        load_config(tmp_path / "inner.yaml")


def test_a_saved_config_reads_back_to_the_same_run(tmp_path):
    config = parse_config(load_config(REPO / "configs" / "demo.yaml", ["train.lr=2e-4", "logging.sample_classes=[1]"]))
    write_config(tmp_path, config.to_dict())
    saved = read_saved_config(tmp_path)
    assert parse_config(saved) == config and saved == config.to_dict()
    assert config_changes(saved, config.to_dict()) == {}
    changed = parse_config({**saved, "train": {**saved["train"], "lr": 3e-4, "steps": 1}})
    assert config_changes(saved, changed.to_dict()) == {"train.lr": (2e-4, 3e-4)}  # steps is resume-safe


def test_a_config_yaml_of_the_previous_format_reads_as_the_same_run(tmp_path):
    """A checkpoint's config.yaml as the schema before the registries wrote it (every data key of every kind,
    GSPN's options as gspn_* model arguments, the objective's as flat train keys) is the same run as today's
    demo config."""
    old = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    old["model"] = {"name": "GSPN-S/4", "hidden_size": 96, "depth": 4, "num_heads": 4, "gspn_chunk": None,
                    "gspn_gate_groups": 8, "use_pos_embed": True, "learn_sigma": False}
    old["data"] = {"kind": "shapes", "path": None, "flip": False, "num_per_class": 400, "image_size": 32,
                   "num_workers": 0}
    train = old["train"]
    del train["objective_kwargs"]
    train.update(flow_timesteps="logit_normal", flow_shift=1.0, snr_gamma=None)
    old["logging"]["fid_extractor"] = "shapes-classifier"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    today = parse_config(load_config(REPO / "configs" / "demo.yaml"))
    saved = read_saved_config(tmp_path)
    assert config_changes(saved, today.to_dict()) == {"model.mixer_kwargs.gate_groups": (8, None)}
    # gate_groups 8 is the zoo's default now: the same model, as its parameter shapes say
    from dit_gspn.models import create_model
    shapes = [{k: v.shape for k, v in create_model("GSPN-S/4", **{k: v for k, v in c["model"].items() if k != "name"},
                                                   input_size=32, in_channels=3, num_classes=10).state_dict().items()}
              for c in (saved, today.to_dict())]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_parses(preset):
    config = parse_config(load_config(preset))
    assert config.logging.sampler in config.objective.samplers()


def test_a_damaged_config_yaml_is_named_as_such(tmp_path):
    """A checkpoint's config.yaml is written whole; one cut short is damage, not a config change."""
    config = parse_config(load_config(REPO / "configs" / "demo.yaml"))
    write_config(tmp_path, config.to_dict())
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text[: text.index("model:")])
    with pytest.raises(ConfigError, match=r"config.yaml lacks the section\(s\) model, .*damaged or truncated"):
        read_saved_config(tmp_path)


def test_config_overrides_and_typos(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n  weight_decay: 1e-2\nmodel:\n  name: DiT-S/2\n  depth: 3\n")
    config = load_config(path, ["train.lr=3e-4", "model.hidden_size=64", "train.betas=[0.9, 0.95]"])
    assert config["train"]["steps"] == 5 and config["train"]["lr"] == 3e-4 and config["train"]["betas"] == [0.9, 0.95]
    assert config["model"] == {"name": "DiT-S/2", "depth": 3, "hidden_size": 64}
    assert config["train"]["ema_decay"] == 0.9999  # DiT's default survives
    assert config["train"]["weight_decay"] == 0.01  # YAML 1.1 would read 1e-2 as a string
    with pytest.raises(ConfigError, match="train.stpes.*did you mean steps"):
        load_config(path, ["train.stpes=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["train.steps"])


def test_objective_settings_are_checked_before_training(tmp_path):
    from dit_gspn.training.config import parse_config

    def resolved(*overrides):
        return parse_config(load_config(None, list(overrides))).to_dict()

    ddpm, flow = resolved(), resolved("train.objective=flow")
    assert (ddpm["model"]["learn_sigma"], ddpm["logging"]["sampler"]) == (True, "ddpm")
    assert (flow["model"]["learn_sigma"], flow["logging"]["sampler"]) == (False, "euler")
    with pytest.raises(ConfigError, match="train.objective: unknown training objective"):
        resolved("train.objective=edm")
    with pytest.raises(ConfigError, match="unknown key 'train.objective_kwargs.snr_gamma'; the flow objective takes"):
        resolved("train.objective=flow", "train.objective_kwargs.snr_gamma=5")
    with pytest.raises(ConfigError, match="model.learn_sigma=True does not fit train.objective=flow"):
        resolved("train.objective=flow", "model.learn_sigma=true")
    with pytest.raises(ConfigError, match="logging.sampler: sampler 'ddpm' does not fit.*'flow'"):
        resolved("train.objective=flow", "logging.sampler=ddpm")
    with pytest.raises(ConfigError, match="logging.sampler: sampler 'heun' does not fit.*'ddpm'"):
        resolved("logging.sampler=heun")
    with pytest.raises(ConfigError, match="logging.sample_steps: DDIM cannot take exactly 60 steps.*59 or 63"):
        resolved("logging.sampler=ddim", "logging.sample_steps=60")
    with pytest.raises(ConfigError, match="train.objective_kwargs: timestep_sampling must be one of"):
        resolved("train.objective=flow", "train.objective_kwargs.timestep_sampling=cosine")
