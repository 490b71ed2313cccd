"""dit_gspn.training.ema: the update DiT makes and the warm-up diffusers' EMAModel makes."""
import torch


def test_ema_update_and_warmup_follow_dit_and_diffusers():
    from dit_gspn.training.ema import ema_decay_at, make_ema, update_ema

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema = make_ema(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    update_ema(ema, model, 0.9)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[k], 0.9 * before[k] + 0.1 * v)
    assert ema_decay_at(1, 0.9999, warmup=False) == 0.9999
    assert ema_decay_at(1, 0.9999, warmup=True) == 2 / 11 and ema_decay_at(10**6, 0.9999, warmup=True) == 0.9999
