// The line scan's forward kernel: one launch for the whole scan (layout: line_scan_kernel.cuh).
#pragma once

#include "line_scan_kernel.cuh"

namespace gspn {
namespace line_scan_kernels {

template <typename scalar_t, typename acc_t, int kCols, int kDepth>
GSPN_GLOBAL void GSPN_LAUNCH_BOUNDS(kCols == 1 ? kMaxThreads : kWideThreads)
line_scan_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                     const scalar_t* __restrict__ wl, const scalar_t* __restrict__ wc,
                     const scalar_t* __restrict__ wr, scalar_t* __restrict__ h, int64_t planes,
                     int64_t H, int64_t W, int64_t chunk) {
  GSPN_DYNAMIC_SMEM(acc_t, smem);

  const int tw = blockDim.x, tx = threadIdx.x;
  const int64_t padded = W + 2;  // a row with a zero on either side: index j + 1 holds column j
  const int64_t plane = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = plane < planes;
  const int64_t base = live ? plane * H * W : 0;
  acc_t* const even = smem + threadIdx.y * padded;  // rows 0, 2, 4, ...
  acc_t* const odd = smem + (blockDim.y + threadIdx.y) * padded;  // rows 1, 3, 5, ...
  for (int64_t k = tx; k < padded; k += tw) even[k] = odd[k] = acc_t(0);
  __syncthreads();

  // Inputs of rows i .. i + kDepth - 1, slot 0 being row i (kDepth = 0: row i alone, loaded in its turn).
  constexpr int kSlots = kDepth > 0 ? kDepth : 1;
  scalar_t rx[kSlots][kCols], rlam[kSlots][kCols], rwl[kSlots][kCols], rwc[kSlots][kCols], rwr[kSlots][kCols];
  auto load = [&](int slot, int64_t i) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t j = tx + int64_t(c) * tw;
      if (live && i < H && j < W) {
        const int64_t o = base + i * W + j;
        rx[slot][c] = x[o];
        rlam[slot][c] = lam[o];
        rwl[slot][c] = wl[o];
        rwc[slot][c] = wc[o];
        rwr[slot][c] = wr[o];
      }
    }
  };
#pragma unroll
  for (int d = 0; d < kDepth; ++d) load(d, d);

  RestartClock clock(0, chunk);
  for (int64_t i = 0; i < H; ++i, clock.forward()) {
    if constexpr (kDepth == 0) load(0, i);
    scalar_t cx[kCols], clam[kCols], cwl[kCols], cwc[kCols], cwr[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      cx[c] = rx[0][c]; clam[c] = rlam[0][c]; cwl[c] = rwl[0][c]; cwc[c] = rwc[0][c]; cwr[c] = rwr[0][c];
    }
#pragma unroll
    for (int d = 0; d + 1 < kDepth; ++d) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        rx[d][c] = rx[d + 1][c]; rlam[d][c] = rlam[d + 1][c]; rwl[d][c] = rwl[d + 1][c];
        rwc[d][c] = rwc[d + 1][c]; rwr[d][c] = rwr[d + 1][c];
      }
    }
    if constexpr (kDepth > 0) load(kDepth - 1, i + kDepth);

    const acc_t* prev = (i & 1) ? even : odd;  // row i - 1
    acc_t* cur = (i & 1) ? odd : even;
    const bool start = clock.restarts();
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t j = tx + int64_t(c) * tw;
      if (live && j < W) {
        const acc_t v = start ? acc_t(clam[c]) * acc_t(cx[c])
                              : scan_step<acc_t>(acc_t(cwl[c]), acc_t(cwc[c]), acc_t(cwr[c]), prev[j],
                                                 prev[j + 1], prev[j + 2], acc_t(clam[c]), acc_t(cx[c]));
        cur[j + 1] = v;
        h[base + i * W + j] = scalar_t(v);
      }
    }
    __syncthreads();
  }
}

// Calls fn(kernel) with the forward variant that launch `l` runs.
template <typename scalar_t, typename acc_t, typename Fn>
void with_fwd_kernel(const LaunchShape& l, Fn&& fn) {
  if (l.cols == 1) {
    fn(line_scan_fwd_kernel<scalar_t, acc_t, 1, 2>);
  } else {
    fn(line_scan_fwd_kernel<scalar_t, acc_t, kWideCols, kWideDepth>);
  }
}

}  // namespace line_scan_kernels
}  // namespace gspn
