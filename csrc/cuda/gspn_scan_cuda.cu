// Fused four-direction GSPN propagation on CUDA: kernels of gspn::gspn_scan_fwd / gspn_scan_bwd
// (schemas in csrc/cpu/gspn_scan_cpu.cpp). Contract: dit_gspn/ops/reference.py::gspn_scan_reference.
//
// Layout of the work. One thread block owns one (batch, channel) plane and runs its four
// directions one after the other, in ONE launch per pass, so the direction sum (and, in the
// backward, dx's sum) needs no atomics. Within a direction the block walks the S scan steps in
// tiles of T steps; a tile of all L lanes x T steps of every input is first staged in shared
// memory with COALESCED global reads, then scanned from shared memory, then its results are
// written back coalesced:
//   - vertical scans (top-down, bottom-up): lanes are columns, contiguous in memory, so
//     consecutive threads take consecutive lanes of one step;
//   - horizontal scans (left-right, right-left): lanes are rows, and it is the STEP axis that is
//     contiguous, so consecutive threads take consecutive steps of one lane (T steps = 16 bf16
//     or 16 fp32 values in a row, at least one 32-byte sector per row) and the scan then runs with
//     one thread per row from shared memory.
// The previous step's lane vector stays in shared memory (neighbours l-1, l, l+1). Gates are
// normalised while staging (raw logits in). Everything is computed in fp32; indices are 64-bit.
//
// Memory: the forward saves only its inputs. The backward recomputes each direction's hidden
// states (one forward sweep) into an fp32 scratch plane per (batch, channel), reused by the four
// directions, instead of the forward storing 4 x C hidden maps for the whole time between
// forward and backward: a transient C-sized map inside one op instead of 4 x C maps per layer
// kept alive across the network, for one extra read of the inputs.
//
// Gate gradients of grouped tensors (G < C) are sums over the group's channels: the kernel writes
// per-channel fp32 planes (a transient (B, 4, C, H, W) map per grouped tensor) and the host sums
// each group's channels with one reduction, so the result is the same on every run (float atomics
// across blocks would add in a different order each time).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../gspn_scan_checks.h"
#include "../gspn_scan_common.h"
#include "../gspn_scan_cuda_kernels.h"

namespace gspn {
namespace {

using namespace cuda_kernels;

// The tile for lines of `max_lanes` pixels on this device, or an error naming the way out.
template <typename SmemFloats>
int checked_tile(int64_t max_lanes, SmemFloats smem_floats, size_t smem_limit) {
  const int tile = pick_tile(max_lanes, smem_floats, smem_limit);
  TORCH_CHECK(tile > 0, "gspn_scan (CUDA): lines of ", max_lanes, " pixels need more than the ", smem_limit,
              " bytes of shared memory a block may use on this GPU; use impl='composed' for this map size");
  return tile;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// float32 / float16 / bfloat16 (float64 is a CPU-only, gradcheck dtype).
template <typename Fn>
void dispatch_cuda_types(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(TypeTag<float>{}); break;
    case at::kHalf: fn(TypeTag<at::Half>{}); break;
    case at::kBFloat16: fn(TypeTag<at::BFloat16>{}); break;
    default: TORCH_CHECK(false, "gspn_scan (CUDA): supports float32, float16 and bfloat16, got ", dtype);
  }
}

// Shared memory one block may opt in to on the current device (ATen/cuda/CUDAContext.h is
// avoided: it pulls in cuSPARSE headers that a minimal CUDA toolkit lacks).
size_t smem_per_block_limit() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

at::Tensor gspn_scan_fwd_cuda(const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
                              const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in,
                              int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in, chunk);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(), gc = gc_in.contiguous(),
       gr = gr_in.contiguous(), u = u_in.contiguous();
  auto y = at::empty_like(x);
  if (y.numel() == 0) return y;
  TORCH_CHECK(sh.B * sh.C <= std::numeric_limits<int32_t>::max(), "gspn_scan (CUDA): B*C must be < 2^31");
  const int64_t max_lanes = std::max(sh.H, sh.W);
  const size_t smem_limit = smem_per_block_limit();
  const int tile = checked_tile(max_lanes, fwd_smem_floats, smem_limit);
  const size_t smem = fwd_smem_floats(max_lanes, tile) * sizeof(float);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_types(x.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    // fp32 outputs accumulate the direction sum in place; half outputs through an fp32 map.
    at::Tensor y_acc = std::is_same_v<scalar_t, float> ? y : at::empty(x.sizes(), x.options().dtype(at::kFloat));
    auto kernel = gspn_scan_fwd_kernel<scalar_t>;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(sh.B * sh.C), threads_for(max_lanes), smem, stream>>>(
        x.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
        gr.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), y_acc.data_ptr<float>(), y.data_ptr<scalar_t>(), sh, chunk,
        tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gspn_scan_bwd_cuda(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
    const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in, int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in, chunk);
  check_grad_output(gy_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto gy = gy_in.contiguous(), x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(),
       gc = gc_in.contiguous(), gr = gr_in.contiguous(), u = u_in.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  // Per-channel gradient planes, fully overwritten by the kernel (see gspn_scan_bwd_kernel).
  auto grad_buffer = [&](const at::Tensor&) { return at::empty({sh.B, kDirections, sh.C, sh.H, sh.W}, f32); };
  auto d_lam = grad_buffer(lam), d_gl = grad_buffer(gl), d_gc = grad_buffer(gc), d_gr = grad_buffer(gr),
       d_u = grad_buffer(u);
  auto d_x = at::empty_like(x);
  if (x.numel() > 0) {
    TORCH_CHECK(sh.B * sh.C <= std::numeric_limits<int32_t>::max(), "gspn_scan (CUDA): B*C must be < 2^31");
    const int64_t max_lanes = std::max(sh.H, sh.W);
    const size_t smem_limit = smem_per_block_limit();
    const int tile = checked_tile(max_lanes, bwd_smem_floats, smem_limit);
    const size_t smem = bwd_smem_floats(max_lanes, tile) * sizeof(float);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    auto h_scratch = at::empty(x.sizes(), f32);
    dispatch_cuda_types(x.scalar_type(), [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      at::Tensor dx_acc = std::is_same_v<scalar_t, float> ? d_x : at::empty(x.sizes(), f32);
      auto kernel = gspn_scan_bwd_kernel<scalar_t>;
      allow_smem(kernel, smem);
      kernel<<<static_cast<unsigned>(sh.B * sh.C), threads_for(max_lanes), smem, stream>>>(
          gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(),
          gc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), h_scratch.data_ptr<float>(),
          dx_acc.data_ptr<float>(), d_x.data_ptr<scalar_t>(), d_lam.data_ptr<float>(), d_gl.data_ptr<float>(),
          d_gc.data_ptr<float>(), d_gr.data_ptr<float>(), d_u.data_ptr<float>(), sh, chunk, tile);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // A group's gradient is the sum over its channels (channel c is in group c / (C / G)).
  const auto dt = x.scalar_type();
  auto group_sum = [&](const at::Tensor& per_channel, const at::Tensor& t) {
    const int64_t G = t.size(2);
    if (G == sh.C) return per_channel.to(dt);
    return per_channel.view({sh.B, kDirections, G, sh.C / G, sh.H, sh.W}).sum(3).to(dt);
  };
  return {d_x, group_sum(d_lam, lam), group_sum(d_gl, gl), group_sum(d_gc, gc), group_sum(d_gr, gr), group_sum(d_u, u)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gspn, CUDA, m) {
  m.impl("gspn_scan_fwd", &gspn_scan_fwd_cuda);
  m.impl("gspn_scan_bwd", &gspn_scan_bwd_cuda);
}

}  // namespace gspn
