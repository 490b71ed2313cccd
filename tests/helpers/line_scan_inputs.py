"""The line_scan call that the CPU and CUDA kernel tests share: output and input gradients of one weighted sum."""
import torch

from dit_gspn.ops import line_scan


def forward_and_grads(inputs, chunk, impl, weight):
    """line_scan's output on copies of ``inputs`` and the gradients of sum(h * weight) for each input (zeros for
    an input the scan never reads)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    h = line_scan(*leaves, chunk=chunk, impl=impl)
    (h.float() * weight).sum().backward()
    return h, [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
