// Host side of gspn::gspn_scan_fwd / gspn_scan_bwd on CUDA (schemas in dit_gspn/ops/gspn_scan.py):
// checks, buffers and the launch of the kernels in gspn_scan_fwd.cuh / gspn_scan_bwd.cuh, whose layout
// of the work and memory choices gspn_scan_kernel.cuh explains. Contract:
// dit_gspn/ops/reference.py::gspn_scan_reference.
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
#include "gspn_scan_bwd.cuh"
#include "gspn_scan_fwd.cuh"

namespace gspn {
namespace {

using namespace cuda_kernels;

// Shared memory one block may opt in to on the current device (ATen/cuda/CUDAContext.h is
// avoided: it pulls in cuSPARSE headers that a minimal CUDA toolkit lacks).
size_t smem_per_block_limit() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

int multiprocessors() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// The tile for lines of `max_lanes` pixels in a launch of `blocks` blocks on this device (launch_tile),
// or an error naming the way out.
template <typename SmemFloats>
int checked_tile(int64_t max_lanes, SmemFloats smem_floats, int64_t blocks) {
  int device = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  const size_t smem_limit = smem_per_block_limit();
  const int tile = launch_tile(max_lanes, smem_floats, blocks, multiprocessors(), static_cast<size_t>(per_sm),
                               smem_limit);
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

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename scalar_t>
ScanArgs<scalar_t> scan_args(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& gl, const at::Tensor& gc,
                             const at::Tensor& gr, const at::Tensor& u, const ScanShape& sh, int64_t chunk, int tile,
                             int per_block) {
  return ScanArgs<scalar_t>{x.const_data_ptr<scalar_t>(), lam.const_data_ptr<scalar_t>(), gl.const_data_ptr<scalar_t>(),
                            gc.const_data_ptr<scalar_t>(), gr.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                            sh, chunk, tile, per_block};
}


// The grid of one pass: a block per plane, times the direction groups (gspn_scan_kernel.cuh).
dim3 scan_grid(const ScanShape& sh, int per_block) {
  return dim3(static_cast<unsigned>(sh.B * sh.C), static_cast<unsigned>(kDirections / per_block), 1);
}

// out = the sum of the `groups` partial maps of out's size, in group order.
template <typename scalar_t>
void sum_direction_groups(const at::Tensor& partial, int groups, at::Tensor& out, cudaStream_t stream) {
  const int64_t n = out.numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(multiprocessors()) * 16);
  sum_direction_groups_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      partial.const_data_ptr<float>(), groups, n, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_plane_count(const ScanShape& sh) {
  TORCH_CHECK(sh.B * sh.C <= std::numeric_limits<int32_t>::max(), "gspn_scan (CUDA): B*C must be < 2^31");
}

at::Tensor gspn_scan_fwd_cuda(const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
                              const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in,
                              int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(), gc = gc_in.contiguous(),
       gr = gr_in.contiguous(), u = u_in.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y.contiguous(scan_memory_format(x_in));
  check_plane_count(sh);
  const int64_t max_lanes = std::max(sh.H, sh.W);
  const int per_block = direction_split(sh.B * sh.C, multiprocessors());
  const int groups = kDirections / per_block;
  const int tile = checked_tile(max_lanes, fwd_smem_floats, sh.B * sh.C * groups);
  const size_t smem = fwd_smem_floats(max_lanes, tile) * sizeof(float);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_types(x.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    // One block per plane: fp32 outputs accumulate the direction sum in place, half outputs through an
    // fp32 map. Split planes: each direction group into its partial map, summed afterwards.
    at::Tensor y_acc = groups == 1 && std::is_same_v<scalar_t, float>
                           ? y
                           : at::empty({groups, sh.B, sh.C, sh.H, sh.W}, x.options().dtype(at::kFloat));
    const FwdParams<scalar_t> params{scan_args<scalar_t>(x, lam, gl, gc, gr, u, sh, chunk, tile, per_block),
                                     y_acc.data_ptr<float>(), y.data_ptr<scalar_t>()};
    auto kernel = gspn_scan_fwd_kernel<scalar_t>;
    allow_smem(kernel, smem);
    kernel<<<scan_grid(sh, per_block), threads_for(max_lanes), smem, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (groups > 1) sum_direction_groups<scalar_t>(y_acc, groups, y, stream);
  });
  // The kernel reads and writes (B, C, H, W) planes; a channels-last x gets its y back in its own layout.
  return y.contiguous(scan_memory_format(x_in));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gspn_scan_bwd_cuda(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
    const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in, int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in);
  check_grad_output(gy_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto gy = gy_in.contiguous(), x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(),
       gc = gc_in.contiguous(), gr = gr_in.contiguous(), u = u_in.contiguous();
  const at::Tensor* inputs[] = {&lam, &gl, &gc, &gr, &u};
  const auto f32 = x.options().dtype(at::kFloat);
  // The kernel writes per-channel gate gradients: in the inputs' dtype when every gate is per-channel (or the
  // dtype is fp32), else all five as fp32 planes, summed over each group (or cast) below. Every element is
  // overwritten by the kernel.
  const bool direct = x.scalar_type() == at::kFloat ||
                      std::all_of(std::begin(inputs), std::end(inputs), [&](const at::Tensor* t) { return t->size(2) == sh.C; });
  at::Tensor outputs[5];
  for (int k = 0; k < 5; ++k) {
    outputs[k] = at::empty({sh.B, kDirections, sh.C, sh.H, sh.W}, direct ? x.options() : f32);
  }
  auto d_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() > 0) {
    check_plane_count(sh);
    const int64_t max_lanes = std::max(sh.H, sh.W);
    const int per_block = direction_split(sh.B * sh.C, multiprocessors());
    const int groups = kDirections / per_block;
    const int tile = checked_tile(max_lanes, bwd_smem_floats, sh.B * sh.C * groups);
    const size_t smem = bwd_smem_floats(max_lanes, tile) * sizeof(float);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    auto checkpoints = at::empty({groups * sh.B * sh.C, checkpoint_floats(max_lanes, tile)}, f32);
    dispatch_cuda_types(x.scalar_type(), [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      at::Tensor dx_acc = groups == 1 && std::is_same_v<scalar_t, float>
                              ? d_x
                              : at::empty({groups, sh.B, sh.C, sh.H, sh.W}, f32);
      const BwdParams<scalar_t> params{scan_args<scalar_t>(x, lam, gl, gc, gr, u, sh, chunk, tile, per_block),
                                       gy.const_data_ptr<scalar_t>(), checkpoints.data_ptr<float>(),
                                       dx_acc.data_ptr<float>(), d_x.data_ptr<scalar_t>(),
                                       {outputs[0].data_ptr(), outputs[1].data_ptr(), outputs[2].data_ptr(),
                                        outputs[3].data_ptr(), outputs[4].data_ptr()}};
      auto launch = [&](auto kernel) {
        allow_smem(kernel, smem);
        kernel<<<scan_grid(sh, per_block), threads_for(max_lanes), smem, stream>>>(params);
      };
      if (direct) {
        launch(gspn_scan_bwd_kernel<scalar_t, true>);
      } else {
        launch(gspn_scan_bwd_kernel<scalar_t, false>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (groups > 1) sum_direction_groups<scalar_t>(dx_acc, groups, d_x, stream);
    });
  }
  // A group's gradient is the sum over its channels (channel c is in group c / (C / G)), in a fixed order.
  const auto dt = x.scalar_type();
  auto group_sum = [&](int k) {
    const int64_t G = inputs[k]->size(2);
    if (G == sh.C) return outputs[k].to(dt);
    return at::sum(outputs[k].view({sh.B, kDirections, G, sh.C / G, sh.H, sh.W}), {3}, false, dt);
  };
  return {d_x.contiguous(scan_memory_format(x_in)), group_sum(0), group_sum(1), group_sum(2), group_sum(3),
          group_sum(4)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gspn, CUDA, m) {
  m.impl("gspn_scan_fwd", &gspn_scan_fwd_cuda);
  m.impl("gspn_scan_bwd", &gspn_scan_bwd_cuda);
}

}  // namespace gspn
