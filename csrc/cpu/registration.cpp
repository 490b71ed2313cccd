// Every schema of the `gspn` torch op namespace, in one place. Kernels attach to them with
// TORCH_LIBRARY_IMPL(gspn, CPU/CUDA, m) in their own sources; autograd and fake (meta)
// implementations are registered from Python (dit_gspn/ops/dispatch.py::register_op), after this
// library is loaded. A new op adds its m.def lines here and an OpSpec to dispatch.OPS.
#include <torch/library.h>

TORCH_LIBRARY(gspn, m) {
  // h = line scan of x (see csrc/scan_math.h); chunk = 0 runs the whole height.
  m.def("line_scan_fwd(Tensor x, Tensor lam, Tensor wl, Tensor wc, Tensor wr, int chunk) -> Tensor");
  // Gradients (dx, dlam, dwl, dwc, dwr) from grad_h and the forward's output h.
  m.def(
      "line_scan_bwd(Tensor grad_h, Tensor h, Tensor x, Tensor lam, Tensor wl, Tensor wc, Tensor wr, "
      "int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // y = sum over the four directions of u * (line scan of x with the normalised gates); gl, gc, gr raw
  // logits, every gate tensor (B, 4, G, H, W). Contract: dit_gspn/ops/reference.py::gspn_scan_reference.
  m.def("gspn_scan_fwd(Tensor x, Tensor lam, Tensor gl, Tensor gc, Tensor gr, Tensor u, int chunk) -> Tensor");
  // Gradients (dx, dlam, dgl, dgc, dgr, du) from grad_y and the forward's inputs (the states are recomputed).
  m.def(
      "gspn_scan_bwd(Tensor grad_y, Tensor x, Tensor lam, Tensor gl, Tensor gc, Tensor gr, Tensor u, int chunk)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
