"""The objective objects: registry, what each one tells the trainer and the samplers, and their losses."""
import pytest
import torch

from dit_gspn.errors import UserError
from dit_gspn.diffusion import (DIT_SCHEDULE, OBJECTIVES, SAMPLERS, DiffusionObjective, FlowObjective,
                                check_sampling, get_objective, objective_of_sampler)
from dit_gspn.diffusion.samplers import SamplerSettingError
from dit_gspn.registry import UnknownNameError


def test_registry_names_each_objective_and_refuses_an_unknown_one_naming_the_choices():
    assert OBJECTIVES.names() == ("ddpm", "flow")
    assert isinstance(get_objective("ddpm"), DiffusionObjective) and isinstance(get_objective("flow"), FlowObjective)
    with pytest.raises(UnknownNameError, match="unknown training objective 'edm'; choose one of ddpm, flow"):
        get_objective("edm")
    assert issubclass(UnknownNameError, UserError) and issubclass(UnknownNameError, ValueError)


def test_every_sampler_belongs_to_exactly_one_objective_with_a_default():
    owners = {sampler: [name for name in OBJECTIVES if sampler in get_objective(name).samplers()] for sampler in SAMPLERS}
    assert all(len(names) == 1 for names in owners.values()), owners
    assert {s: objective_of_sampler(s).name for s in SAMPLERS} == {s: names[0] for s, names in owners.items()}
    assert (get_objective("ddpm").default_sampler, get_objective("flow").default_sampler) == ("ddpm", "euler")
    assert check_sampling("heun", "flow", num_steps=7)[1] == 7
    with pytest.raises(ValueError, match="sampler 'euler' does not fit a model trained with the 'ddpm' objective"):
        check_sampling("euler", "ddpm")
    with pytest.raises(ValueError, match="sampler 'euler' does not fit a model trained with the 'ddpm' objective"):
        get_objective("ddpm").schedule("euler")
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        objective_of_sampler("lms")


@pytest.mark.parametrize("sampler, objective, num_steps, flow_shift, setting, message", [
    ("lms", "ddpm", None, 1.0, "sampler", "unknown sampler 'lms'.*choose one of ddpm, ddim"),
    ("heun", "ddpm", None, 1.0, "sampler", "sampler 'heun' does not fit .* 'ddpm' objective; use one of ddpm, ddim"),
    ("ddim", "ddpm", 60, 1.0, "num_steps", "nearest counts that can are 59 or 63"),
    ("ddpm", "ddpm", 1001, 1.0, "num_steps", ""),
    ("sde", "flow", 1, 1.0, "num_steps", "the sde sampler takes an integer number of steps >= 2, got 1"),
    ("euler", "flow", 0, 1.0, "num_steps", ">= 1, got 0"),
    ("ddpm", "ddpm", 10, 3.0, "flow_shift", "the timestep shift applies to the samplers euler, heun, sde"),
    ("euler", "flow", 10, -1.0, "flow_shift", "positive number"),
])
def test_one_check_of_a_samplers_settings_names_the_setting(sampler, objective, num_steps, flow_shift, setting,
                                                               message):
    with pytest.raises(SamplerSettingError, match=message) as info:
        check_sampling(sampler, objective, num_steps, flow_shift)
    assert info.value.setting == setting
    spec, steps = check_sampling("euler", "flow", None, 3.0)
    assert (spec.name, steps) == ("euler", 50)


def test_what_the_model_predicts_and_its_timesteps():
    ddpm, flow = get_objective("ddpm"), get_objective("flow")
    assert (ddpm.learn_sigma, ddpm.prediction, flow.learn_sigma, flow.prediction) == (True, "epsilon", False,
                                                                                     "velocity")
    t = ddpm.sample_timesteps(4096, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == DIT_SCHEDULE["num_train_timesteps"] - 1
    s = flow.sample_timesteps(4096, torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and 0 <= float(s.min()) and float(s.max()) <= 1
    assert ddpm.model_timesteps(torch.tensor(999.0), 3, "cpu").tolist() == [999] * 3
    fractional = flow.model_timesteps(torch.tensor(512.5), 2, "cpu")
    assert fractional.dtype == torch.float32 and fractional.tolist() == [512.5, 512.5]


def test_settings_are_the_constructors_keyword_options():
    flow = get_objective("flow", timestep_sampling="logit_normal", shift=3.0)
    assert (flow.process.timestep_sampling, flow.shift) == ("logit_normal", 3.0)
    assert get_objective("ddpm", snr_gamma=5).snr_gamma == 5.0


def test_flow_loss_is_the_velocity_mse_in_float64():
    gen = torch.Generator().manual_seed(3)
    x, noise = torch.randn(5, 3, 4, 4, generator=gen), torch.randn(5, 3, 4, 4, generator=gen)
    weight = torch.randn(3, 3, generator=gen)
    objective = get_objective("flow", shift=2.0)
    s = objective.sample_timesteps(5, gen)

    def model(x_s, timestep, y):
        assert torch.allclose(timestep, s * 1000) and y.tolist() == [0, 1, 2, 3, 4]
        return torch.einsum("oc,bchw->bohw", weight, x_s)

    loss = objective.losses(model, x, s, dict(y=torch.arange(5)), noise)["loss"]
    x64, n64, s64 = x.double(), noise.double(), s.double().view(-1, 1, 1, 1)
    prediction = torch.einsum("oc,bchw->bohw", weight.double(), (1 - s64) * x64 + s64 * n64)
    expected = ((prediction - (n64 - x64)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_ddpm_loss_weights_the_epsilon_mse_by_min_snr():
    gen = torch.Generator().manual_seed(4)
    x, noise = torch.randn(6, 2, 3, 3, generator=gen), torch.randn(6, 2, 3, 3, generator=gen)
    t = torch.tensor([0, 10, 100, 400, 700, 999])
    model = lambda x_t, timestep, y: torch.cat([0.5 * x_t, torch.zeros_like(x_t)], 1)  # noqa: E731
    plain = get_objective("ddpm").losses(model, x, t, dict(y=None), noise)
    weighted = get_objective("ddpm", snr_gamma=5.0).losses(model, x, t, dict(y=None), noise)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(weighted["mse"].double(), plain["mse"].double() * snr.clamp(max=5.0) / snr,
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weighted["vb"], plain["vb"])


def test_schedule_builds_only_the_objectives_samplers():
    ddpm, flow = get_objective("ddpm"), get_objective("flow")
    assert ddpm.schedule("ddpm", 10).takes_variance and not ddpm.schedule("ddpm", 10, learn_sigma=False).takes_variance
    assert not ddpm.schedule("ddim", 10).takes_variance and not ddpm.schedule("ddim", 10).stochastic
    assert flow.schedule("sde", 10).stochastic and not flow.schedule("euler", 10).stochastic
    assert len(flow.schedule("euler", 7, flow_shift=3.0).model_timesteps) == 7
    with pytest.raises(ValueError, match="sampler 'ddim' does not fit a model trained with the 'flow' objective"):
        flow.schedule("ddim", 10)


def test_a_variant_objective_is_drawn_by_the_samplers_of_the_one_it_inherits_from():
    """A new objective that trains another way towards a velocity (a subclass of flow matching) is one registration:
    flow's samplers draw its models, and the config accepts them, with no sampler registered again."""
    from dit_gspn.diffusion import register_objective
    from dit_gspn.diffusion.objective import OBJECTIVES as registry
    from dit_gspn.training.config import parse_config

    @register_objective
    class LateFlow(FlowObjective):
        """Flow matching that draws only noise levels above ``low``."""

        name = "late-flow"

        def __init__(self, low: float = 0.5):
            super().__init__()
            self.low = low

        def sample_timesteps(self, batch, generator=None):
            return self.low + (1 - self.low) * torch.rand(batch, generator=generator)

    try:
        assert LateFlow.samplers() == get_objective("flow").samplers() and check_sampling("heun", "late-flow")[1] == 50
        config = parse_config({"train": {"objective": "late-flow", "objective_kwargs": {"low": 0.25}}})
        assert (config.logging.sampler, config.objective.low, config.model.options["learn_sigma"]) == ("euler", 0.25,
                                                                                                        False)
        with pytest.raises(SamplerSettingError, match="does not fit a model trained with the 'late-flow' objective"):
            check_sampling("ddim", "late-flow")
    finally:
        registry.unregister("late-flow")
