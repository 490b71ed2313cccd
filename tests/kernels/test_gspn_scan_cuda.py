"""The fused four-direction scan's CUDA kernel (``cuda``-marked: run by `make gpu-check`, skipped without a GPU)
equals the float64 reference, forward and backward, in every dtype, on large maps, compiled, and on the current
stream."""
import pytest
import torch

from dit_gspn.ops import gspn_scan

from helpers.gspn_scan_inputs import (GATES, SHAPES, assert_close_scaled, fused_with_grads, make_inputs,
                                      reference_with_grads)


CUDA_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-G{s[4]}-chunk{s[5]}")
def test_cuda_kernel_matches_reference(shape, dtype):
    B, C, H, W, groups, chunk = shape
    inputs = make_inputs(B, C, H, W, groups, dtype, device="cuda")
    grad_y = torch.randn(B, C, H, W, dtype=torch.float64).to(device="cuda", dtype=dtype)
    y_ref, grads_ref = reference_with_grads(inputs, chunk, grad_y)
    y, grads = fused_with_grads(inputs, chunk, grad_y, impl="cuda")
    assert y.dtype == dtype and y.is_cuda
    tol = CUDA_TOLERANCE[dtype]
    assert_close_scaled(y, y_ref, tol, "y")
    for name, g, g_ref in zip(("x",) + GATES, grads, grads_ref):
        assert_close_scaled(g, g_ref, tol, f"d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "B, C, H, W, groups, chunk",
    [
        (2, 64, 128, 96, (64, 32, 1, 64, 32), None),  # non-square, mixed groups, global
        (1, 16, 512, 384, None, 64),  # a large map, chunked
        (1, 2, 2048, 8, None, None),  # the longest lanes the kernel takes (shared-memory tiles shrink)
        (1, 1, 40, 2048, (1, 1, 1, 1, 1), 7),
    ],
)
def test_cuda_large_maps_match_the_reference(B, C, H, W, groups, chunk):
    # The float64 reference on the GPU is the oracle.
    inputs = make_inputs(B, C, H, W, groups, torch.float32, device="cuda")
    grad_y = torch.randn(B, C, H, W, device="cuda")
    y_ref, grads_ref = reference_with_grads(inputs, chunk, grad_y)
    y, grads = fused_with_grads(inputs, chunk, grad_y, impl="cuda")
    assert_close_scaled(y, y_ref, 1e-4, "y")
    for name, g, g_ref in zip(("x",) + GATES, grads, grads_ref):
        assert_close_scaled(g, g_ref, 1e-4, f"d{name}")


@pytest.mark.cuda
def test_cuda_bf16_large_map_matches_float64():
    inputs = make_inputs(2, 32, 256, 256, (32, 8, 8, 8, 32), torch.bfloat16, device="cuda")
    grad_y = torch.randn(2, 32, 256, 256, device="cuda").bfloat16()
    y_ref, grads_ref = reference_with_grads(inputs, None, grad_y)
    y, grads = fused_with_grads(inputs, None, grad_y, impl="cuda")
    assert_close_scaled(y, y_ref, 2e-2, "y")
    for name, g, g_ref in zip(("x",) + GATES, grads, grads_ref):
        assert_close_scaled(g, g_ref, 2e-2, f"d{name}")


@pytest.mark.cuda
def test_cuda_equals_cpu_kernel_and_compiles():
    inputs = make_inputs(2, 8, 16, 12, (8, 4, 1, 8, 4), torch.float32, requires_grad=True)
    y_cpu = gspn_scan(*inputs, chunk=5, impl="cpu")
    cuda_inputs = [t.detach().cuda().requires_grad_() for t in inputs]
    compiled = torch.compile(lambda *a: gspn_scan(*a, chunk=5), fullgraph=True)
    y_cuda = compiled(*cuda_inputs)
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
    grads_cpu = torch.autograd.grad(y_cpu.sum(), inputs)
    grads_cuda = torch.autograd.grad(y_cuda.sum(), cuda_inputs)
    for g_cpu, g_cuda in zip(grads_cpu, grads_cuda):
        torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_uses_the_current_stream():
    inputs = make_inputs(1, 4, 32, 32, None, torch.float32, device="cuda")
    expected = gspn_scan(*inputs, impl="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = gspn_scan(*inputs, impl="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
