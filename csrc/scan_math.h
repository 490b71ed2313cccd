// The per-element math of the GSPN scans, shared by the CPU kernels (csrc/cpu/*.cpp) and the CUDA
// kernels (csrc/cuda/*.cuh), forward and backward. Contract: dit_gspn/ops/reference.py.
//
// The recurrence (DESIGN.md, "The scan contract"), over steps s of one line of lanes l:
//     h[s, l] = wl[s, l] h[s-1, l-1] + wc[s, l] h[s-1, l] + wr[s, l] h[s-1, l+1] + lam[s, l] x[s, l]
// with out-of-range neighbours zero, and h[s] = lam[s] x[s] on a step that restarts the recurrence
// (restarts_at: step 0, and every chunk-th step when chunk > 0).
//
// The adjoint, with g[s] = dL/dh[s] accumulated from the last step back:
//     g[s, l]  = dh[s, l] + wl[s+1, l+1] g[s+1, l+1] + wc[s+1, l] g[s+1, l] + wr[s+1, l-1] g[s+1, l-1]
//     dx = g lam, dlam = g x, dwl = g h[s-1, l-1], dwc = g h[s-1, l], dwr = g h[s-1, l+1]
// where the step-(s+1) terms (the "carries" wl g, wc g, wr g of the next step) vanish when step s+1
// restarts the recurrence, and dw* vanish on a restart step.
#pragma once

#include <math.h>
#include <cstdint>

#if defined(__CUDACC__)
#define GSPN_HD __host__ __device__ __forceinline__
#else
#define GSPN_HD inline __attribute__((always_inline))
#endif

namespace gspn {

/// Whether step s starts the recurrence afresh (h = lam * x): step 0 and, with a chunk, every chunk-th step.
GSPN_HD bool restarts_at(int64_t s, int64_t chunk) { return s == 0 || (chunk > 0 && s % chunk == 0); }

/// restarts_at(s, chunk) for the steps s, s + 1, ... (forward()) or s, s - 1, ... (backward()) of one sweep,
/// with one division when it is made and none per step (the kernels' hot loops divide nothing).
struct RestartClock {
  int64_t period;  // chunk, or a period no sweep reaches (chunk = 0: only step 0 restarts)
  int64_t phase;   // s mod period

  GSPN_HD RestartClock(int64_t s, int64_t chunk)
      : period(chunk > 0 ? chunk : INT64_MAX), phase(chunk > 0 ? s % chunk : s) {}
  GSPN_HD bool restarts() const { return phase == 0; }
  GSPN_HD void forward() { phase = phase + 1 == period ? 0 : phase + 1; }
  GSPN_HD void backward() { phase = (phase == 0 ? period : phase) - 1; }
};

/// One forward step: h[s, l] from the previous step's three neighbours and the drive lam * x.
template <typename acc_t>
GSPN_HD acc_t scan_step(acc_t wl, acc_t wc, acc_t wr, acc_t h_left, acc_t h_centre, acc_t h_right, acc_t lam,
                        acc_t x) {
  return wl * h_left + wc * h_centre + wr * h_right + lam * x;
}

/// The adjoint of h[s, l]: its own output gradient plus the carries of the next step.
/// carry_left is wl[s+1, l+1] g[s+1, l+1], carry_centre wc[s+1, l] g[s+1, l], carry_right
/// wr[s+1, l-1] g[s+1, l-1] (zero outside the line or when step s+1 restarts the recurrence).
template <typename acc_t>
GSPN_HD acc_t adjoint(acc_t grad_h, acc_t carry_left, acc_t carry_centre, acc_t carry_right) {
  return grad_h + carry_left + carry_centre + carry_right;
}

GSPN_HD float exp_of(float v) { return expf(v); }
GSPN_HD double exp_of(double v) { return ::exp(v); }

/// The precise exponential and reciprocal (the CUDA kernels pass their fast ones, the CPU kernel its
/// vectorisable exponential: a functor with operator() for exp; reciprocal_with picks its reciprocal).
struct StdExp {
  template <typename T>
  GSPN_HD T operator()(T v) const { return exp_of(v); }
};

/// 1 / v with the math of `exp_fn`'s family: exact division unless an overload for that functor says otherwise.
template <typename Exp, typename T>
GSPN_HD T reciprocal_with(const Exp&, T v) { return T(1) / v; }

// normalize_gates at one position, from the raw logits, stably for any finite logits
// (dit_gspn/ops/reference.py::normalize_gates is the contract). With m the largest logit of the
// neighbours that exist and c = min(m, 0):
//     s_k = mask_k / (exp(c) + exp(c - g_k)) = mask_k exp(-c) sigmoid(g_k),   w_k = s_k / sum_m s_m
// exp(-c) cancels in w, so this is sigmoid / sum for ordinary logits; the largest valid s_k is at
// least 1/2, so the sum never underflows to 0/0 when every sigmoid does (logits below about -88
// in float32), and an overflowing exp(c - g_k) just makes s_k = 0.
// Masks that are compile-time constants at the call site fold away once this is inlined.
// With `slopes`, also q_k = w_k sigmoid(-g_k), the factor of the logit gradients
// (normalized_weights_backward_from_slopes), from sigmoid(g_k) = exp(c) s_k: no further exponential.
template <typename acc_t, typename Exp = StdExp>
GSPN_HD void normalized_weights(acc_t gl, acc_t gc, acc_t gr, bool has_left, bool has_right, acc_t& wl, acc_t& wc,
                                acc_t& wr, Exp exp_fn = Exp(), acc_t* slopes = nullptr) {
  acc_t m = gc;
  if (has_left && gl > m) m = gl;
  if (has_right && gr > m) m = gr;
  const acc_t c = m < acc_t(0) ? m : acc_t(0);
  const acc_t ec = exp_fn(c);
  const acc_t sl = has_left ? reciprocal_with(exp_fn, ec + exp_fn(c - gl)) : acc_t(0);
  const acc_t sc = reciprocal_with(exp_fn, ec + exp_fn(c - gc));
  const acc_t sr = has_right ? reciprocal_with(exp_fn, ec + exp_fn(c - gr)) : acc_t(0);
  const acc_t inv_total = reciprocal_with(exp_fn, sl + sc + sr);
  wl = sl * inv_total;
  wc = sc * inv_total;
  wr = sr * inv_total;
  if (slopes != nullptr) {
    slopes[0] = wl * (acc_t(1) - ec * sl);
    slopes[1] = wc * (acc_t(1) - ec * sc);
    slopes[2] = wr * (acc_t(1) - ec * sr);
  }
}

// Backward of the normalisation: gradients w.r.t. the weights -> gradients w.r.t. the logits, from
// the weights and slopes q_k = w_k sigmoid(-g_k) that normalized_weights made of the same logits:
//     dL/dg_k = mask_k w_k sigmoid(-g_k) (dL/dw_k - sum_m w_m dL/dw_m) = q_k (dL/dw_k - dot)
// (d s_k / d g_k = s_k sigmoid(-g_k); a missing neighbour has q_k = 0). It is linear in the weight
// gradients, so a channel group's logit gradient is the sum of its channels' results (that is how
// grouped gates accumulate).
template <typename acc_t>
GSPN_HD void normalized_weights_backward(const acc_t* q, acc_t wl, acc_t wc, acc_t wr, acc_t d_wl, acc_t d_wc,
                                         acc_t d_wr, acc_t& d_gl, acc_t& d_gc, acc_t& d_gr) {
  const acc_t dot = d_wl * wl + d_wc * wc + d_wr * wr;
  d_gl = q[0] * (d_wl - dot);
  d_gc = q[1] * (d_wc - dot);
  d_gr = q[2] * (d_wr - dot);
}

}  // namespace gspn
