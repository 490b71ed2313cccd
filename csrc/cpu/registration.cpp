// The one definition of the `gspn` torch op namespace. Kernels attach to these schemas with
// TORCH_LIBRARY_IMPL(gspn, CPU/CUDA, m); other sources add their own schemas with
// TORCH_LIBRARY_FRAGMENT(gspn, m). Autograd and fake (meta) implementations are registered
// from Python (dit_gspn/ops/line_scan.py), after this library is loaded.
#include <torch/library.h>

TORCH_LIBRARY(gspn, m) {
  // h = line scan of x (see csrc/line_scan_common.h); chunk = 0 runs the whole height.
  m.def("line_scan_fwd(Tensor x, Tensor lam, Tensor wl, Tensor wc, Tensor wr, int chunk) -> Tensor");
  // Gradients (dx, dlam, dwl, dwc, dwr) from grad_h and the forward's output h.
  m.def(
      "line_scan_bwd(Tensor grad_h, Tensor h, Tensor x, Tensor lam, Tensor wl, Tensor wc, Tensor wr, "
      "int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // y = gspn_scan(x, lam, gl, gc, gr, u, chunk) with lam = w_lam @ p and u = w_u @ p per pixel, viewed
  // (B, 4, C, H, W); p is (B, K, H, W), w_lam and w_u (4 C, K) (dit_gspn/ops/proxy_scan.py).
  m.def(
      "gspn_proxy_scan_fwd(Tensor x, Tensor p, Tensor w_lam, Tensor w_u, Tensor gl, Tensor gc, Tensor gr, "
      "int chunk) -> Tensor");
  // Gradients (dx, dp, dw_lam, dw_u, dgl, dgc, dgr) from grad_y and the forward's inputs.
  m.def(
      "gspn_proxy_scan_bwd(Tensor grad_y, Tensor x, Tensor p, Tensor w_lam, Tensor w_u, Tensor gl, Tensor gc, "
      "Tensor gr, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
