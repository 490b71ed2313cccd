// The line scan's backward kernel: the adjoint sweep, bottom-up (layout: line_scan_kernel.cuh).
#pragma once

#include "line_scan_kernel.cuh"

namespace gspn {
namespace line_scan_kernels {

template <typename scalar_t, typename acc_t, int kCols, int kDepth>
GSPN_GLOBAL void GSPN_LAUNCH_BOUNDS(kCols == 1 ? kMaxThreads : kWideThreads)
line_scan_bwd_kernel(const scalar_t* __restrict__ gh, const scalar_t* __restrict__ h,
                     const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                     const scalar_t* __restrict__ wl, const scalar_t* __restrict__ wc,
                     const scalar_t* __restrict__ wr, scalar_t* __restrict__ dx,
                     scalar_t* __restrict__ dlam, scalar_t* __restrict__ dwl,
                     scalar_t* __restrict__ dwc, scalar_t* __restrict__ dwr, int64_t planes,
                     int64_t H, int64_t W, int64_t chunk) {
  GSPN_DYNAMIC_SMEM(acc_t, smem);

  const int tw = blockDim.x, tx = threadIdx.x;
  const int64_t padded = W + 2;
  const int64_t plane = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = plane < planes;
  const int64_t base = live ? plane * H * W : 0;
  // Per buffer set s (double-buffered): the left and right carries of the row below
  // (carry_left of column j at cl[j + 2], carry_right at cr[j]) and h of the row above (hp).
  auto row = [&](int set, int array) { return smem + ((set * 3 + array) * int64_t(blockDim.y) + threadIdx.y) * padded; };
  for (int s = 0; s < 2; ++s)
    for (int a = 0; a < 3; ++a)
      for (int64_t k = tx; k < padded; k += tw) row(s, a)[k] = acc_t(0);
  __syncthreads();
  if (H >= 2) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t j = tx + int64_t(c) * tw;
      if (live && j < W) row(H & 1, 2)[j + 1] = acc_t(h[base + (H - 2) * W + j]);
    }
  }
  __syncthreads();

  // Inputs of rows i, i - 1, ..., slot 0 being row i (kDepth = 0: row i alone); rhm2 is h[i - 2].
  constexpr int kSlots = kDepth > 0 ? kDepth : 1;
  scalar_t rgh[kSlots][kCols], rx[kSlots][kCols], rlam[kSlots][kCols], rwl[kSlots][kCols],
      rwc[kSlots][kCols], rwr[kSlots][kCols], rhm2[kSlots][kCols];
  auto load = [&](int slot, int64_t i) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t j = tx + int64_t(c) * tw;
      if (live && i >= 0 && j < W) {
        const int64_t o = base + i * W + j;
        rgh[slot][c] = gh[o];
        rx[slot][c] = x[o];
        rlam[slot][c] = lam[o];
        rwl[slot][c] = wl[o];
        rwc[slot][c] = wc[o];
        rwr[slot][c] = wr[o];
        if (i >= 2) rhm2[slot][c] = h[o - 2 * W];
      }
    }
  };
#pragma unroll
  for (int d = 0; d < kDepth; ++d) load(d, H - 1 - d);

  acc_t carry_centre[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) carry_centre[c] = acc_t(0);

  RestartClock clock(H - 1, chunk);
  for (int64_t i = H - 1; i >= 0; --i, clock.backward()) {
    if constexpr (kDepth == 0) load(0, i);
    scalar_t cgh[kCols], cx[kCols], clam[kCols], cwl[kCols], cwc[kCols], cwr[kCols], chm2[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      cgh[c] = rgh[0][c]; cx[c] = rx[0][c]; clam[c] = rlam[0][c]; cwl[c] = rwl[0][c];
      cwc[c] = rwc[0][c]; cwr[c] = rwr[0][c]; chm2[c] = rhm2[0][c];
    }
#pragma unroll
    for (int d = 0; d + 1 < kDepth; ++d) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        rgh[d][c] = rgh[d + 1][c]; rx[d][c] = rx[d + 1][c]; rlam[d][c] = rlam[d + 1][c];
        rwl[d][c] = rwl[d + 1][c]; rwc[d][c] = rwc[d + 1][c]; rwr[d][c] = rwr[d + 1][c];
        rhm2[d][c] = rhm2[d + 1][c];
      }
    }
    if constexpr (kDepth > 0) load(kDepth - 1, i - kDepth);

    const int rs = (i + 1) & 1, ws = i & 1;
    const acc_t* cl_in = row(rs, 0);
    const acc_t* cr_in = row(rs, 1);
    const acc_t* hp = row(rs, 2);
    acc_t* cl_out = row(ws, 0);
    acc_t* cr_out = row(ws, 1);
    acc_t* hp_out = row(ws, 2);
    const bool start = clock.restarts();
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t j = tx + int64_t(c) * tw;
      if (live && j < W) {
        const int64_t o = base + i * W + j;
        const acc_t g = adjoint<acc_t>(acc_t(cgh[c]), cl_in[j + 2], carry_centre[c], cr_in[j]);
        dx[o] = scalar_t(g * acc_t(clam[c]));
        dlam[o] = scalar_t(g * acc_t(cx[c]));
        if (start) {
          // A start row's weights multiply nothing: their gradients and carries are zero.
          dwl[o] = dwc[o] = dwr[o] = scalar_t(0);
          cl_out[j + 1] = cr_out[j + 1] = carry_centre[c] = acc_t(0);
        } else {
          dwl[o] = scalar_t(g * hp[j]);
          dwc[o] = scalar_t(g * hp[j + 1]);
          dwr[o] = scalar_t(g * hp[j + 2]);
          cl_out[j + 1] = acc_t(cwl[c]) * g;
          cr_out[j + 1] = acc_t(cwr[c]) * g;
          carry_centre[c] = acc_t(cwc[c]) * g;
        }
        if (i >= 2) hp_out[j + 1] = acc_t(chm2[c]);
      }
    }
    __syncthreads();
  }
}

// Calls fn(kernel) with the backward variant that launch `l` runs.
template <typename scalar_t, typename acc_t, typename Fn>
void with_bwd_kernel(const LaunchShape& l, Fn&& fn) {
  if (l.cols == 1) {
    fn(line_scan_bwd_kernel<scalar_t, acc_t, 1, 2>);
  } else {
    fn(line_scan_bwd_kernel<scalar_t, acc_t, kWideCols, kWideDepth>);
  }
}

}  // namespace line_scan_kernels
}  // namespace gspn
