"""dit_gspn.training.encoders: a frozen encoder from a torch.export or TorchScript file (the same features, no
deprecation warning), and each spec that cannot load named with what to do."""
import warnings

import pytest
import torch

from dit_gspn.training.encoders import EncoderError, load_encoder
from dit_gspn.errors import MissingFileError

from helpers.tiny_models import tiny_encoder


def test_encoder_specs_and_their_errors(encoder_file, tmp_path, monkeypatch):
    encoder = load_encoder(str(encoder_file))
    assert encoder(torch.zeros(2, 3, 16, 16)).shape == (2, 6, 8, 8)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    # the same network as a TorchScript file still loads, to the same features, without torch's deprecation warning
    torch.manual_seed(11)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(tiny_encoder().eval(), torch.zeros(1, 3, 16, 16)), str(tmp_path / "enc.pt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = load_encoder(str(tmp_path / "enc.pt"))
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(scripted(images), encoder(images))
    with pytest.raises(EncoderError, match="needs timm"):
        load_encoder("timm:vit_base_patch14_dinov2")
    with pytest.raises(EncoderError, match="neither a file"):
        load_encoder(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("not torchscript")
    with pytest.raises(EncoderError, match="neither a torch.export program .* nor a TorchScript file"):
        load_encoder(str(tmp_path / "junk.pt"))

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno 101] Network is unreachable>")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(MissingFileError, match=r"dinov2_vitb14.*torch.hub.load\('facebookresearch/dinov2'"):
        load_encoder("dinov2_vitb14")
