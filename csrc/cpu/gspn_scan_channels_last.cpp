// Fused four-direction GSPN propagation on channels-last maps whose gate tensors share one channel grouping:
// the CPU kernel gspn_scan_cpu.cpp runs for such inputs (channels_last_kernel_applies).
//
// Contract as gspn_scan_cpu.cpp's: dit_gspn/ops/reference.py::gspn_scan_reference. x (B, C, H, W) lies in
// memory as (B, H, W, C), which is how the model's (B, N, C) tokens look when viewed as a map, so the mixer
// hands them over without a copy and gets y back the same way.
//
// A task is one (batch, channel group). Its five gate maps hold one value per pixel and direction, shared by
// the group's n channels, so one step of the recurrence at one pixel is a few scalar-times-vector updates
// over n contiguous channels (vectorised by the compiler; csrc/cpu/lane_math.h's GSPN_CPU_CLONES builds
// them for AVX2 + FMA too), and the normalisation runs once per pixel and group, not once per channel. A
// direction changes only the order in which pixels are visited: nothing is transposed. The gates' gradients
// are per-pixel sums over the group's channels, each computed by one task and written once: no atomics,
// no zero-filled accumulators, deterministic.
//
// Memory: as in gspn_scan_cpu.cpp, the backward recomputes one direction's states at a time, here into a
// per-thread (H or W + 1, lanes + 2, n) buffer, instead of the forward saving 4 x C maps.
#include "gspn_scan_channels_last.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../cpu_parallel.h"
#include "../gspn_scan_checks.h"
#include "lane_math.h"

namespace gspn {
namespace {

// One direction's per-pixel values of one (batch, group) in scan order (index s * L + l): the normalised
// weights wl, wc, wr, their slopes ql, qc, qr (backward only; csrc/scan_math.h), lam and u.
template <typename acc_t>
struct DirectionFrames {
  enum { kWl, kWc, kWr, kQl, kQc, kQr, kLam, kU, kCount };
  int64_t size;
  std::vector<acc_t> data;
  explicit DirectionFrames(int64_t HW) : size(HW), data(kCount * HW) {}
  const acc_t* operator[](int k) const { return data.data() + k * size; }

  // From the gate tensors' plane `plane` (offset of its (0, 0) pixel), read along geo.
  template <typename scalar_t>
  void load(const ScanGeometry& geo, int64_t plane, const scalar_t* lam, const scalar_t* gl, const scalar_t* gc,
            const scalar_t* gr, const scalar_t* u, bool slopes) {
    acc_t* f = data.data();
    const int64_t L = geo.lanes;
    for (int64_t s = 0; s < geo.steps; ++s) {
      for (int64_t l = 0; l < L; ++l) {
        const int64_t i = s * L + l, o = plane + geo.offset(s, l);
        acc_t q[3];
        normalized_weights<acc_t>(acc_t(gl[o]), acc_t(gc[o]), acc_t(gr[o]), l > 0, l + 1 < L, f[kWl * size + i],
                                  f[kWc * size + i], f[kWr * size + i], LaneExp(), slopes ? q : nullptr);
        if (slopes) {
          f[kQl * size + i] = q[0];
          f[kQc * size + i] = q[1];
          f[kQr * size + i] = q[2];
        }
        f[kLam * size + i] = acc_t(lam[o]);
        f[kU * size + i] = acc_t(u[o]);
      }
    }
  }
};

// out (HW, n) = channels [c0, c0 + n) of the (HW, C) channels-last plane `map`, in the compute type.
template <typename scalar_t, typename acc_t>
void gather_group(const scalar_t* map, int64_t HW, int64_t C, int64_t c0, int64_t n, acc_t* out) {
  for (int64_t p = 0; p < HW; ++p) {
    const scalar_t* src = map + p * C + c0;
    acc_t* dst = out + p * n;
    for (int64_t j = 0; j < n; ++j) dst[j] = acc_t(src[j]);
  }
}

// The inverse of gather_group: channels [c0, c0 + n) of `map` = in (HW, n), converted to the map's type.
template <typename acc_t, typename scalar_t>
void scatter_group(const acc_t* in, int64_t HW, int64_t C, int64_t c0, int64_t n, scalar_t* map) {
  for (int64_t p = 0; p < HW; ++p) {
    const acc_t* src = in + p * n;
    scalar_t* dst = map + p * C + c0;
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

// The state rows of one step: L lanes of n channels with a zero lane on each side (lane(-1), lane(L)).
template <typename acc_t>
struct StateRow {
  acc_t* base;  // lane 0
  int64_t n;
  acc_t* lane(int64_t l) const { return base + l * n; }
};

// h = lam x + (wl hp[l-1] + wc hp[l] + wr hp[l+1], unless the step restarts), and y += u h, at one pixel.
template <typename acc_t>
__attribute__((always_inline)) inline void step_pixel(int64_t n, bool restart, acc_t lam, acc_t wl, acc_t wc, acc_t wr, acc_t u,
                                const acc_t* __restrict__ x, const acc_t* __restrict__ hl,
                                const acc_t* __restrict__ hc, const acc_t* __restrict__ hr, acc_t* __restrict__ h,
                                acc_t* __restrict__ y) {
  if (restart) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h[j] = lam * x[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h[j] = lam * x[j] + wl * hl[j] + wc * hc[j] + wr * hr[j];
  }
  if (y != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] += u * h[j];
  }
}

// One direction's sweep over the group's (HW, n) map x: step s reads the states row_of(s) and writes
// row_of(s + 1); u h is added into y (if not null).
template <typename acc_t, typename RowOf>
GSPN_CPU_CLONES void sweep_states(const ScanGeometry& geo, const DirectionFrames<acc_t>& f, int64_t n, int64_t chunk,
                  const acc_t* x, RowOf row_of, acc_t* y) {
  const int64_t L = geo.lanes;
  const acc_t *wl = f[f.kWl], *wc = f[f.kWc], *wr = f[f.kWr], *lam = f[f.kLam], *u = f[f.kU];
  for (int64_t s = 0; s < geo.steps; ++s) {
    const bool restart = restarts_at(s, chunk);
    const StateRow<acc_t> hp = row_of(s), h = row_of(s + 1);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i = s * L + l, pix = geo.offset(s, l);
      step_pixel<acc_t>(n, restart, lam[i], wl[i], wc[i], wr[i], u[i], x + pix * n, hp.lane(l - 1), hp.lane(l),
                        hp.lane(l + 1), h.lane(l), y == nullptr ? nullptr : y + pix * n);
    }
  }
}

// Per-thread rows of states: `rows` rows of (max_lanes + 2) x n, zeroed, viewed as StateRows.
template <typename acc_t>
struct StateRows {
  std::vector<acc_t> data;
  std::vector<StateRow<acc_t>> rows;
  StateRows(int64_t count, int64_t max_lanes, int64_t n) : data(count * (max_lanes + 2) * n, acc_t(0)) {
    for (int64_t r = 0; r < count; ++r) rows.push_back({data.data() + (r * (max_lanes + 2) + 1) * n, n});
  }
  void zero() { std::fill(data.begin(), data.end(), acc_t(0)); }
};

template <typename scalar_t>
struct Operands {
  const scalar_t *x, *lam, *gl, *gc, *gr, *u;
};

template <typename scalar_t>
void forward_kernel(const Operands<scalar_t>& in, scalar_t* y, const ScanShape& sh, int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W, G = sh.g_gl, n = sh.C / G, max_lanes = std::max(sh.H, sh.W);
  at::parallel_for(0, sh.B * G, plane_grain(kDirections * HW * n), [&](int64_t begin, int64_t end) {
    DirectionFrames<acc_t> frames(HW);
    std::vector<acc_t> x(HW * n), y_acc(HW * n);
    StateRows<acc_t> rows(2, max_lanes, n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      gather_group(in.x + b * HW * sh.C, HW, sh.C, g * n, n, x.data());
      std::fill(y_acc.begin(), y_acc.end(), acc_t(0));
      for (int d = 0; d < kDirections; ++d) {
        const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
        frames.load(geo, ((b * kDirections + d) * G + g) * HW, in.lam, in.gl, in.gc, in.gr, in.u, false);
        rows.zero();  // the pads (a direction with fewer lanes reads lane L, which a longer one wrote)
        // Two rows, alternating: step s reads row s % 2 and writes the other.
        sweep_states(geo, frames, n, chunk, x.data(), [&](int64_t r) { return rows.rows[r % 2]; }, y_acc.data());
      }
      scatter_group(y_acc.data(), HW, sh.C, g * n, n, y + b * HW * sh.C);
    }
  });
}

// The adjoint g of one pixel's state, g = u gy + (the next step's weights times its adjoints, where it
// applies), and what needs only g: dx += lam g, and the returned (dlam, du) = (sum x g, sum gy h).
template <typename acc_t>
__attribute__((always_inline)) inline std::pair<acc_t, acc_t> adjoint_pixel(int64_t n, bool next_applies, acc_t u, acc_t lam, acc_t cw,
                                                     acc_t lw, acc_t rw, const acc_t* __restrict__ gy,
                                                     const acc_t* __restrict__ x, const acc_t* __restrict__ h,
                                                     const acc_t* __restrict__ gn_left,
                                                     const acc_t* __restrict__ gn_centre,
                                                     const acc_t* __restrict__ gn_right, acc_t* __restrict__ g,
                                                     acc_t* __restrict__ dx) {
  if (next_applies) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = u * gy[j] + cw * gn_centre[j] + lw * gn_right[j] + rw * gn_left[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = u * gy[j];
  }
  acc_t dlam = 0, du = 0;
#pragma omp simd reduction(+ : dlam, du)
  for (int64_t j = 0; j < n; ++j) {
    dx[j] += lam * g[j];
    dlam += x[j] * g[j];
    du += gy[j] * h[j];
  }
  return {dlam, du};
}

// The weights' gradients at one pixel, dw_k = sum over channels of g h_prev[neighbour k].
template <typename acc_t>
__attribute__((always_inline)) inline void weight_gradients(int64_t n, const acc_t* __restrict__ g, const acc_t* __restrict__ hl,
                                      const acc_t* __restrict__ hc, const acc_t* __restrict__ hr, acc_t dw[3]) {
  acc_t a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
  for (int64_t j = 0; j < n; ++j) {
    a += g[j] * hl[j];
    b += g[j] * hc[j];
    c += g[j] * hr[j];
  }
  dw[0] = a;
  dw[1] = b;
  dw[2] = c;
}

template <typename scalar_t>
struct GateGradPtrs {
  scalar_t *lam, *gl, *gc, *gr, *u;
};

// One direction's backward sweep over the group's (HW, n) maps x and gy, given its recomputed states (row
// s + 1 holds step s): dx accumulates, the gate gradients of plane `plane` are written.
template <typename acc_t, typename scalar_t>
GSPN_CPU_CLONES void adjoint_sweep(const ScanGeometry& geo, const DirectionFrames<acc_t>& f, int64_t n, int64_t chunk,
                                   const acc_t* x, const acc_t* gy, const StateRows<acc_t>& states,
                                   const StateRows<acc_t>& adjoints, acc_t* dx, const GateGradPtrs<scalar_t>& grads,
                                   int64_t plane) {
  const int64_t S = geo.steps, L = geo.lanes;
  const acc_t *wl = f[f.kWl], *wc = f[f.kWc], *wr = f[f.kWr], *lam = f[f.kLam], *u = f[f.kU];
  for (int64_t s = S - 1; s >= 0; --s) {
    const bool next_applies = s + 1 < S && !restarts_at(s + 1, chunk), restart = restarts_at(s, chunk);
    const StateRow<acc_t> gn = adjoints.rows[(s + 1) % 2], gc = adjoints.rows[s % 2];
    const StateRow<acc_t> h = states.rows[s + 1], hp = states.rows[s];
    const int64_t next = (s + 1) * L;  // the next step's frame row (read only where it applies)
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i = s * L + l, pix = geo.offset(s, l), o = plane + pix;
      // Lane l of this step feeds lane l of the next through wc, lane l + 1 through wl, lane l - 1 through wr.
      const acc_t cw = next_applies ? wc[next + l] : acc_t(0);
      const acc_t lw = next_applies && l + 1 < L ? wl[next + l + 1] : acc_t(0);
      const acc_t rw = next_applies && l > 0 ? wr[next + l - 1] : acc_t(0);
      const auto [dlam, du] =
          adjoint_pixel<acc_t>(n, next_applies, u[i], lam[i], cw, lw, rw, gy + pix * n,
                               x + pix * n, h.lane(l), gn.lane(l - 1), gn.lane(l), gn.lane(l + 1),
                               gc.lane(l), dx + pix * n);
      grads.lam[o] = static_cast<scalar_t>(dlam);
      grads.u[o] = static_cast<scalar_t>(du);
      acc_t dgl = 0, dgc = 0, dgr = 0;
      if (!restart) {  // no gates act on a restarting step
        acc_t dw[3];
        weight_gradients<acc_t>(n, gc.lane(l), hp.lane(l - 1), hp.lane(l), hp.lane(l + 1), dw);
        const acc_t q[3] = {f[f.kQl][i], f[f.kQc][i], f[f.kQr][i]};
        normalized_weights_backward<acc_t>(q, wl[i], wc[i], wr[i], dw[0], dw[1], dw[2], dgl, dgc, dgr);
      }
      grads.gl[o] = static_cast<scalar_t>(dgl);
      grads.gc[o] = static_cast<scalar_t>(dgc);
      grads.gr[o] = static_cast<scalar_t>(dgr);
    }
  }
}

// Per direction: the states recomputed (see the top of the file), then the steps swept backwards with the
// adjoint g_s = u_s gy_s + A_{s+1}^T g_{s+1} (A_{s+1} absent where step s+1 restarts); the logit gradients
// come from csrc/scan_math.h's normalized_weights_backward of dw_k = sum g h_{s-1}[neighbour k].
template <typename scalar_t>
void backward_kernel(const scalar_t* gy_in, const Operands<scalar_t>& in, scalar_t* d_x,
                     const GateGradPtrs<scalar_t>& grads, const ScanShape& sh, int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W, G = sh.g_gl, n = sh.C / G, max_lanes = std::max(sh.H, sh.W);
  at::parallel_for(0, sh.B * G, plane_grain(2 * kDirections * HW * n), [&](int64_t begin, int64_t end) {
    DirectionFrames<acc_t> f(HW);
    std::vector<acc_t> x(HW * n), gy(HW * n), dx(HW * n);
    StateRows<acc_t> states(max_lanes + 1, max_lanes, n), adjoints(2, max_lanes, n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      gather_group(in.x + b * HW * sh.C, HW, sh.C, g * n, n, x.data());
      gather_group(gy_in + b * HW * sh.C, HW, sh.C, g * n, n, gy.data());
      std::fill(dx.begin(), dx.end(), acc_t(0));
      for (int d = 0; d < kDirections; ++d) {
        const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
        const int64_t plane = ((b * kDirections + d) * G + g) * HW;
        f.load(geo, plane, in.lam, in.gl, in.gc, in.gr, in.u, true);
        states.zero();
        adjoints.zero();
        sweep_states(geo, f, n, chunk, x.data(), [&](int64_t r) { return states.rows[r]; },
                     static_cast<acc_t*>(nullptr));
        adjoint_sweep(geo, f, n, chunk, x.data(), gy.data(), states, adjoints, dx.data(), grads, plane);
      }
      scatter_group(dx.data(), HW, sh.C, g * n, n, d_x + b * HW * sh.C);
    }
  });
}

}  // namespace

bool channels_last_kernel_applies(const at::Tensor& x, const ScanShape& sh) {
  const int64_t G = sh.g_gl;
  return scan_memory_format(x) == at::MemoryFormat::ChannelsLast && sh.g_lam == G && sh.g_gc == G &&
         sh.g_gr == G && sh.g_u == G && sh.C / G >= kMinGroupChannels;
}

at::Tensor gspn_scan_fwd_channels_last(const at::Tensor& x, const at::Tensor& lam_in, const at::Tensor& gl_in,
                                       const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in,
                                       const ScanShape& sh, int64_t chunk) {
  auto lam = lam_in.contiguous(), gl = gl_in.contiguous(), gc = gc_in.contiguous(), gr = gr_in.contiguous(),
       u = u_in.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_fwd_channels_last", [&] {
    const Operands<scalar_t> in{x.data_ptr<scalar_t>(),  lam.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(),
                                gc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(),  u.data_ptr<scalar_t>()};
    forward_kernel<scalar_t>(in, y.data_ptr<scalar_t>(), sh, chunk);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gspn_scan_bwd_channels_last(
    const at::Tensor& gy_in, const at::Tensor& x, const at::Tensor& lam_in, const at::Tensor& gl_in,
    const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in, const ScanShape& sh, int64_t chunk) {
  auto gy = gy_in.contiguous(at::MemoryFormat::ChannelsLast), lam = lam_in.contiguous(), gl = gl_in.contiguous(),
       gc = gc_in.contiguous(), gr = gr_in.contiguous(), u = u_in.contiguous();
  auto d_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto d_lam = at::empty_like(lam), d_gl = at::empty_like(gl), d_gc = at::empty_like(gc), d_gr = at::empty_like(gr),
       d_u = at::empty_like(u);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_bwd_channels_last", [&] {
      const Operands<scalar_t> in{x.data_ptr<scalar_t>(),  lam.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(),
                                  gc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(),  u.data_ptr<scalar_t>()};
      const GateGradPtrs<scalar_t> d{d_lam.data_ptr<scalar_t>(), d_gl.data_ptr<scalar_t>(), d_gc.data_ptr<scalar_t>(),
                                     d_gr.data_ptr<scalar_t>(), d_u.data_ptr<scalar_t>()};
      backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), in, d_x.data_ptr<scalar_t>(), d, sh, chunk);
    });
  }
  return {d_x, d_lam, d_gl, d_gc, d_gr, d_u};
}

}  // namespace gspn
