// Per-element math and index arithmetic of the fused four-direction GSPN scan, shared by the
// CPU kernel (csrc/cpu/gspn_scan_cpu.cpp) and the CUDA kernel (csrc/cuda/gspn_scan_cuda.cu).
//
// Contract: dit_gspn/ops/reference.py::gspn_scan_reference. For direction d the scan runs over
// S "steps" and L "lanes" of one (H, W) plane; step s, lane l lives at plane offset
//     origin + s * step_stride + l * lane_stride
// so that the four directions read the original layout with no flipped or transposed copies:
//     d=0 top-down    S=H, L=W, origin 0,         step +W, lane +1
//     d=1 bottom-up   S=H, L=W, origin (H-1)*W,   step -W, lane +1
//     d=2 left-right  S=W, L=H, origin 0,         step +1, lane +W
//     d=3 right-left  S=W, L=H, origin W-1,       step -1, lane +W
// The lane axis is the gates' neighbour axis: wl is 0 on lane 0 and wr is 0 on lane L-1.
#pragma once

#include <math.h>
#include <cstdint>

#if defined(__CUDACC__)
#define GSPN_HD __host__ __device__ __forceinline__
#else
#define GSPN_HD inline
#endif

namespace gspn {

constexpr int kDirections = 4;

struct ScanGeometry {
  int64_t steps;
  int64_t lanes;
  int64_t origin;
  int64_t step_stride;
  int64_t lane_stride;

  GSPN_HD int64_t offset(int64_t s, int64_t l) const { return origin + s * step_stride + l * lane_stride; }
};

GSPN_HD ScanGeometry scan_geometry(int d, int64_t H, int64_t W) {
  switch (d) {
    case 0: return ScanGeometry{H, W, 0, W, 1};
    case 1: return ScanGeometry{H, W, (H - 1) * W, -W, 1};
    case 2: return ScanGeometry{W, H, 0, 1, W};
    default: return ScanGeometry{W, H, W - 1, -1, W};
  }
}

// Step s starts afresh (h = lam * x) at s = 0 and, with a chunk, every chunk steps.
GSPN_HD bool restarts_at(int64_t s, int64_t chunk) { return s == 0 || (chunk > 0 && s % chunk == 0); }

// Plane index (into a (B, 4, G, H, W) tensor) of direction d's gates for batch b, channel c.
GSPN_HD int64_t gate_plane(int64_t b, int d, int64_t c, int64_t channels, int64_t groups) {
  return (b * kDirections + d) * groups + c / (channels / groups);
}

GSPN_HD float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }
GSPN_HD double sigmoid(double v) { return 1.0 / (1.0 + ::exp(-v)); }

// normalize_gates at one position, from the three gates' sigmoids: masked, divided by their sum.
template <typename acc_t>
GSPN_HD void weights_from_sigmoids(acc_t sig_l, acc_t sig_c, acc_t sig_r, bool has_left, bool has_right,
                                   acc_t& wl, acc_t& wc, acc_t& wr) {
  const acc_t sl = has_left ? sig_l : acc_t(0);
  const acc_t sr = has_right ? sig_r : acc_t(0);
  const acc_t inv_total = acc_t(1) / (sl + sig_c + sr);
  wl = sl * inv_total;
  wc = sig_c * inv_total;
  wr = sr * inv_total;
}

// normalize_gates at one position, from the raw logits.
template <typename acc_t>
GSPN_HD void normalized_weights(acc_t gl, acc_t gc, acc_t gr, bool has_left, bool has_right,
                                acc_t& wl, acc_t& wc, acc_t& wr) {
  weights_from_sigmoids<acc_t>(sigmoid(gl), sigmoid(gc), sigmoid(gr), has_left, has_right, wl, wc, wr);
}

// Backward of the normalisation: gradients w.r.t. the weights -> gradients w.r.t. the logits.
// With s_k = mask_k sigmoid(g_k), T = sum s_k, w_k = s_k / T:
//     dL/dg_k = mask_k sigmoid'(g_k) (dL/dw_k - sum_m w_m dL/dw_m) / T.
// It is linear in the weight gradients, so a channel group's logit gradient is the sum of its
// channels' results (that is how grouped gates accumulate).
template <typename acc_t>
GSPN_HD void weights_backward_from_sigmoids(acc_t sig_l, acc_t sig_c, acc_t sig_r, bool has_left, bool has_right,
                                            acc_t d_wl, acc_t d_wc, acc_t d_wr,
                                            acc_t& d_gl, acc_t& d_gc, acc_t& d_gr) {
  const acc_t sl = has_left ? sig_l : acc_t(0);
  const acc_t sr = has_right ? sig_r : acc_t(0);
  const acc_t inv_total = acc_t(1) / (sl + sig_c + sr);
  const acc_t dot = (d_wl * sl + d_wc * sig_c + d_wr * sr) * inv_total;
  d_gl = has_left ? (d_wl - dot) * inv_total * sig_l * (acc_t(1) - sig_l) : acc_t(0);
  d_gc = (d_wc - dot) * inv_total * sig_c * (acc_t(1) - sig_c);
  d_gr = has_right ? (d_wr - dot) * inv_total * sig_r * (acc_t(1) - sig_r) : acc_t(0);
}

template <typename acc_t>
GSPN_HD void normalized_weights_backward(acc_t gl, acc_t gc, acc_t gr, bool has_left, bool has_right,
                                         acc_t d_wl, acc_t d_wc, acc_t d_wr,
                                         acc_t& d_gl, acc_t& d_gc, acc_t& d_gr) {
  weights_backward_from_sigmoids<acc_t>(sigmoid(gl), sigmoid(gc), sigmoid(gr), has_left, has_right, d_wl, d_wc,
                                        d_wr, d_gl, d_gc, d_gr);
}

}  // namespace gspn
