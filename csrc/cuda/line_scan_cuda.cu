// CUDA kernels of gspn::line_scan_fwd / line_scan_bwd: the whole scan in one launch.
//
// A block holds `planes_per_block` (H, W) planes side by side (threadIdx.y) with `tw` threads
// along W (threadIdx.x); thread x owns columns x, x + tw, ... (kCols of them), so a warp's
// loads and stores are consecutive along W. The block walks the rows in order (bottom-up for
// the backward), keeping the previous row's values in shared memory, double-buffered so that
// one __syncthreads per row suffices. Each input element is read from global memory once and
// each output written once; the inputs of the next kDepth rows are loaded ahead into registers
// so their latency hides behind the current row's arithmetic. Small planes (a 16x16 DiT grid)
// are packed several per block so no thread idles. Offsets are 64-bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../line_scan.h"
#include "../line_scan_common.h"

namespace gspn {
namespace {

constexpr int kMaxThreads = 1024;   // threads per block along W at most
constexpr int kPackedThreads = 256;  // block size to aim for when packing small planes
constexpr int kMaxColsPerThread = 4;

// How a launch covers the planes: tw threads along W, each owning `cols` columns, and
// planes_per_block planes per block.
struct LaunchShape {
  int tw;
  int cols;
  int planes_per_block;
  int64_t blocks;
};

LaunchShape launch_shape(const PlaneShape& s) {
  TORCH_CHECK(s.W <= int64_t(kMaxThreads) * kMaxColsPerThread,
              "gspn::line_scan (CUDA kernel): W = ", s.W, " exceeds the kernel's limit of ",
              kMaxThreads * kMaxColsPerThread, " columns; scan a transposed map or use impl='reference'");
  LaunchShape l;
  l.cols = s.W <= kMaxThreads ? 1 : kMaxColsPerThread;
  l.tw = static_cast<int>((s.W + l.cols - 1) / l.cols);
  l.planes_per_block = std::max(1, kPackedThreads / l.tw);
  l.blocks = (s.planes + l.planes_per_block - 1) / l.planes_per_block;
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

template <typename scalar_t, int kCols, int kDepth>
__global__ void __launch_bounds__(kMaxThreads)
line_scan_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                     const scalar_t* __restrict__ wl, const scalar_t* __restrict__ wc,
                     const scalar_t* __restrict__ wr, scalar_t* __restrict__ h, int64_t planes,
                     int64_t H, int64_t W, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const int tw = blockDim.x, tx = threadIdx.x;
  const int64_t padded = W + 2;  // a row with a zero on either side: index j + 1 holds column j
  const int64_t plane = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = plane < planes;
  const int64_t base = live ? plane * H * W : 0;
  acc_t* const even = smem + threadIdx.y * padded;  // rows 0, 2, 4, ...
  acc_t* const odd = smem + (blockDim.y + threadIdx.y) * padded;  // rows 1, 3, 5, ...
  for (int64_t k = tx; k < padded; k += tw) even[k] = odd[k] = acc_t(0);
  __syncthreads();

  // Inputs of rows i .. i + kDepth - 1, slot 0 being row i.
  scalar_t rx[kDepth][kCols], rlam[kDepth][kCols], rwl[kDepth][kCols], rwc[kDepth][kCols], rwr[kDepth][kCols];
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

  for (int64_t i = 0; i < H; ++i) {
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
    load(kDepth - 1, i + kDepth);

    const acc_t* prev = (i & 1) ? even : odd;  // row i - 1
    acc_t* cur = (i & 1) ? odd : even;
    const bool start = is_row_start(i, chunk);
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

template <typename scalar_t, int kCols, int kDepth>
__global__ void __launch_bounds__(kMaxThreads)
line_scan_bwd_kernel(const scalar_t* __restrict__ gh, const scalar_t* __restrict__ h,
                     const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                     const scalar_t* __restrict__ wl, const scalar_t* __restrict__ wc,
                     const scalar_t* __restrict__ wr, scalar_t* __restrict__ dx,
                     scalar_t* __restrict__ dlam, scalar_t* __restrict__ dwl,
                     scalar_t* __restrict__ dwc, scalar_t* __restrict__ dwr, int64_t planes,
                     int64_t H, int64_t W, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

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

  // Inputs of rows i, i - 1, ..., slot 0 being row i; rhm2 is h[i - 2].
  scalar_t rgh[kDepth][kCols], rx[kDepth][kCols], rlam[kDepth][kCols], rwl[kDepth][kCols],
      rwc[kDepth][kCols], rwr[kDepth][kCols], rhm2[kDepth][kCols];
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

  for (int64_t i = H - 1; i >= 0; --i) {
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
    load(kDepth - 1, i - kDepth);

    const int rs = (i + 1) & 1, ws = i & 1;
    const acc_t* cl_in = row(rs, 0);
    const acc_t* cr_in = row(rs, 1);
    const acc_t* hp = row(rs, 2);
    acc_t* cl_out = row(ws, 0);
    acc_t* cr_out = row(ws, 1);
    acc_t* hp_out = row(ws, 2);
    const bool start = is_row_start(i, chunk);
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

template <typename scalar_t>
void launch_fwd(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& wl, const at::Tensor& wc,
                const at::Tensor& wr, at::Tensor& h, const PlaneShape& s, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaunchShape l = launch_shape(s);
  const dim3 block(l.tw, l.planes_per_block);
  const size_t smem = size_t(2) * l.planes_per_block * (s.W + 2) * sizeof(acc_t);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto kernel) {
    allow_shared_memory(kernel, smem);
    kernel<<<static_cast<unsigned>(l.blocks), block, smem, stream>>>(
        x.const_data_ptr<scalar_t>(), lam.const_data_ptr<scalar_t>(), wl.const_data_ptr<scalar_t>(),
        wc.const_data_ptr<scalar_t>(), wr.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(),
        s.planes, s.H, s.W, chunk);
  };
  if (l.cols == 1) {
    run(line_scan_fwd_kernel<scalar_t, 1, 2>);
  } else {
    run(line_scan_fwd_kernel<scalar_t, kMaxColsPerThread, 1>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_bwd(const at::Tensor& gh, const at::Tensor& h, const at::Tensor& x, const at::Tensor& lam,
                const at::Tensor& wl, const at::Tensor& wc, const at::Tensor& wr, at::Tensor& dx,
                at::Tensor& dlam, at::Tensor& dwl, at::Tensor& dwc, at::Tensor& dwr, const PlaneShape& s,
                int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaunchShape l = launch_shape(s);
  const dim3 block(l.tw, l.planes_per_block);
  const size_t smem = size_t(6) * l.planes_per_block * (s.W + 2) * sizeof(acc_t);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto kernel) {
    allow_shared_memory(kernel, smem);
    kernel<<<static_cast<unsigned>(l.blocks), block, smem, stream>>>(
        gh.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        lam.const_data_ptr<scalar_t>(), wl.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
        wr.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), dlam.mutable_data_ptr<scalar_t>(),
        dwl.mutable_data_ptr<scalar_t>(), dwc.mutable_data_ptr<scalar_t>(), dwr.mutable_data_ptr<scalar_t>(),
        s.planes, s.H, s.W, chunk);
  };
  if (l.cols == 1) {
    run(line_scan_bwd_kernel<scalar_t, 1, 2>);
  } else {
    run(line_scan_bwd_kernel<scalar_t, kMaxColsPerThread, 1>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor line_scan_fwd_cuda(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& wl,
                              const at::Tensor& wc, const at::Tensor& wr, int64_t chunk) {
  const PlaneShape s = check_same_maps<5>("gspn::line_scan_fwd", {&x, &lam, &wl, &wc, &wr},
                                          {"x", "lam", "wl", "wc", "wr"});
  check_chunk("gspn::line_scan_fwd", chunk);
  TORCH_CHECK(x.is_cuda(), "gspn::line_scan_fwd (CUDA kernel): tensors are on ", x.device());
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
  check_chunk("gspn::line_scan_bwd", chunk);
  TORCH_CHECK(x.is_cuda(), "gspn::line_scan_bwd (CUDA kernel): tensors are on ", x.device());
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
