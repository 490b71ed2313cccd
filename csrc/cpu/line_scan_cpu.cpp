// CPU kernels of gspn::line_scan_fwd / line_scan_bwd: OpenMP over the (H, W) planes, a
// branch-free (vectorisable) loop over W per row, float32 accumulation for half types.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../cpu_parallel.h"
#include "../line_scan.h"
#include "../scan_math.h"

namespace gspn {
namespace {

template <typename scalar_t>
void line_scan_fwd_planes(const scalar_t* x, const scalar_t* lam, const scalar_t* wl,
                          const scalar_t* wc, const scalar_t* wr, scalar_t* h, PlaneShape s,
                          int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t W = s.W, plane_size = s.H * s.W;
  at::parallel_for(0, s.planes, plane_grain(plane_size), [&](int64_t begin, int64_t end) {
    // Two rows of W values with a zero on either side: prev[j], prev[j+1], prev[j+2] are
    // h[i-1, j-1], h[i-1, j], h[i-1, j+1], so the inner loop has no edge branches.
    std::vector<acc_t> rows(2 * (W + 2), acc_t(0));
    acc_t* prev = rows.data();
    acc_t* cur = rows.data() + W + 2;
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t i = 0; i < s.H; ++i) {
        const int64_t o = p * plane_size + i * W;
        const scalar_t* __restrict__ xr = x + o;
        const scalar_t* __restrict__ lr = lam + o;
        scalar_t* __restrict__ hr = h + o;
        acc_t* __restrict__ c = cur + 1;
        if (restarts_at(i, chunk)) {
          #pragma omp simd
          for (int64_t j = 0; j < W; ++j) {
            const acc_t v = acc_t(lr[j]) * acc_t(xr[j]);
            c[j] = v;
            hr[j] = scalar_t(v);
          }
        } else {
          const acc_t* __restrict__ q = prev;
          const scalar_t* __restrict__ a = wl + o;
          const scalar_t* __restrict__ b = wc + o;
          const scalar_t* __restrict__ d = wr + o;
          #pragma omp simd
          for (int64_t j = 0; j < W; ++j) {
            const acc_t v = scan_step<acc_t>(acc_t(a[j]), acc_t(b[j]), acc_t(d[j]), q[j], q[j + 1],
                                             q[j + 2], acc_t(lr[j]), acc_t(xr[j]));
            c[j] = v;
            hr[j] = scalar_t(v);
          }
        }
        std::swap(prev, cur);
      }
    }
  });
}

template <typename scalar_t>
void line_scan_bwd_planes(const scalar_t* gh, const scalar_t* h, const scalar_t* x,
                          const scalar_t* lam, const scalar_t* wl, const scalar_t* wc,
                          const scalar_t* wr, scalar_t* dx, scalar_t* dlam, scalar_t* dwl,
                          scalar_t* dwc, scalar_t* dwr, PlaneShape s, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t W = s.W, P = W + 2, plane_size = s.H * s.W;
  at::parallel_for(0, s.planes, plane_grain(plane_size), [&](int64_t begin, int64_t end) {
    // Carries of the row below, in zero-padded rows (index j + 1 holds column j):
    // carry_left of column j is cl[j + 2], carry_right is cr[j]; carry_centre is cc[j].
    // Two sets, read one while writing the other. hp holds h[i-1] zero-padded.
    std::vector<acc_t> buf(5 * P + 3 * W, acc_t(0));
    acc_t* cl_in = buf.data();
    acc_t* cr_in = cl_in + P;
    acc_t* cl_out = cr_in + P;
    acc_t* cr_out = cl_out + P;
    acc_t* hp = cr_out + P;
    acc_t* cc_in = hp + P;
    acc_t* cc_out = cc_in + W;
    acc_t* grow = cc_out + W;  // the adjoint g of the current row
    for (int64_t p = begin; p < end; ++p) {
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int64_t i = s.H - 1; i >= 0; --i) {
        const int64_t o = p * plane_size + i * W;
        const bool start = restarts_at(i, chunk);
        if (!start) {
          const scalar_t* __restrict__ hsrc = h + o - W;
          #pragma omp simd
          for (int64_t j = 0; j < W; ++j) hp[j + 1] = acc_t(hsrc[j]);
        }
        const scalar_t* __restrict__ ghr = gh + o;
        const scalar_t* __restrict__ xr = x + o;
        const scalar_t* __restrict__ lr = lam + o;
        const scalar_t* __restrict__ a = wl + o;
        const scalar_t* __restrict__ b = wc + o;
        const scalar_t* __restrict__ d = wr + o;
        scalar_t* __restrict__ dxr = dx + o;
        scalar_t* __restrict__ dlr = dlam + o;
        scalar_t* __restrict__ da = dwl + o;
        scalar_t* __restrict__ db = dwc + o;
        scalar_t* __restrict__ dd = dwr + o;
        const acc_t* __restrict__ cli = cl_in;
        const acc_t* __restrict__ cri = cr_in;
        const acc_t* __restrict__ cci = cc_in;
        acc_t* __restrict__ clo = cl_out;
        acc_t* __restrict__ cro = cr_out;
        acc_t* __restrict__ cco = cc_out;
        const acc_t* __restrict__ q = hp;
        // Two passes over the row, each touching at most six of the twelve equally aligned
        // (page-aligned) maps: one pass over all twelve thrashes the L1 cache's sets.
        acc_t* __restrict__ gr = grow;
        #pragma omp simd
        for (int64_t j = 0; j < W; ++j) {
          const acc_t g = adjoint<acc_t>(acc_t(ghr[j]), cli[j + 2], cci[j], cri[j]);
          gr[j] = g;
          dxr[j] = scalar_t(g * acc_t(lr[j]));
          dlr[j] = scalar_t(g * acc_t(xr[j]));
        }
        if (start) {
          // A start row's weights multiply nothing: their gradients and carries are zero.
          #pragma omp simd
          for (int64_t j = 0; j < W; ++j) {
            da[j] = db[j] = dd[j] = scalar_t(0);
            clo[j + 1] = cco[j] = cro[j + 1] = acc_t(0);
          }
        } else {
          #pragma omp simd
          for (int64_t j = 0; j < W; ++j) {
            const acc_t g = gr[j];
            da[j] = scalar_t(g * q[j]);
            db[j] = scalar_t(g * q[j + 1]);
            dd[j] = scalar_t(g * q[j + 2]);
            clo[j + 1] = acc_t(a[j]) * g;
            cco[j] = acc_t(b[j]) * g;
            cro[j + 1] = acc_t(d[j]) * g;
          }
        }
        std::swap(cl_in, cl_out);
        std::swap(cr_in, cr_out);
        std::swap(cc_in, cc_out);
      }
    }
  });
}

at::Tensor line_scan_fwd_cpu(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& wl,
                             const at::Tensor& wc, const at::Tensor& wr, int64_t chunk) {
  const PlaneShape s = check_same_maps<5>("gspn::line_scan_fwd", {&x, &lam, &wl, &wc, &wr},
                                          {"x", "lam", "wl", "wc", "wr"});
  const at::Tensor xc = x.contiguous(), lc = lam.contiguous(), ac = wl.contiguous(),
                   bc = wc.contiguous(), dc = wr.contiguous();
  at::Tensor h = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (h.numel() == 0) return h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "line_scan_fwd_cpu", [&] {
    line_scan_fwd_planes<scalar_t>(xc.const_data_ptr<scalar_t>(), lc.const_data_ptr<scalar_t>(),
                                   ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                                   dc.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), s,
                                   chunk);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> line_scan_bwd_cpu(
    const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x, const at::Tensor& lam,
    const at::Tensor& wl, const at::Tensor& wc, const at::Tensor& wr, int64_t chunk) {
  const PlaneShape s = check_same_maps<7>("gspn::line_scan_bwd", {&grad_h, &h, &x, &lam, &wl, &wc, &wr},
                                          {"grad_h", "h", "x", "lam", "wl", "wc", "wr"});
  const at::Tensor gc = grad_h.contiguous(), hc = h.contiguous(), xc = x.contiguous(),
                   lc = lam.contiguous(), ac = wl.contiguous(), bc = wc.contiguous(),
                   dc = wr.contiguous();
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dx = at::empty(x.sizes(), opts), dlam = at::empty(x.sizes(), opts),
             dwl = at::empty(x.sizes(), opts), dwc = at::empty(x.sizes(), opts),
             dwr = at::empty(x.sizes(), opts);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "line_scan_bwd_cpu", [&] {
      line_scan_bwd_planes<scalar_t>(
          gc.const_data_ptr<scalar_t>(), hc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
          lc.const_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
          dc.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
          dlam.mutable_data_ptr<scalar_t>(), dwl.mutable_data_ptr<scalar_t>(),
          dwc.mutable_data_ptr<scalar_t>(), dwr.mutable_data_ptr<scalar_t>(), s, chunk);
    });
  }
  return {dx, dlam, dwl, dwc, dwr};
}

}  // namespace
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn, CPU, m) {
  m.impl("line_scan_fwd", &gspn::line_scan_fwd_cpu);
  m.impl("line_scan_bwd", &gspn::line_scan_bwd_cpu);
}
