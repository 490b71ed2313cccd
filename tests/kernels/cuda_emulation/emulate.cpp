// A C interface (for ctypes) that runs the CUDA kernels of csrc/cuda/ (line_scan_*.cuh,
// gspn_scan_*.cuh) on the CPU, one fiber per CUDA thread (fibers.h), with the launch
// shapes the CUDA host code computes. Built by tests/kernels/cuda_emulation/driver.py with plain g++ (no
// torch headers: seconds to build), optionally with AddressSanitizer. Every buffer is float32 and
// contiguous; the caller allocates (and poisons) them. Each function returns 0, or 1 with the
// error (barrier divergence) in last_error(); it writes the barrier line counts of its forward and
// backward launch to sites[0], sites[1].
#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "fibers.h"

#define GSPN_CUDA_EMULATION
#include "cuda/gspn_scan_bwd.cuh"
#include "cuda/gspn_scan_fwd.cuh"
#include "cuda/line_scan_bwd.cuh"
#include "cuda/line_scan_fwd.cuh"

namespace {

using fibers::Order;
using fibers::Scheduler;

// Shared memory a block may opt in to on an H100 / H200 (cudaDevAttrMaxSharedMemoryPerBlockOptin), and
// an SM's (cudaDevAttrMaxSharedMemoryPerMultiprocessor), and its SMs.
constexpr size_t kSmemOptinBytes = 232448;
constexpr size_t kSmemPerSmBytes = 233472;
constexpr int kSms = 132;

std::string error_text;

// drop_kernel: 0 none, 1 forward, 2 backward; drop_site: the barrier line to delete there.
void plant(int which, int drop_kernel, int drop_site) {
  Scheduler::get().drop_barrier(which == drop_kernel ? drop_site : -1);
}

template <typename Fn>
int guarded(Fn&& fn) {
  try {
    fn();
    Scheduler::get().drop_barrier(-1);
    return 0;
  } catch (const std::exception& exc) {
    Scheduler::get().drop_barrier(-1);
    error_text = exc.what();
    return 1;
  }
}

}  // namespace

extern "C" {

const char* last_error() { return error_text.c_str(); }

// The tile the CUDA host code launches the fused scan's forward (backward 0) or backward (1) with on an
// H100 / H200, for lines of max_lanes pixels in a launch of `blocks` blocks.
int gspn_scan_launch_tile(int backward, int64_t max_lanes, int64_t blocks) {
  using namespace gspn::cuda_kernels;
  return backward ? launch_tile(max_lanes, bwd_smem_floats, blocks, kSms, kSmemPerSmBytes, kSmemOptinBytes)
                  : launch_tile(max_lanes, fwd_smem_floats, blocks, kSms, kSmemPerSmBytes, kSmemOptinBytes);
}

// Forward then backward of the line scan over `planes` (H, W) planes; chunk 0 scans the whole height.
int line_scan(const float* x, const float* lam, const float* wl, const float* wc, const float* wr, const float* gh,
              float* h, float* dx, float* dlam, float* dwl, float* dwc, float* dwr, int64_t planes, int64_t H,
              int64_t W, int64_t chunk, int order, uint64_t seed, int drop_kernel, int drop_site, int64_t* sites) {
  using namespace gspn::line_scan_kernels;
  return guarded([&] {
    if (W > kMaxW) throw std::runtime_error("W exceeds the kernel's limit");
    const LaunchShape l = launch_shape(planes, W);
    const GspnDim3 grid{static_cast<unsigned>(l.blocks), 1, 1};
    const GspnDim3 block{static_cast<unsigned>(l.tw), static_cast<unsigned>(l.planes_per_block), 1};
    const Order ord = static_cast<Order>(order);
    plant(1, drop_kernel, drop_site);
    with_fwd_kernel<float, float>(l, [&](auto kernel) {
      Scheduler::get().launch(grid, block, fwd_smem_bytes<float>(l, W), ord, seed, kernel, x, lam, wl, wc, wr, h,
                              planes, H, W, chunk);
    });
    sites[0] = Scheduler::get().barrier_sites();
    plant(2, drop_kernel, drop_site);
    with_bwd_kernel<float, float>(l, [&](auto kernel) {
      Scheduler::get().launch(grid, block, bwd_smem_bytes<float>(l, W), ord, seed + 1, kernel, gh, h, x, lam, wl, wc,
                              wr, dx, dlam, dwl, dwc, dwr, planes, H, W, chunk);
    });
    sites[1] = Scheduler::get().barrier_sites();
  });
}

// Forward then backward of the fused scan. shape: B, C, H, W, then the group counts of lam, gl,
// gc, gr, u. The gate gradients are per-channel (B, 4, C, H, W) fp32 planes (as the CUDA kernel writes
// them for fp32 inputs), whose groups the caller sums as the host code does. tile 0 picks the tile the CUDA host code would on an H100 / H200.
int gspn_scan(const float* x, const float* lam, const float* gl, const float* gc, const float* gr, const float* u,
              const float* gy, float* y, float* dx, float* dlam, float* dgl, float* dgc, float* dgr, float* du,
              const int64_t* shape, int64_t chunk, int tile, int per_block, int order, uint64_t seed,
              int drop_kernel, int drop_site, int64_t* sites) {
  using namespace gspn;
  using namespace gspn::cuda_kernels;
  return guarded([&] {
    const ScanShape sh{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6], shape[7], shape[8]};
    const int64_t lanes = std::max(sh.H, sh.W);
    const int fwd_tile = tile > 0 ? tile : pick_tile(lanes, fwd_smem_floats, kSmemOptinBytes);
    const int bwd_tile = tile > 0 ? tile : pick_tile(lanes, bwd_smem_floats, kSmemOptinBytes);
    if (fwd_tile == 0 || bwd_tile == 0) throw std::runtime_error("lines too long for the shared memory");
    const int groups = kDirections / per_block;
    const int64_t planes = sh.B * sh.C, n = planes * sh.H * sh.W;
    const GspnDim3 grid{static_cast<unsigned>(planes), static_cast<unsigned>(groups), 1};
    const GspnDim3 block{static_cast<unsigned>(threads_for(lanes)), 1, 1};
    const Order ord = static_cast<Order>(order);
    // The partial maps of split planes (their own heap block, as on the GPU), summed as the host code does.
    std::vector<float> partial(groups > 1 ? static_cast<size_t>(groups * n) : 0);
    auto sum_groups = [&](float* out) {
      if (groups == 1) return;
      const GspnDim3 sum_grid{static_cast<unsigned>((n + 63) / 64), 1, 1}, sum_block{64, 1, 1};
      Scheduler::get().launch(sum_grid, sum_block, 0, ord, seed, sum_direction_groups_kernel<float>,
                              static_cast<const float*>(partial.data()), groups, n, out);
    };
    plant(1, drop_kernel, drop_site);
    const FwdParams<float> fwd{ScanArgs<float>{x, lam, gl, gc, gr, u, sh, chunk, fwd_tile, per_block},
                               groups > 1 ? partial.data() : y, y};
    Scheduler::get().launch(grid, block, fwd_smem_floats(lanes, fwd_tile) * sizeof(float), ord, seed,
                            gspn_scan_fwd_kernel<float>, fwd);
    sites[0] = Scheduler::get().barrier_sites();
    sum_groups(y);
    plant(2, drop_kernel, drop_site);
    std::vector<float> checkpoints(static_cast<size_t>(groups * planes * checkpoint_floats(lanes, bwd_tile)));
    const BwdParams<float> bwd{ScanArgs<float>{x, lam, gl, gc, gr, u, sh, chunk, bwd_tile, per_block},
                               gy,
                               checkpoints.data(),
                               groups > 1 ? partial.data() : dx,
                               dx,
                               {dlam, dgl, dgc, dgr, du}};
    Scheduler::get().launch(grid, block, bwd_smem_floats(lanes, bwd_tile) * sizeof(float), ord, seed + 1,
                            gspn_scan_bwd_kernel<float, true>, bwd);
    sites[1] = Scheduler::get().barrier_sites();
    sum_groups(dx);
  });
}

}  // extern "C"
