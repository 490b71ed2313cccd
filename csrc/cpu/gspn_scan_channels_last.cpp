// Fused four-direction GSPN propagation on channels-last maps whose gate tensors share one channel grouping:
// the CPU kernel gspn_scan_cpu.cpp runs for such inputs (channels_last_kernel_applies).
//
// Contract as gspn_scan_cpu.cpp's: dit_gspn/ops/reference.py::gspn_scan_reference. x (B, C, H, W) lies in
// memory as (B, H, W, C), which is how the model's (B, N, C) tokens look when viewed as a map, so the mixer
// hands them over without a copy and gets y back the same way.
//
// A task is one (batch, channel group). Its five gate maps hold one value per pixel and direction, shared by
// the group's n channels, so one step of the recurrence at one pixel is a few scalar-times-vector updates
// over the group's channels, held as m = n rounded up to whole Packs (csrc/cpu/lane_math.h: explicit 32-byte
// vectors, AVX2 + FMA in the GSPN_CPU_CLONES x86-64-v3 clones; the padding channels are zero), and the
// normalisation runs once per pixel and group, a row of lanes at a time (csrc/cpu/scan_frames.h), not once
// per channel. A direction changes only the order in which pixels are visited: nothing is transposed. The
// gates' gradients are per-pixel sums over the group's channels, each computed by one task and written once:
// no atomics, no zero-filled accumulators, deterministic.
//
// Memory: as in gspn_scan_cpu.cpp, the backward recomputes one direction's states at a time, here into a
// per-thread (H or W + 1, lanes + 2, m) buffer, instead of the forward saving 4 x C maps.
#include "gspn_scan_channels_last.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../cpu_parallel.h"
#include "../gspn_scan_checks.h"
#include "lane_math.h"
#include "scan_frames.h"

namespace gspn {
namespace {

// One direction's per-pixel values of one (batch, group) in scan order (index s * L + l): the normalised
// weights wl, wc, wr, their slopes ql, qc, qr (backward only; csrc/cpu/scan_frames.h), lam and u.
template <typename acc_t>
struct DirectionFrames {
  enum { kWl, kWc, kWr, kQl, kQc, kQr, kLam, kU, kCount };
  int64_t size;
  std::vector<acc_t> data;
  explicit DirectionFrames(int64_t HW) : size(HW), data(kCount * HW) {}
  const acc_t* operator[](int k) const { return data.data() + k * size; }
  acc_t* frame(int k) { return data.data() + k * size; }

  // From the gate tensors' plane `plane` (offset of its (0, 0) pixel), read along geo; the logits are
  // normalised in place, a row of lanes at a time.
  template <typename scalar_t>
  void load(const ScanGeometry& geo, int64_t plane, const scalar_t* lam, const scalar_t* gl, const scalar_t* gc,
            const scalar_t* gr, const scalar_t* u, bool slopes) {
    gather_frame(gl + plane, geo, frame(kWl));
    gather_frame(gc + plane, geo, frame(kWc));
    gather_frame(gr + plane, geo, frame(kWr));
    gather_frame(lam + plane, geo, frame(kLam));
    gather_frame(u + plane, geo, frame(kU));
    if (slopes) {
      normalize_frames<acc_t, true>(geo.steps, geo.lanes, frame(kWl), frame(kWc), frame(kWr), frame(kQl),
                                    frame(kQc), frame(kQr));
    } else {
      normalize_frames<acc_t, false>(geo.steps, geo.lanes, frame(kWl), frame(kWc), frame(kWr), nullptr, nullptr,
                                     nullptr);
    }
  }
};

// Channels [c0, c0 + n) of the (HW, C) channels-last plane `map` as (HW, m) rows in the compute type, m the
// group's width rounded up to whole Packs, the padding channels zero (they stay zero through the recurrence
// and add nothing to the gates' sums).
template <typename scalar_t, typename acc_t>
void gather_group(const scalar_t* map, int64_t HW, int64_t C, int64_t c0, int64_t n, int64_t m, acc_t* out) {
  for (int64_t p = 0; p < HW; ++p) {
    const scalar_t* src = map + p * C + c0;
    acc_t* dst = out + p * m;
    for (int64_t j = 0; j < n; ++j) dst[j] = acc_t(src[j]);
    for (int64_t j = n; j < m; ++j) dst[j] = acc_t(0);
  }
}

// The inverse of gather_group: channels [c0, c0 + n) of `map` = in (HW, m), converted to the map's type.
template <typename acc_t, typename scalar_t>
void scatter_group(const acc_t* in, int64_t HW, int64_t C, int64_t c0, int64_t n, int64_t m, scalar_t* map) {
  for (int64_t p = 0; p < HW; ++p) {
    const acc_t* src = in + p * m;
    scalar_t* dst = map + p * C + c0;
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

// The state rows of one step: L lanes of m channels with a zero lane on each side (lane(-1), lane(L)).
template <typename acc_t>
struct StateRow {
  acc_t* base;  // lane 0
  int64_t m;
  acc_t* lane(int64_t l) const { return base + l * m; }
};

// h = lam x + (wl hp[l-1] + wc hp[l] + wr hp[l+1], unless the step restarts), and y += u h (kY), at one
// pixel of m channels.
template <typename acc_t, bool kRestart, bool kY>
__attribute__((always_inline)) inline void step_pixel(int64_t m, acc_t lam, acc_t wl, acc_t wc, acc_t wr, acc_t u,
                                                      const acc_t* x, const acc_t* hl, const acc_t* hc,
                                                      const acc_t* hr, acc_t* h, acc_t* y) {
  using V = Pack<acc_t>;
  for (int64_t k = 0; k < m; k += kPackLanes<acc_t>) {
    V hv = lam * load_pack(x + k);
    if constexpr (!kRestart) hv += wl * load_pack(hl + k) + wc * load_pack(hc + k) + wr * load_pack(hr + k);
    store_pack(h + k, hv);
    if constexpr (kY) store_pack(y + k, load_pack(y + k) + u * hv);
  }
}

template <typename acc_t, bool kRestart, bool kY, typename RowOf>
__attribute__((always_inline)) inline void sweep_step(const ScanGeometry& geo, const DirectionFrames<acc_t>& f,
                                                      int64_t m, int64_t s, const acc_t* x, RowOf row_of, acc_t* y) {
  const int64_t L = geo.lanes;
  const acc_t *wl = f[f.kWl], *wc = f[f.kWc], *wr = f[f.kWr], *lam = f[f.kLam], *u = f[f.kU];
  const StateRow<acc_t> hp = row_of(s), h = row_of(s + 1);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t i = s * L + l, pix = geo.offset(s, l);
    step_pixel<acc_t, kRestart, kY>(m, lam[i], wl[i], wc[i], wr[i], u[i], x + pix * m, hp.lane(l - 1),
                                    hp.lane(l), hp.lane(l + 1), h.lane(l), kY ? y + pix * m : nullptr);
  }
}

// One direction's sweep over the group's (HW, m) map x: step s reads the states row_of(s) and writes
// row_of(s + 1); u h is added into y (if not null).
template <typename acc_t, typename RowOf>
GSPN_CPU_CLONES void sweep_states(const ScanGeometry& geo, const DirectionFrames<acc_t>& f, int64_t m, int64_t chunk,
                                  const acc_t* x, RowOf row_of, acc_t* y) {
  for (int64_t s = 0; s < geo.steps; ++s) {
    const bool restart = restarts_at(s, chunk);
    if (y != nullptr) {
      if (restart) sweep_step<acc_t, true, true>(geo, f, m, s, x, row_of, y);
      else sweep_step<acc_t, false, true>(geo, f, m, s, x, row_of, y);
    } else {
      if (restart) sweep_step<acc_t, true, false>(geo, f, m, s, x, row_of, y);
      else sweep_step<acc_t, false, false>(geo, f, m, s, x, row_of, y);
    }
  }
}

// Per-thread rows of states: `rows` rows of (max_lanes + 2) x m, zeroed, viewed as StateRows.
template <typename acc_t>
struct StateRows {
  std::vector<acc_t> data;
  std::vector<StateRow<acc_t>> rows;
  StateRows(int64_t count, int64_t max_lanes, int64_t m) : data(count * (max_lanes + 2) * m, acc_t(0)) {
    for (int64_t r = 0; r < count; ++r) rows.push_back({data.data() + (r * (max_lanes + 2) + 1) * m, m});
  }
  void zero() { std::fill(data.begin(), data.end(), acc_t(0)); }
};

template <typename scalar_t>
struct Operands {
  const scalar_t *x, *lam, *gl, *gc, *gr, *u;
};

// The group's width in the compute type: n channels rounded up to whole Packs.
template <typename acc_t>
int64_t padded_width(int64_t n) {
  const int64_t P = kPackLanes<acc_t>;
  return (n + P - 1) / P * P;
}

template <typename scalar_t>
void forward_kernel(const Operands<scalar_t>& in, scalar_t* y, const ScanShape& sh, int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W, G = sh.g_gl, n = sh.C / G, m = padded_width<acc_t>(n);
  const int64_t max_lanes = std::max(sh.H, sh.W);
  at::parallel_for(0, sh.B * G, plane_grain(kDirections * HW * n), [&](int64_t begin, int64_t end) {
    DirectionFrames<acc_t> frames(HW);
    std::vector<acc_t> x(HW * m), y_acc(HW * m);
    StateRows<acc_t> rows(2, max_lanes, m);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      gather_group(in.x + b * HW * sh.C, HW, sh.C, g * n, n, m, x.data());
      std::fill(y_acc.begin(), y_acc.end(), acc_t(0));
      for (int d = 0; d < kDirections; ++d) {
        const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
        frames.load(geo, ((b * kDirections + d) * G + g) * HW, in.lam, in.gl, in.gc, in.gr, in.u, false);
        rows.zero();  // the pads (a direction with fewer lanes reads lane L, which a longer one wrote)
        // Two rows, alternating: step s reads row s % 2 and writes the other.
        sweep_states(geo, frames, m, chunk, x.data(), [&](int64_t r) { return rows.rows[r % 2]; }, y_acc.data());
      }
      scatter_group(y_acc.data(), HW, sh.C, g * n, n, m, y + b * HW * sh.C);
    }
  });
}

// At one pixel of m channels: the adjoint g of its state, g = u gy + (with kNext, the next step's weights
// times its adjoints), dx += lam g, and sums = (dlam, du, dwl, dwc, dwr) = sum over channels of (x g, gy h,
// g hp[l-1], g hp[l], g hp[l+1]), the last three only with kGates (no gates act on a restarting step).
template <typename acc_t, bool kNext, bool kGates>
__attribute__((always_inline)) inline void adjoint_pixel(int64_t m, acc_t u, acc_t lam, acc_t cw, acc_t lw, acc_t rw,
                                                         const acc_t* gy, const acc_t* x, const acc_t* h,
                                                         const acc_t* hp_left, const acc_t* hp_centre,
                                                         const acc_t* hp_right, const acc_t* gn_left,
                                                         const acc_t* gn_centre, const acc_t* gn_right, acc_t* g,
                                                         acc_t* dx, acc_t sums[5]) {
  using V = Pack<acc_t>;
  V dlam{}, du{}, dwl{}, dwc{}, dwr{};
  for (int64_t k = 0; k < m; k += kPackLanes<acc_t>) {
    const V gyv = load_pack(gy + k);
    V gv = u * gyv;
    if constexpr (kNext) gv += cw * load_pack(gn_centre + k) + lw * load_pack(gn_right + k) + rw * load_pack(gn_left + k);
    store_pack(g + k, gv);
    store_pack(dx + k, load_pack(dx + k) + lam * gv);
    dlam += load_pack(x + k) * gv;
    du += gyv * load_pack(h + k);
    if constexpr (kGates) {
      dwl += gv * load_pack(hp_left + k);
      dwc += gv * load_pack(hp_centre + k);
      dwr += gv * load_pack(hp_right + k);
    }
  }
  sums[0] = lane_sum<acc_t>(dlam);
  sums[1] = lane_sum<acc_t>(du);
  sums[2] = kGates ? lane_sum<acc_t>(dwl) : acc_t(0);
  sums[3] = kGates ? lane_sum<acc_t>(dwc) : acc_t(0);
  sums[4] = kGates ? lane_sum<acc_t>(dwr) : acc_t(0);
}

template <typename scalar_t>
struct GateGradPtrs {
  scalar_t *lam, *gl, *gc, *gr, *u;
};

// Step s of one direction's backward sweep (see adjoint_sweep), all lanes.
template <typename acc_t, typename scalar_t, bool kNext, bool kGates>
__attribute__((always_inline)) inline void adjoint_step(const ScanGeometry& geo, const DirectionFrames<acc_t>& f,
                                                        int64_t m, int64_t s, const acc_t* x, const acc_t* gy,
                                                        const StateRows<acc_t>& states,
                                                        const StateRows<acc_t>& adjoints, acc_t* dx,
                                                        const GateGradPtrs<scalar_t>& grads, int64_t plane) {
  const int64_t L = geo.lanes;
  const acc_t *wl = f[f.kWl], *wc = f[f.kWc], *wr = f[f.kWr], *lam = f[f.kLam], *u = f[f.kU];
  const StateRow<acc_t> gn = adjoints.rows[(s + 1) % 2], gc = adjoints.rows[s % 2];
  const StateRow<acc_t> h = states.rows[s + 1], hp = states.rows[s];
  const int64_t next = (s + 1) * L;  // the next step's frame row (read only with kNext)
  for (int64_t l = 0; l < L; ++l) {
    const int64_t i = s * L + l, pix = geo.offset(s, l), o = plane + pix;
    // Lane l of this step feeds lane l of the next through wc, lane l + 1 through wl, lane l - 1 through wr.
    const acc_t cw = kNext ? wc[next + l] : acc_t(0);
    const acc_t lw = kNext && l + 1 < L ? wl[next + l + 1] : acc_t(0);
    const acc_t rw = kNext && l > 0 ? wr[next + l - 1] : acc_t(0);
    acc_t sums[5];
    adjoint_pixel<acc_t, kNext, kGates>(m, u[i], lam[i], cw, lw, rw, gy + pix * m, x + pix * m, h.lane(l),
                                        hp.lane(l - 1), hp.lane(l), hp.lane(l + 1), gn.lane(l - 1), gn.lane(l),
                                        gn.lane(l + 1), gc.lane(l), dx + pix * m, sums);
    grads.lam[o] = static_cast<scalar_t>(sums[0]);
    grads.u[o] = static_cast<scalar_t>(sums[1]);
    acc_t dgl = 0, dgc = 0, dgr = 0;
    if constexpr (kGates) {
      const acc_t q[3] = {f[f.kQl][i], f[f.kQc][i], f[f.kQr][i]};
      normalized_weights_backward<acc_t>(q, wl[i], wc[i], wr[i], sums[2], sums[3], sums[4], dgl, dgc, dgr);
    }
    grads.gl[o] = static_cast<scalar_t>(dgl);
    grads.gc[o] = static_cast<scalar_t>(dgc);
    grads.gr[o] = static_cast<scalar_t>(dgr);
  }
}

// One direction's backward sweep over the group's (HW, m) maps x and gy, given its recomputed states (row
// s + 1 holds step s): dx accumulates, the gate gradients of plane `plane` are written.
template <typename acc_t, typename scalar_t>
GSPN_CPU_CLONES void adjoint_sweep(const ScanGeometry& geo, const DirectionFrames<acc_t>& f, int64_t m, int64_t chunk,
                                   const acc_t* x, const acc_t* gy, const StateRows<acc_t>& states,
                                   const StateRows<acc_t>& adjoints, acc_t* dx, const GateGradPtrs<scalar_t>& grads,
                                   int64_t plane) {
  const int64_t S = geo.steps;
  for (int64_t s = S - 1; s >= 0; --s) {
    const bool next_applies = s + 1 < S && !restarts_at(s + 1, chunk), restart = restarts_at(s, chunk);
    if (next_applies) {
      if (restart) adjoint_step<acc_t, scalar_t, true, false>(geo, f, m, s, x, gy, states, adjoints, dx, grads, plane);
      else adjoint_step<acc_t, scalar_t, true, true>(geo, f, m, s, x, gy, states, adjoints, dx, grads, plane);
    } else {
      if (restart) adjoint_step<acc_t, scalar_t, false, false>(geo, f, m, s, x, gy, states, adjoints, dx, grads, plane);
      else adjoint_step<acc_t, scalar_t, false, true>(geo, f, m, s, x, gy, states, adjoints, dx, grads, plane);
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
  const int64_t HW = sh.H * sh.W, G = sh.g_gl, n = sh.C / G, m = padded_width<acc_t>(n);
  const int64_t max_lanes = std::max(sh.H, sh.W);
  at::parallel_for(0, sh.B * G, plane_grain(2 * kDirections * HW * n), [&](int64_t begin, int64_t end) {
    DirectionFrames<acc_t> f(HW);
    std::vector<acc_t> x(HW * m), gy(HW * m), dx(HW * m);
    StateRows<acc_t> states(max_lanes + 1, max_lanes, m), adjoints(2, max_lanes, m);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      gather_group(in.x + b * HW * sh.C, HW, sh.C, g * n, n, m, x.data());
      gather_group(gy_in + b * HW * sh.C, HW, sh.C, g * n, n, m, gy.data());
      std::fill(dx.begin(), dx.end(), acc_t(0));
      for (int d = 0; d < kDirections; ++d) {
        const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
        const int64_t plane = ((b * kDirections + d) * G + g) * HW;
        f.load(geo, plane, in.lam, in.gl, in.gc, in.gr, in.u, true);
        states.zero();
        adjoints.zero();
        sweep_states(geo, f, m, chunk, x.data(), [&](int64_t r) { return states.rows[r]; },
                     static_cast<acc_t*>(nullptr));
        adjoint_sweep(geo, f, m, chunk, x.data(), gy.data(), states, adjoints, dx.data(), grads, plane);
      }
      scatter_group(dx.data(), HW, sh.C, g * n, n, m, d_x + b * HW * sh.C);
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
