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
#define GSPN_HD inline __attribute__((always_inline))
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
// The sizes every kernel needs; channel groups are per tensor (gate tensors are (B, 4, G, H, W)).
struct ScanShape {
  int64_t B, C, H, W;
  int64_t g_lam, g_gl, g_gc, g_gr, g_u;
};

GSPN_HD int64_t gate_plane(int64_t b, int d, int64_t c, int64_t channels, int64_t groups) {
  return (b * kDirections + d) * groups + c / (channels / groups);
}

GSPN_HD float exp_of(float v) { return expf(v); }
GSPN_HD double exp_of(double v) { return ::exp(v); }

// normalize_gates at one position, from the raw logits, stably for any finite logits
// (dit_gspn/ops/reference.py::normalize_gates is the contract). With m the largest logit of the
// neighbours that exist and c = min(m, 0):
//     s_k = mask_k / (exp(c) + exp(c - g_k)) = mask_k exp(-c) sigmoid(g_k),   w_k = s_k / sum_m s_m
// exp(-c) cancels in w, so this is sigmoid / sum for ordinary logits; the largest valid s_k is at
// least 1/2, so the sum never underflows to 0/0 when every sigmoid does (logits below about -88
// in float32), and an overflowing exp(c - g_k) just makes s_k = 0.
// ``exp_fn`` is the exponential to use (the CPU kernel passes its vectorisable one); masks that are
// compile-time constants at the call site fold away once this is inlined.
struct StdExp {
  template <typename T>
  GSPN_HD T operator()(T v) const { return exp_of(v); }
};

template <typename acc_t, typename Exp = StdExp>
GSPN_HD void normalized_weights(acc_t gl, acc_t gc, acc_t gr, bool has_left, bool has_right,
                                acc_t& wl, acc_t& wc, acc_t& wr, Exp exp_fn = Exp()) {
  acc_t m = gc;
  if (has_left && gl > m) m = gl;
  if (has_right && gr > m) m = gr;
  const acc_t c = m < acc_t(0) ? m : acc_t(0);
  const acc_t ec = exp_fn(c);
  const acc_t sl = has_left ? acc_t(1) / (ec + exp_fn(c - gl)) : acc_t(0);
  const acc_t sc = acc_t(1) / (ec + exp_fn(c - gc));
  const acc_t sr = has_right ? acc_t(1) / (ec + exp_fn(c - gr)) : acc_t(0);
  const acc_t inv_total = acc_t(1) / (sl + sc + sr);
  wl = sl * inv_total;
  wc = sc * inv_total;
  wr = sr * inv_total;
}

// Backward of the normalisation: gradients w.r.t. the weights -> gradients w.r.t. the logits, given
// the weights normalized_weights made of the same logits:
//     dL/dg_k = mask_k w_k sigmoid(-g_k) (dL/dw_k - sum_m w_m dL/dw_m)
// (d s_k / d g_k = s_k sigmoid(-g_k); sigmoid(-g) = 1 / (1 + exp(g)) is stable both ways).
// It is linear in the weight gradients, so a channel group's logit gradient is the sum of its
// channels' results (that is how grouped gates accumulate).
template <typename acc_t>
GSPN_HD void normalized_weights_backward(acc_t gl, acc_t gc, acc_t gr, acc_t wl, acc_t wc, acc_t wr, bool has_left,
                                         bool has_right, acc_t d_wl, acc_t d_wc, acc_t d_wr, acc_t& d_gl, acc_t& d_gc,
                                         acc_t& d_gr) {
  const acc_t dot = d_wl * wl + d_wc * wc + d_wr * wr;
  d_gl = has_left ? wl * (d_wl - dot) / (acc_t(1) + exp_of(gl)) : acc_t(0);
  d_gc = wc * (d_wc - dot) / (acc_t(1) + exp_of(gc));
  d_gr = has_right ? wr * (d_wr - dot) / (acc_t(1) + exp_of(gr)) : acc_t(0);
}

}  // namespace gspn
