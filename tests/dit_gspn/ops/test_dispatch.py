"""dit_gspn.ops.dispatch: which implementation runs a scan op, from the device, dtype and shape alone (a CPU
machine checks the CUDA rules with a stand-in tensor), and the environment variable that forces one."""
import pytest
import torch

from dit_gspn.ops import dispatch
from dit_gspn.ops.dispatch import IMPL_ENV, impl_from_env


def test_impl_env_variable(monkeypatch):
    monkeypatch.setenv(IMPL_ENV, "composed")
    assert impl_from_env() == "composed"
    monkeypatch.setenv(IMPL_ENV, "triton")
    with pytest.raises(ValueError, match=IMPL_ENV):
        impl_from_env()


@pytest.mark.parametrize("dtype, lanes, expected", [(torch.float32, 16, "cuda"), (torch.bfloat16, 16, "cuda"),
                                                    (torch.float64, 16, "composed"), (torch.float32, 4096, "composed")])
def test_impl_none_on_cuda_falls_back_where_the_kernel_cannot_run(monkeypatch, dtype, lanes, expected):
    # Decided from the device type, dtype and shape alone, so a CPU machine checks it with a stand-in tensor.
    from types import SimpleNamespace

    monkeypatch.setattr(dispatch, "kernels_loaded", lambda device_type: True)
    monkeypatch.setattr(dispatch, "kernel_usable", lambda op, device: True)
    x = SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(1, 2, 8, lanes))
    assert dispatch.resolve_impl("gspn_scan", (x,), None) == expected
    if dtype == torch.float64:
        with pytest.raises(TypeError, match="use impl='composed'"):
            dispatch.resolve_impl("gspn_scan", (x,), "cuda")
    if lanes > dispatch.CUDA_MAX_LANES:
        with pytest.raises(ValueError, match="at most 2048 pixels"):
            dispatch.resolve_impl("gspn_scan", (x,), "cuda")


@pytest.mark.parametrize("W, expected", [(2048, "cuda"), (2049, "reference")])
def test_line_scan_resolves_by_the_same_rules(monkeypatch, W, expected):
    # line_scan's lanes are its rows (dim -1) only, and its CUDA kernel computes every floating dtype.
    from types import SimpleNamespace

    monkeypatch.setattr(dispatch, "kernel_usable", lambda op, device: True)
    x = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64, shape=(1, 4096, W))
    assert dispatch.resolve_impl("line_scan", (x,), None) == expected
    with dispatch.scan_impl("composed"):  # an implementation line_scan does not offer: its automatic choice
        assert dispatch.resolve_impl("line_scan", (x,), None) == expected
    with dispatch.scan_impl("reference"):
        assert dispatch.resolve_impl("line_scan", (x,), None) == "reference"
