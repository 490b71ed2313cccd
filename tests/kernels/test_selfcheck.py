"""A compiled kernel checks itself against the reference before ``impl=None`` trusts it on a device: a planted
wrong (or raising) kernel is caught, named in one warning, recorded beside the build and replaced by the op's
fallback; a recorded verdict is read instead of checking again; the real kernels pass on this CPU."""
import json
import warnings

import pytest
import torch

from dit_gspn.ops import extension, gspn_scan, line_scan, normalize_gates, selfcheck
from dit_gspn.ops.reference import gspn_scan_reference, line_scan_reference

CPU = selfcheck.describe(torch.device("cpu"))


@pytest.fixture
def verdicts(tmp_path, monkeypatch):
    """A private verdict file (the shared build's is left alone) and a process that has checked nothing yet."""
    assert extension.load("cpu"), "the CPU gspn kernels did not build (see the warning)"
    path = tmp_path / selfcheck.VERDICTS
    monkeypatch.setattr(selfcheck, "verdict_file", lambda: path)
    selfcheck.trusted.cache_clear()
    yield path
    selfcheck.trusted.cache_clear()


def plant(monkeypatch, name, kernel):
    """Replace the compiled op ``torch.ops.gspn.<name>`` by ``kernel(real_op, *args)``; returns its call count."""
    real = getattr(torch.ops.gspn, name)
    calls = []

    def planted(*args):
        calls.append(1)
        return kernel(real, *args)

    monkeypatch.setattr(torch.ops.gspn, name, planted)
    return calls


def scan_inputs(requires_grad=False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 6, generator=gen)
    gates = [torch.randn(2, 4, 2, 5, 6, generator=gen) for _ in range(5)]
    return [t.requires_grad_(requires_grad) for t in (x, *gates)]


def runtime_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_wrong_kernel_is_caught_named_once_recorded_and_replaced_by_the_fallback(verdicts, monkeypatch):
    calls = plant(monkeypatch, "gspn_scan_fwd", lambda real, *a: real(*a) * 1.001)  # 0.1% off: far beyond fp32
    inputs = scan_inputs(requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = gspn_scan(*inputs, chunk=2)
        checked = len(calls)
        second = gspn_scan(*inputs, chunk=2)
    assert checked > 0 and len(calls) == checked  # the check ran the kernel; the ops after it did not
    expected = gspn_scan_reference(*(t.detach().double() for t in inputs), chunk=2)
    for y in (first, second):  # the composed implementation ran
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.autograd.grad(second.sum(), inputs)  # and it is differentiable as ever
    messages = runtime_warnings(caught)
    assert len(messages) == 1, messages
    assert "gspn_scan" in messages[0] and CPU in messages[0] and "max error" in messages[0], messages[0]
    assert "impl='composed'" in messages[0] and str(verdicts) in messages[0], messages[0]
    record = json.loads(verdicts.read_text())
    assert record[CPU]["gspn_scan"]["agrees"] is False
    assert record[CPU]["gspn_scan"]["error"].startswith("max error 0.001 "), record  # the planted 0.1%
    assert record[CPU]["line_scan"]["agrees"] is True  # the composition's line_scan was checked and trusted
    gspn_scan(*inputs, impl="cpu")  # an explicit implementation runs as asked
    assert len(calls) == checked + 1


def test_a_kernel_that_raises_disagrees_and_says_what_it_raised(verdicts, monkeypatch):
    def broken(real, *args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    plant(monkeypatch, "line_scan_fwd", broken)
    x, lam = torch.randn(3, 5, 4), torch.rand(3, 5, 4)
    gates = normalize_gates(*(torch.randn(3, 5, 4) for _ in range(3)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = line_scan(x, lam, *gates)
    torch.testing.assert_close(h, line_scan_reference(x, lam, *gates), rtol=0, atol=0)  # the reference ran
    messages = runtime_warnings(caught)
    assert len(messages) == 1 and "RuntimeError: CUDA error: no kernel image" in messages[0], messages
    assert "more" not in messages[0]  # one line
    assert json.loads(verdicts.read_text())[CPU]["line_scan"]["agrees"] is False


@pytest.mark.parametrize("agrees", [True, False])
def test_a_recorded_verdict_is_read_instead_of_checking_again(verdicts, monkeypatch, agrees):
    verdicts.write_text(json.dumps({CPU: {"gspn_scan": {"agrees": agrees, "error": "max error 7 (recorded)"},
                                          "line_scan": {"agrees": True, "error": "max error 0"}}}))
    monkeypatch.setattr(selfcheck, "check", lambda op, device: pytest.fail(f"{op} was checked again"))
    calls = plant(monkeypatch, "gspn_scan_fwd", lambda real, *a: real(*a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gspn_scan(*scan_inputs())
    assert len(calls) == (1 if agrees else 0)
    messages = runtime_warnings(caught)
    assert messages == [] if agrees else (len(messages) == 1 and "max error 7 (recorded)" in messages[0]), messages


def test_the_check_leaves_the_callers_random_stream_and_grad_mode_alone(verdicts):
    state = torch.random.get_rng_state()
    with torch.inference_mode():
        assert selfcheck.trusted("gspn_scan", "cpu")  # checks (with gradients) though the caller is in inference mode
        assert torch.is_inference_mode_enabled()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert json.loads(verdicts.read_text())[CPU]["gspn_scan"]["agrees"] is True


def test_a_build_folder_it_cannot_write_leaves_the_verdict_to_this_process(verdicts, monkeypatch):
    blocked = verdicts.parent / "a_file"
    blocked.write_text("")  # no folder can be made here, by root either
    monkeypatch.setattr(selfcheck, "verdict_file", lambda: blocked / selfcheck.VERDICTS)
    calls = plant(monkeypatch, "gspn_scan_fwd", lambda real, *a: real(*a))
    y = gspn_scan(*scan_inputs())  # checked, trusted and run, though nothing could be recorded
    assert len(calls) > 1 and blocked.read_text() == ""
    torch.testing.assert_close(y.double(), gspn_scan_reference(*(t.double() for t in scan_inputs())), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("op", ["line_scan", "gspn_scan"])
def test_the_compiled_cpu_kernels_pass_their_check_on_this_machine(op):
    assert extension.load("cpu")
    verdict = selfcheck.check(op, torch.device("cpu"))
    assert verdict["agrees"], verdict
    assert verdict["error"].startswith("max error ")


def test_a_kernel_with_one_nan_in_its_output_disagrees_whatever_the_errors_after_it(verdicts, monkeypatch):
    def one_nan(real, *args):
        y = real(*args)
        poison = torch.zeros(y.numel(), dtype=y.dtype, device=y.device)
        poison[y.numel() // 2] = float("nan")
        poison = poison.view(y.shape)
        return y + poison  # the gradients pass through unchanged: only the output holds the NaN

    plant(monkeypatch, "gspn_scan_fwd", one_nan)
    verdict = selfcheck.check("gspn_scan", torch.device("cpu"))
    assert verdict["agrees"] is False, verdict
    assert verdict["error"].startswith("max error nan ") and " in output of " in verdict["error"], verdict
