"""dit_gspn.diffusion.respacing: the timesteps a DDPM sampler of N steps visits are ADM's space_timesteps for every
N in 1..1000, and DDIM's are ADM's ddimN for every N it can take (helpers.adm_sampling, float64)."""
import numpy as np
import pytest

from dit_gspn.diffusion import DDIM_COUNTS, check_sampling, ddim_timesteps, ddpm_timesteps

from helpers import adm_sampling as adm


def test_ddpm_respacing_is_adms_for_every_count():
    for n in range(1, 1001):
        kept = ddpm_timesteps(n)
        assert kept == adm.space_timesteps(n), n
    # ADM's float accumulation leaves linspace's rounding at 278 counts, e.g. 499 instead of 500 for N = 21.
    differs = [n for n in range(1, 1001) if ddpm_timesteps(n) != np.linspace(0, 999, n).round().astype(int).tolist()]
    assert len(differs) == 278 and 499 in ddpm_timesteps(21) and 500 not in ddpm_timesteps(21)
    assert ddpm_timesteps(250)[:4] == [0, 4, 8, 12] and ddpm_timesteps(250)[-1] == 999
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="DDPM takes 1 to 1000 steps"):
            ddpm_timesteps(bad)


def test_ddim_respacing_is_adms_ddimN_for_every_count():
    assert DDIM_COUNTS == tuple(n for n in range(1, 1001) if adm.ddim_stride(n) is not None)
    for n in range(1, 1001):
        if n in DDIM_COUNTS:
            assert ddim_timesteps(n) == adm.ddim_timesteps(n), n
        else:
            with pytest.raises(ValueError, match=f"exactly {n} steps"):
                ddim_timesteps(n)
    assert ddim_timesteps(3) == [0, 334, 668] and ddim_timesteps(50)[:3] == [0, 20, 40]
    with pytest.raises(ValueError, match="nearest counts that can are 59 or 63"):
        check_sampling("ddim", "ddpm", num_steps=60)
    check_sampling("ddim", "ddpm", num_steps=59)
