// Input checks and sizes of the fused GSPN scan ops, shared by the CPU and CUDA entry points
// (host code only). The public entry (dit_gspn/ops/gspn_scan.py) checks every argument and gives the
// user's messages; here only what keeps a direct torch.ops.gspn call from reading or writing out of
// bounds: the shapes and channel groups the index arithmetic assumes, one dtype (the kernels read every
// tensor as x's scalar type) and one device. A wrong chunk only changes where scans restart, and a
// non-floating dtype is refused by the kernels' type dispatch.
#pragma once

#include <ATen/ATen.h>

#include "gspn_scan_common.h"

namespace gspn {

inline ScanShape check_inputs(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& gl, const at::Tensor& gc,
                              const at::Tensor& gr, const at::Tensor& u) {
  TORCH_CHECK(x.dim() == 4, "gspn_scan: x must be (B, C, H, W), got shape ", x.sizes());
  ScanShape shape{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, 0, 0, 0};
  const char* names[] = {"lam", "gl", "gc", "gr", "u"};
  const at::Tensor* gates[] = {&lam, &gl, &gc, &gr, &u};
  int64_t* groups[] = {&shape.g_lam, &shape.g_gl, &shape.g_gc, &shape.g_gr, &shape.g_u};
  for (int k = 0; k < 5; ++k) {
    const at::Tensor& t = *gates[k];
    TORCH_CHECK(t.dim() == 5 && t.size(0) == shape.B && t.size(1) == kDirections && t.size(3) == shape.H &&
                    t.size(4) == shape.W,
                "gspn_scan: ", names[k], " must be (B, 4, G, H, W) = (", shape.B, ", 4, G, ", shape.H, ", ", shape.W,
                "), got ", t.sizes());
    TORCH_CHECK(t.size(2) >= 1 && shape.C % t.size(2) == 0, "gspn_scan: ", names[k], "'s group count G=", t.size(2),
                " must divide C=", shape.C);
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "gspn_scan: ", names[k], " has dtype ", t.scalar_type(),
                " but x has ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "gspn_scan: ", names[k], " is on ", t.device(), " but x is on ", x.device());
    *groups[k] = t.size(2);
  }
  return shape;
}

// The layout of the op's outputs y and dx: x's own where x is channels-last ((B, H, W, C) in memory, as a
// (B, N, C) token tensor viewed as a map), else contiguous. Gate gradients are always contiguous.
inline at::MemoryFormat scan_memory_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// The backward's incoming gradient must have y's (that is, x's) shape and dtype.
inline void check_grad_output(const at::Tensor& gy, const at::Tensor& x) {
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.scalar_type() == x.scalar_type(),
              "gspn_scan backward: grad_y must match y's shape ", x.sizes(), " and dtype ", x.scalar_type(),
              ", got ", gy.sizes(), " ", gy.scalar_type());
}

}  // namespace gspn
