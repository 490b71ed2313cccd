// Frames: one direction's per-pixel operands of one plane in scan order (row s is step s, its lanes
// contiguous), in the compute type, and the gate normalisation run on them, for the CPU scan kernels
// (gspn_scan_cpu.cpp, gspn_scan_channels_last.cpp). The loops over a row's lanes are branch-free and
// contiguous, so the compiler vectorises them.
#pragma once

#include <cstdint>

#include "../gspn_scan_common.h"
#include "../scan_math.h"
#include "lane_math.h"

namespace gspn {

// The gate normalisation's compares and clamps become selects only where no code depends on the
// floating-point exception flags (GCC keeps branches otherwise, and the lane loop does not vectorise).
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

// The normalised weights of one position from its logits (see the top of the file); with kGrad
// also wq_k = w_k (1 - sigmoid(g_k)) = w_k / (1 + exp(g_k)), the factor of the logit gradients.
template <typename acc_t, bool kLeft, bool kRight, bool kGrad>
__attribute__((always_inline)) inline void normalize_position(acc_t g_l, acc_t g_c, acc_t g_r, acc_t& w_l, acc_t& w_c, acc_t& w_r, acc_t& q_l,
                               acc_t& q_c, acc_t& q_r) {
  normalized_weights<acc_t>(g_l, g_c, g_r, kLeft, kRight, w_l, w_c, w_r, LaneExp());
  if (kGrad) {
    q_l = kLeft ? w_l / (acc_t(1) + exp_lanes(g_l)) : acc_t(0);
    q_c = w_c / (acc_t(1) + exp_lanes(g_c));
    q_r = kRight ? w_r / (acc_t(1) + exp_lanes(g_r)) : acc_t(0);
  }
}

// Lane l of logit rows -> weight rows (in place) and, with kGrad, wq rows.
template <typename acc_t, bool kLeft, bool kRight, bool kGrad>
__attribute__((always_inline)) inline void normalize_lane(int64_t l, acc_t* __restrict__ gl, acc_t* __restrict__ gc, acc_t* __restrict__ gr,
                           acc_t* __restrict__ ql, acc_t* __restrict__ qc, acc_t* __restrict__ qr) {
  acc_t a, b, c;
  normalize_position<acc_t, kLeft, kRight, kGrad>(gl[l], gc[l], gr[l], gl[l], gc[l], gr[l], a, b, c);
  if constexpr (kGrad) {
    ql[l] = a;
    qc[l] = b;
    qr[l] = c;
  }
}

// Logit frames of S rows x L lanes -> weight frames, in place (lane 0 has no left neighbour, lane
// L-1 no right one); with kGrad also the wq frames (ql, qc, qr; unused otherwise).
template <typename acc_t, bool kGrad>
void normalize_frames(int64_t S, int64_t L, acc_t* gl, acc_t* gc, acc_t* gr, acc_t* ql, acc_t* qc, acc_t* qr) {
  for (int64_t s = 0; s < S; ++s) {
    const int64_t r = kGrad ? s * L : 0;
    acc_t *l_ = gl + s * L, *c_ = gc + s * L, *r_ = gr + s * L;
    acc_t *ql_ = kGrad ? ql + r : nullptr, *qc_ = kGrad ? qc + r : nullptr, *qr_ = kGrad ? qr + r : nullptr;
    if (L == 1) {
      normalize_lane<acc_t, false, false, kGrad>(0, l_, c_, r_, ql_, qc_, qr_);
      continue;
    }
    normalize_lane<acc_t, false, true, kGrad>(0, l_, c_, r_, ql_, qc_, qr_);
    for (int64_t l = 1; l < L - 1; ++l) normalize_lane<acc_t, true, true, kGrad>(l, l_, c_, r_, ql_, qc_, qr_);
    normalize_lane<acc_t, true, false, kGrad>(L - 1, l_, c_, r_, ql_, qc_, qr_);
  }
}

#pragma GCC pop_options

// frame[s * L + l] = plane[geo.offset(s, l)].
template <typename src_t, typename acc_t>
void gather_frame(const src_t* plane, const ScanGeometry& geo, acc_t* frame) {
  for (int64_t s = 0; s < geo.steps; ++s) {
    acc_t* out = frame + s * geo.lanes;
    if (geo.lane_stride == 1) {
      const src_t* row = plane + geo.origin + s * geo.step_stride;
      for (int64_t l = 0; l < geo.lanes; ++l) out[l] = acc_t(row[l]);
    } else {
      for (int64_t l = 0; l < geo.lanes; ++l) out[l] = acc_t(plane[geo.offset(s, l)]);
    }
  }
}

// plane[geo.offset(s, l)] (+)= frame[s * L + l], converted to the plane's type.
template <bool kAdd, typename acc_t, typename dst_t>
void scatter_frame(const acc_t* frame, const ScanGeometry& geo, dst_t* plane) {
  for (int64_t s = 0; s < geo.steps; ++s) {
    const acc_t* in = frame + s * geo.lanes;
    if (geo.lane_stride == 1) {
      dst_t* row = plane + geo.origin + s * geo.step_stride;
      for (int64_t l = 0; l < geo.lanes; ++l)
        row[l] = kAdd ? static_cast<dst_t>(acc_t(row[l]) + in[l]) : static_cast<dst_t>(in[l]);
    } else {
      for (int64_t l = 0; l < geo.lanes; ++l) {
        dst_t& out = plane[geo.offset(s, l)];
        out = kAdd ? static_cast<dst_t>(acc_t(out) + in[l]) : static_cast<dst_t>(in[l]);
      }
    }
  }
}

}  // namespace gspn
