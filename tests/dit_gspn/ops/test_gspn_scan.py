"""dit_gspn.ops.gspn_scan without a compiled kernel: the composed implementation equals the reference, every bad
input is refused naming what is wrong, and importing the package defines the ops for fake tensors before any build."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dit_gspn.ops import gspn_scan

from helpers.gspn_scan_inputs import make_inputs


def test_composed_impl_equals_reference():
    inputs = make_inputs(2, 4, 6, 5, (2, 4, 1, 2, 4), torch.float32)
    torch.testing.assert_close(
        gspn_scan(*inputs, chunk=4, impl="composed"), gspn_scan(*inputs, chunk=4, impl="reference")
    )


def _replace(inputs, index, tensor):
    out = list(inputs)
    out[index] = tensor
    return out


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: _replace(a, 0, a[0][0]), ValueError, r"x must be a \(B, C, H, W\)"),
        (lambda a: _replace(a, 2, a[2][:, :, :, :-1]), ValueError, r"gl must be \(B, 4, G, H, W\)"),
        (lambda a: _replace(a, 1, a[1][:, :3]), ValueError, r"lam must be \(B, 4, G, H, W\)"),
        (lambda a: _replace(a, 5, torch.randn(1, 4, 3, 3, 5)), ValueError, r"u's group count G=3 must divide"),
        (lambda a: _replace(a, 3, a[3].double()), TypeError, "gc has dtype torch.float64"),
        (lambda a: _replace(a, 0, a[0].to(torch.int64)), TypeError, "x must be floating point"),
    ],
)
def test_bad_inputs_raise_actionable_errors(mutate, error, match):
    inputs = make_inputs(1, 4, 3, 5, None, torch.float32)
    with pytest.raises(error, match=match):
        gspn_scan(*mutate(inputs))


@pytest.mark.parametrize("chunk", [0, -2, 1.5, True, "4"])
def test_bad_chunk_raises(chunk):
    with pytest.raises(ValueError, match="chunk must be None"):
        gspn_scan(*make_inputs(1, 2, 3, 3), chunk=chunk)


def test_bad_impl_raises():
    inputs = make_inputs(1, 2, 3, 3)
    with pytest.raises(ValueError, match="impl must be one of"):
        gspn_scan(*inputs, impl="triton")
    with pytest.raises(ValueError, match="needs cuda tensors"):
        gspn_scan(*inputs, impl="cuda")


def test_the_ops_are_defined_with_fake_tensors_before_any_kernel_is_built():
    """Importing the package defines every op's schema, fake tensors and autograd; no build runs, so
    torch.compile and fake-tensor tracing see the same ops whether or not the kernels built."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from dit_gspn.ops import extension
        with FakeTensorMode():
            x = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
            gates = [torch.empty(2, 4, 3, 4, 5) for _ in range(5)]
            y = torch.ops.gspn.gspn_scan_fwd(x, *gates, 0)
            h = torch.ops.gspn.line_scan_fwd(*(torch.empty(3, 4, 5) for _ in range(5)), 0)
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last), y.stride()
        assert h.shape == (3, 4, 5)
        assert extension.loaded_build() is None
        print("OK")
    """)], capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]
