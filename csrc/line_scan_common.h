// Per-element math of the GSPN line scan, shared by the CPU and CUDA kernels, forward and backward.
//
// The recurrence (DESIGN.md, "The scan contract"), scanning rows i = 0..H-1 of one (H, W) plane:
//     h[i, j] = wl[i, j] h[i-1, j-1] + wc[i, j] h[i-1, j] + wr[i, j] h[i-1, j+1] + lam[i, j] x[i, j]
// with out-of-range neighbours zero, and h[i] = lam[i] x[i] on a row that starts the recurrence
// (row 0, and every chunk-th row when chunk > 0).
//
// The adjoint, with g[i] = dL/dh[i] accumulated bottom-up:
//     g[i, j]  = dh[i, j] + wl[i+1, j+1] g[i+1, j+1] + wc[i+1, j] g[i+1, j] + wr[i+1, j-1] g[i+1, j-1]
//     dx = g lam, dlam = g x, dwl = g h[i-1, j-1], dwc = g h[i-1, j], dwr = g h[i-1, j+1]
// where the row-(i+1) terms vanish when row i+1 starts the recurrence, and dw* vanish on a start row.
// Both kernels keep the row-(i+1) terms as the "carries" wl g, wc g, wr g of the row below.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GSPN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GSPN_HOST_DEVICE inline
#endif

namespace gspn {

/// Whether row i restarts the recurrence: row 0, and every chunk-th row when chunk > 0.
GSPN_HOST_DEVICE bool is_row_start(int64_t i, int64_t chunk) {
  return i == 0 || (chunk > 0 && i % chunk == 0);
}

/// One forward step: h[i, j] from the previous row's three neighbours and the drive lam * x.
template <typename acc_t>
GSPN_HOST_DEVICE acc_t scan_step(acc_t wl, acc_t wc, acc_t wr, acc_t h_left, acc_t h_centre,
                                 acc_t h_right, acc_t lam, acc_t x) {
  return wl * h_left + wc * h_centre + wr * h_right + lam * x;
}

/// The adjoint of h[i, j]: its own output gradient plus the carries of the row below.
/// carry_left is wl[i+1, j+1] g[i+1, j+1], carry_centre wc[i+1, j] g[i+1, j], carry_right
/// wr[i+1, j-1] g[i+1, j-1] (zero outside the row or when row i+1 restarts the recurrence).
template <typename acc_t>
GSPN_HOST_DEVICE acc_t adjoint(acc_t grad_h, acc_t carry_left, acc_t carry_centre, acc_t carry_right) {
  return grad_h + carry_left + carry_centre + carry_right;
}

}  // namespace gspn
