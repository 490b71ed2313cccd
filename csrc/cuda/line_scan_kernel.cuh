// The line scan's CUDA launch arithmetic, shared by its kernels (line_scan_fwd.cuh,
// line_scan_bwd.cuh) and their launchers (line_scan_cuda.cu). The kernels are kept apart from the
// host code so that tests/kernels/cuda_emulation/ can also compile them as plain C++ and run every thread of
// a block as a fiber (GSPN_CUDA_EMULATION), and tests/kernels/test_cuda_resources.py can read ptxas's
// register report for sm_90 without ATen.
//
// A block holds `planes_per_block` (H, W) planes side by side (threadIdx.y) with `tw` threads
// along W (threadIdx.x); thread x owns columns x, x + tw, ... (kCols of them), so a warp's
// loads and stores are consecutive along W. The block walks the rows in order (bottom-up for
// the backward), keeping the previous row's values in shared memory, double-buffered so that
// one __syncthreads per row suffices. Each input element is read from global memory once and
// each output written once; the inputs of the next kDepth rows are loaded ahead into registers
// so their latency hides behind the current row's arithmetic. Small planes (a 16x16 DiT grid)
// are packed several per block so no thread idles. Offsets are 64-bit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../scan_math.h"
#include "kernel_macros.h"

namespace gspn {
namespace line_scan_kernels {

constexpr int kMaxThreads = 1024;    // threads per block (one column each) for rows of W <= kMaxThreads
constexpr int kPackedThreads = 256;  // block size to aim for when packing small planes
// Wider rows: kWideCols columns per thread and at most kWideThreads threads, so that ptxas may give
// each thread 128 registers (65536 / 512) and nothing spills; their inputs are not loaded ahead.
constexpr int kWideThreads = 512;
constexpr int kWideCols = 4;
constexpr int kWideDepth = 0;
constexpr int64_t kMaxW = int64_t(kWideThreads) * kWideCols;  // the widest row a launch covers

// How a launch covers the planes: tw threads along W, each owning `cols` columns, and
// planes_per_block planes per block.
struct LaunchShape {
  int tw;
  int cols;
  int planes_per_block;
  int64_t blocks;
};

// The launch for `planes` planes of width 1 <= W <= kMaxW (the caller checks the limits).
inline LaunchShape launch_shape(int64_t planes, int64_t W) {
  LaunchShape l;
  l.cols = W <= kMaxThreads ? 1 : kWideCols;
  l.tw = static_cast<int>((W + l.cols - 1) / l.cols);
  l.planes_per_block = kPackedThreads / l.tw > 1 ? kPackedThreads / l.tw : 1;
  l.blocks = (planes + l.planes_per_block - 1) / l.planes_per_block;
  return l;
}

// Dynamic shared memory of one block: two zero-padded rows per plane (forward), six (backward).
template <typename acc_t>
size_t fwd_smem_bytes(const LaunchShape& l, int64_t W) { return size_t(2) * l.planes_per_block * (W + 2) * sizeof(acc_t); }
template <typename acc_t>
size_t bwd_smem_bytes(const LaunchShape& l, int64_t W) { return size_t(6) * l.planes_per_block * (W + 2) * sizeof(acc_t); }

}  // namespace line_scan_kernels
}  // namespace gspn
