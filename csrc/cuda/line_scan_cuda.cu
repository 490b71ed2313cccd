// Host side of gspn::line_scan_fwd / line_scan_bwd on CUDA: checks, dispatch and launch. The
// kernels, the layout of their work and the shape of their launch are in
// csrc/cuda/line_scan_kernel.cuh: the whole scan is one launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../line_scan.h"
#include "line_scan_bwd.cuh"
#include "line_scan_fwd.cuh"

namespace gspn {
namespace {

using namespace line_scan_kernels;

LaunchShape checked_launch_shape(const PlaneShape& s) {
  TORCH_CHECK(s.W <= kMaxW, "gspn::line_scan (CUDA kernel): W = ", s.W, " exceeds the kernel's limit of ", kMaxW,
              " columns; scan a transposed map or use impl='reference'");
  const LaunchShape l = launch_shape(s.planes, s.W);
  TORCH_CHECK(l.blocks <= int64_t(0x7fffffff), "gspn::line_scan (CUDA kernel): too many planes (", s.planes, ")");
  return l;
}

// Raises the kernel's dynamic shared-memory limit when a wide plane needs more than 48 KiB.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= size_t(optin), "gspn::line_scan (CUDA kernel): needs ", bytes,
              " bytes of shared memory per block, the device allows ", optin, "; W is too large");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename scalar_t>
void launch_fwd(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& wl, const at::Tensor& wc,
                const at::Tensor& wr, at::Tensor& h, const PlaneShape& s, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaunchShape l = checked_launch_shape(s);
  const dim3 block(l.tw, l.planes_per_block);
  const size_t smem = fwd_smem_bytes<acc_t>(l, s.W);
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_fwd_kernel<scalar_t, acc_t>(l, [&](auto kernel) {
    allow_shared_memory(kernel, smem);
    kernel<<<static_cast<unsigned>(l.blocks), block, smem, stream>>>(
        x.const_data_ptr<scalar_t>(), lam.const_data_ptr<scalar_t>(), wl.const_data_ptr<scalar_t>(),
        wc.const_data_ptr<scalar_t>(), wr.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(),
        s.planes, s.H, s.W, chunk);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_bwd(const at::Tensor& gh, const at::Tensor& h, const at::Tensor& x, const at::Tensor& lam,
                const at::Tensor& wl, const at::Tensor& wc, const at::Tensor& wr, at::Tensor& dx,
                at::Tensor& dlam, at::Tensor& dwl, at::Tensor& dwc, at::Tensor& dwr, const PlaneShape& s,
                int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaunchShape l = checked_launch_shape(s);
  const dim3 block(l.tw, l.planes_per_block);
  const size_t smem = bwd_smem_bytes<acc_t>(l, s.W);
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_bwd_kernel<scalar_t, acc_t>(l, [&](auto kernel) {
    allow_shared_memory(kernel, smem);
    kernel<<<static_cast<unsigned>(l.blocks), block, smem, stream>>>(
        gh.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        lam.const_data_ptr<scalar_t>(), wl.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
        wr.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), dlam.mutable_data_ptr<scalar_t>(),
        dwl.mutable_data_ptr<scalar_t>(), dwc.mutable_data_ptr<scalar_t>(), dwr.mutable_data_ptr<scalar_t>(),
        s.planes, s.H, s.W, chunk);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor line_scan_fwd_cuda(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& wl,
                              const at::Tensor& wc, const at::Tensor& wr, int64_t chunk) {
  const PlaneShape s = check_same_maps<5>("gspn::line_scan_fwd", {&x, &lam, &wl, &wc, &wr},
                                          {"x", "lam", "wl", "wc", "wr"});
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), lc = lam.contiguous(), ac = wl.contiguous(),
                   bc = wc.contiguous(), dc = wr.contiguous();
  at::Tensor h = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (h.numel() == 0) return h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "line_scan_fwd_cuda", [&] {
    launch_fwd<scalar_t>(xc, lc, ac, bc, dc, h, s, chunk);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> line_scan_bwd_cuda(
    const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x, const at::Tensor& lam,
    const at::Tensor& wl, const at::Tensor& wc, const at::Tensor& wr, int64_t chunk) {
  const PlaneShape s = check_same_maps<7>("gspn::line_scan_bwd", {&grad_h, &h, &x, &lam, &wl, &wc, &wr},
                                          {"grad_h", "h", "x", "lam", "wl", "wc", "wr"});
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gc = grad_h.contiguous(), hc = h.contiguous(), xc = x.contiguous(),
                   lc = lam.contiguous(), ac = wl.contiguous(), bc = wc.contiguous(),
                   dc = wr.contiguous();
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dx = at::empty(x.sizes(), opts), dlam = at::empty(x.sizes(), opts),
             dwl = at::empty(x.sizes(), opts), dwc = at::empty(x.sizes(), opts),
             dwr = at::empty(x.sizes(), opts);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "line_scan_bwd_cuda", [&] {
      launch_bwd<scalar_t>(gc, hc, xc, lc, ac, bc, dc, dx, dlam, dwl, dwc, dwr, s, chunk);
    });
  }
  return {dx, dlam, dwl, dwc, dwr};
}

}  // namespace
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn, CUDA, m) {
  m.impl("line_scan_fwd", &gspn::line_scan_fwd_cuda);
  m.impl("line_scan_bwd", &gspn::line_scan_bwd_cuda);
}
