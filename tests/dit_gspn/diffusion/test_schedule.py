"""dit_gspn.diffusion.schedule: ``ddpm`` and ``ddim`` against ADM written out in float64 (``helpers.adm_sampling``):
the respaced timesteps with float64 tables, and every step's mean, variance and x0 (with and without clipping,
learned and fixed variance, the last step included) in float32 and float64."""
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm

from dit_gspn.diffusion import DDIM_COUNTS, make_schedule

from helpers import adm_sampling as adm


#: Per-step tolerances, relative to max(1, the magnitude of the terms a value is computed from): x0 =
#: x / sqrt(alpha_bar) - sqrt(1 / alpha_bar - 1) eps reaches ~500 at t = 999, and where its two terms cancel
#: float32 keeps only their magnitude's digits (as in ADM's own float32 arithmetic).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
#: Counts whose every step is checked: the smallest ones, DiT's 250, counts that do not divide 999 or 1000,
#: and the ones where ADM's accumulated rounding leaves linspace's (21, 25).
DDPM_COUNTS_STEPPED = (1, 2, 3, 7, 21, 25, 50, 250)


def test_schedules_visit_the_respaced_timesteps_with_float64_tables():
    """Every count's schedule calls the model at ADM's timesteps, last first, with ADM's alpha_bar there."""
    acp = adm.alpha_bars()
    for sampler, counts, lists in (("ddpm", range(1, 1001), adm.space_timesteps),
                                   ("ddim", DDIM_COUNTS, adm.ddim_timesteps)):
        for n in counts:
            schedule = make_schedule(sampler, n)
            kept = lists(n)
            assert schedule.model_timesteps.tolist() == kept[::-1], (sampler, n)
            table = schedule.scheduler.alphas_cumprod
            assert table.dtype == torch.float64
            np.testing.assert_allclose(table.numpy(), acp[kept], rtol=1e-14, err_msg=f"{sampler} {n}")


def _inputs(dtype, seed, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return x.to(dtype), eps.to(dtype), v.to(dtype)


def _deviation(ours, oracle, scale=None):
    """max |ours - oracle| / max(1, scale), scale defaulting to |oracle|."""
    scale = oracle.abs() if scale is None else scale
    return float(((ours.double() - oracle).abs() / scale.clamp(min=1)).max())


def _x0_scale(process, k, x, eps):
    """|x| / sqrt(alpha_bar) + sqrt(1 / alpha_bar - 1) |eps|: the size of x0's two terms."""
    ab = process.ab[k]
    return x.double().abs() / ab ** 0.5 + (1 / ab - 1) ** 0.5 * eps.double().abs()


def _ddpm_step(schedule, out, t, x, monkeypatch):
    """(mean, variance, x0) of one diffusers step: run with zero noise (the mean) and with noise 1024 (mean + 1024
    std: large enough that the float32 rounding of the mean does not swamp std)."""
    results = []
    for fill in (0.0, 1024.0):
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                            lambda shape, dtype=None, **_: torch.full(shape, fill, dtype=dtype))
        results.append(schedule.step(out, t, x))
    mean = results[0].prev_sample
    std = (results[1].prev_sample.double() - mean.double()) / 1024
    return mean, std ** 2, results[0].pred_original_sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("learned", [True, False], ids=["learned", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True], ids=["raw", "clip"])
def test_every_ddpm_step_equals_adm_p_sample(dtype, learned, clip, monkeypatch):
    worst = {"mean": 0.0, "variance": 0.0, "x0": 0.0}
    for n in DDPM_COUNTS_STEPPED:
        schedule = make_schedule("ddpm", n, clip_denoised=clip, learn_sigma=learned)
        process = adm.Respaced(adm.space_timesteps(n))
        for t, model_t in schedule.steps():
            k = int(t)
            assert int(model_t) == process.kept[k]
            x, eps, v = _inputs(dtype, seed=n * 1000 + k)
            out = torch.cat([eps, v], dim=1) if learned else eps
            ours = _ddpm_step(schedule, out, t, x, monkeypatch)
            oracle = process.p_sample(k, x.double(), eps.double(), v.double() if learned else None, clip)
            scales = (None, None, _x0_scale(process, k, x, eps))
            for name, a, b, scale in zip(worst, ours, oracle, scales):
                worst[name] = max(worst[name], _deviation(a, b, scale))
            assert ours[0].dtype == dtype
    assert max(worst.values()) < TOL[dtype], worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("clip", [False, True], ids=["raw", "clip"])
def test_every_ddim_step_equals_adm_ddim_sample(dtype, clip):
    """Every step of every ddimN count, the last one (alpha_bar_prev = 1: the x0 prediction) included."""
    worst = {"mean": 0.0, "x0": 0.0}
    clipped = 0
    for n in DDIM_COUNTS:
        schedule = make_schedule("ddim", n, clip_denoised=clip)
        process = adm.Respaced(adm.ddim_timesteps(n))
        for t, _ in schedule.steps():
            k = int(t)
            x, eps, _ = _inputs(dtype, seed=n * 1000 + k)
            result = schedule.step(eps, t, x)
            oracle = process.ddim_sample(k, x.double(), eps.double(), clip)
            worst["mean"] = max(worst["mean"], _deviation(result.prev_sample, oracle[0]))
            worst["x0"] = max(worst["x0"], _deviation(result.pred_original_sample, oracle[1],
                                                      _x0_scale(process, k, x, eps)))
            clipped += int((process.x0(k, x.double(), eps.double(), False).abs() > 1).any())
        assert torch.equal(result.prev_sample, result.pred_original_sample)  # the last step returns x0
    assert clipped > 100  # x0 left [-1, 1] at many steps, so clipping was exercised
    assert max(worst.values()) < TOL[dtype], worst
