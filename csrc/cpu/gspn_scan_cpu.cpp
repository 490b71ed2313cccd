// Fused four-direction GSPN propagation on the CPU: the schemas of gspn::gspn_scan_fwd /
// gspn::gspn_scan_bwd and their CPU kernels.
//
// Contract: dit_gspn/ops/reference.py::gspn_scan_reference (raw gate logits in, normalisation
// inside, the four directions read from the original layout, u gating and the direction sum
// fused). Computes in float32 for half types, in float64 for float64 (gradcheck).
//
// Gate normalisation (the Stability-Context Condition), stable for any logits: with m the largest
// logit among a position's valid neighbours and c = min(m, 0),
//     s_k = mask_k / (exp(c) + exp(c - g_k)) = mask_k sigmoid(g_k) / exp(c),   w_k = s_k / sum_m s_m,
// which is sigmoid / sum for ordinary logits and the softmax limit where every sigmoid underflows
// (the largest s_k is at least 1/2, so the sum is never 0). It runs inside the kernels, once per
// (batch, direction, gate group) and thread, on a vectorisable exp (exp_lanes), so the op makes no
// ATen pass over the logits and a channel group's channels share one normalisation.
//
// Each direction runs on "frames": its operands in scan order (row s is step s, lanes contiguous),
// in the compute type, so that the per-step loops over lanes are branch-free and contiguous and the
// compiler vectorises them. x (and the backward's grad_y) is laid out once per plane, row-major
// and transposed, and read by the four directions through strided row views (no copy at all for a
// float32 top-down / bottom-up scan); y and dx accumulate the same way.
//
// Memory: the forward saves nothing but its inputs (autograd keeps them). The backward
// recomputes each direction's hidden states into one (H, W) scratch plane per thread instead
// of the forward storing 4 x C hidden maps: the recompute costs one more forward sweep per
// direction, which on a memory-bound scan is cheaper than writing and re-reading 4 x C maps,
// and it keeps a trained model's saved activations at the size of the inputs.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../cpu_parallel.h"
#include "../gspn_scan_checks.h"
#include "../gspn_scan_common.h"

namespace gspn {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The gate normalisation's compares and clamps become selects only where no code depends on the
// floating-point exception flags (GCC keeps branches otherwise, and the lane loop does not vectorise).
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

// exp(v), branch-free so that loops calling it vectorise (std::exp's do not): Cody-Waite range
// reduction and Cephes' degree-6 polynomial, within 2 ulp of expf. Arguments are clamped to
// [-87, 88], so a result that would underflow is ~1e-38 and one that would overflow ~1.7e38.
__attribute__((always_inline)) inline float exp_lanes(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v / ln 2)
  const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline double exp_lanes(double v) { return std::exp(v); }
struct LaneExp {
  template <typename T>
  T operator()(T v) const { return exp_lanes(v); }
};

// The normalised weights of one position from its logits (see the top of the file); with kGrad
// also wq_k = w_k (1 - sigmoid(g_k)) = w_k / (1 + exp(g_k)), the factor of the logit gradients.
template <typename acc_t, bool kLeft, bool kRight, bool kGrad>
__attribute__((always_inline)) inline void normalize_position(acc_t g_l, acc_t g_c, acc_t g_r, acc_t& w_l, acc_t& w_c, acc_t& w_r, acc_t& q_l,
                               acc_t& q_c, acc_t& q_r) {
  normalized_weights<acc_t>(g_l, g_c, g_r, kLeft, kRight, w_l, w_c, w_r, LaneExp());
  if (kGrad) {
    q_l = kLeft ? w_l / (acc_t(1) + exp_lanes(g_l)) : acc_t(0);
    q_c = w_c / (acc_t(1) + exp_lanes(g_c));
    q_r = kRight ? w_r / (acc_t(1) + exp_lanes(g_r)) : acc_t(0);
  }
}

// Lane l of logit rows -> weight rows (in place) and, with kGrad, wq rows.
template <typename acc_t, bool kLeft, bool kRight, bool kGrad>
__attribute__((always_inline)) inline void normalize_lane(int64_t l, acc_t* __restrict__ gl, acc_t* __restrict__ gc, acc_t* __restrict__ gr,
                           acc_t* __restrict__ ql, acc_t* __restrict__ qc, acc_t* __restrict__ qr) {
  acc_t a, b, c;
  normalize_position<acc_t, kLeft, kRight, kGrad>(gl[l], gc[l], gr[l], gl[l], gc[l], gr[l], a, b, c);
  if constexpr (kGrad) {
    ql[l] = a;
    qc[l] = b;
    qr[l] = c;
  }
}

// Logit frames of S rows x L lanes -> weight frames, in place (lane 0 has no left neighbour, lane
// L-1 no right one); with kGrad also the wq frames (ql, qc, qr; unused otherwise).
template <typename acc_t, bool kGrad>
void normalize_frames(int64_t S, int64_t L, acc_t* gl, acc_t* gc, acc_t* gr, acc_t* ql, acc_t* qc, acc_t* qr) {
  for (int64_t s = 0; s < S; ++s) {
    const int64_t r = kGrad ? s * L : 0;
    acc_t *l_ = gl + s * L, *c_ = gc + s * L, *r_ = gr + s * L;
    acc_t *ql_ = kGrad ? ql + r : nullptr, *qc_ = kGrad ? qc + r : nullptr, *qr_ = kGrad ? qr + r : nullptr;
    if (L == 1) {
      normalize_lane<acc_t, false, false, kGrad>(0, l_, c_, r_, ql_, qc_, qr_);
      continue;
    }
    normalize_lane<acc_t, false, true, kGrad>(0, l_, c_, r_, ql_, qc_, qr_);
    for (int64_t l = 1; l < L - 1; ++l) normalize_lane<acc_t, true, true, kGrad>(l, l_, c_, r_, ql_, qc_, qr_);
    normalize_lane<acc_t, true, false, kGrad>(L - 1, l_, c_, r_, ql_, qc_, qr_);
  }
}

#pragma GCC pop_options

// frame[s * L + l] = plane[geo.offset(s, l)].
template <typename src_t, typename acc_t>
void gather_frame(const src_t* plane, const ScanGeometry& geo, acc_t* frame) {
  for (int64_t s = 0; s < geo.steps; ++s) {
    acc_t* out = frame + s * geo.lanes;
    if (geo.lane_stride == 1) {
      const src_t* row = plane + geo.origin + s * geo.step_stride;
      for (int64_t l = 0; l < geo.lanes; ++l) out[l] = acc_t(row[l]);
    } else {
      for (int64_t l = 0; l < geo.lanes; ++l) out[l] = acc_t(plane[geo.offset(s, l)]);
    }
  }
}

// plane[geo.offset(s, l)] (+)= frame[s * L + l], converted to the plane's type.
template <bool kAdd, typename acc_t, typename dst_t>
void scatter_frame(const acc_t* frame, const ScanGeometry& geo, dst_t* plane) {
  for (int64_t s = 0; s < geo.steps; ++s) {
    const acc_t* in = frame + s * geo.lanes;
    if (geo.lane_stride == 1) {
      dst_t* row = plane + geo.origin + s * geo.step_stride;
      for (int64_t l = 0; l < geo.lanes; ++l)
        row[l] = kAdd ? static_cast<dst_t>(acc_t(row[l]) + in[l]) : static_cast<dst_t>(in[l]);
    } else {
      for (int64_t l = 0; l < geo.lanes; ++l) {
        dst_t& out = plane[geo.offset(s, l)];
        out = kAdd ? static_cast<dst_t>(acc_t(out) + in[l]) : static_cast<dst_t>(in[l]);
      }
    }
  }
}

// Rows of a plane in one direction's scan order: row s starts at base + s * stride.
template <typename T>
struct RowView {
  T* base;
  int64_t stride;
  T* row(int64_t s) const { return base + s * stride; }
};

// One (H, W) plane in the compute type, row-major and transposed, viewed in each direction's
// scan order (directions 0 / 1 read the row-major layout forwards / backwards, 2 / 3 the
// transposed one). A float32 plane is read in place, not copied.
template <typename acc_t>
struct PlaneLayouts {
  int64_t H = 0, W = 0;
  std::vector<acc_t> row_major, transposed;
  const acc_t* rows = nullptr;

  PlaneLayouts(int64_t H_, int64_t W_) : H(H_), W(W_), row_major(H_ * W_), transposed(H_ * W_) {}

  template <typename src_t>
  void load(const src_t* plane) {
    if constexpr (std::is_same_v<src_t, acc_t>) {
      rows = plane;
    } else {
      for (int64_t i = 0; i < H * W; ++i) row_major[i] = acc_t(plane[i]);
      rows = row_major.data();
    }
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) transposed[j * H + i] = rows[i * W + j];
  }

  RowView<const acc_t> view(int d) const { return layout_view<const acc_t>(d, rows, transposed.data(), H, W); }

  template <typename T>
  static RowView<T> layout_view(int d, T* rows, T* cols, int64_t H, int64_t W) {
    switch (d) {
      case 0: return {rows, W};
      case 1: return {rows + (H - 1) * W, -W};
      case 2: return {cols, H};
      default: return {cols + (W - 1) * H, -H};
    }
  }
};

// An (H, W) float accumulator written through the same views: row-major for directions 0 / 1,
// transposed for 2 / 3; sum() adds the two into the output plane.
template <typename acc_t>
struct PlaneAccumulator {
  int64_t H, W;
  std::vector<acc_t> row_major, transposed;
  PlaneAccumulator(int64_t H_, int64_t W_) : H(H_), W(W_), row_major(H_ * W_), transposed(H_ * W_) {}
  void zero() {
    std::fill(row_major.begin(), row_major.end(), acc_t(0));
    std::fill(transposed.begin(), transposed.end(), acc_t(0));
  }
  RowView<acc_t> view(int d) {
    return PlaneLayouts<acc_t>::template layout_view<acc_t>(d, row_major.data(), transposed.data(), H, W);
  }
  template <typename dst_t>
  void write(dst_t* out) const {
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j)
        out[i * W + j] = static_cast<dst_t>(row_major[i * W + j] + transposed[j * H + i]);
  }
};

// One step of the recurrence over L lanes: h[l] = lam x + wl hp[l-1] + wc hp[l] + wr hp[l+1], hp the
// previous step's states with a zero on each side (hp[-1] = hp[L] = 0), or h = lam x on a restart.
template <typename acc_t>
inline void step_states(int64_t L, bool restart, const acc_t* __restrict__ lam, const acc_t* __restrict__ x,
                        const acc_t* __restrict__ wl, const acc_t* __restrict__ wc, const acc_t* __restrict__ wr,
                        const acc_t* __restrict__ hp, acc_t* __restrict__ h) {
  if (restart) {
    for (int64_t l = 0; l < L; ++l) h[l] = lam[l] * x[l];
    return;
  }
  for (int64_t l = 0; l < L; ++l) h[l] = lam[l] * x[l] + wl[l] * hp[l - 1] + wc[l] * hp[l] + wr[l] * hp[l + 1];
}

// The backward's per-step outputs that need only the adjoint g of the step:
// dx += lam g (summed over directions), dlam = x g, du = gy h.
template <typename acc_t>
inline void adjoint_step_outputs(int64_t L, const acc_t* __restrict__ g, const acc_t* __restrict__ lam,
                                 const acc_t* __restrict__ x, const acc_t* __restrict__ gy, const acc_t* __restrict__ h,
                                 acc_t* __restrict__ dx, acc_t* __restrict__ dlam, acc_t* __restrict__ du) {
  for (int64_t l = 0; l < L; ++l) {
    dx[l] += lam[l] * g[l];
    dlam[l] = x[l] * g[l];
    du[l] = gy[l] * h[l];
  }
}

// The logit gradients of one step, dg_k = wq_k (dw_k - sum_m w_m dw_m) with dw_k = g h_prev[neighbour k],
// and g times each weight (next_*), which the step before receives through A_s^T.
template <typename acc_t>
inline void gate_step_gradients(int64_t L, const acc_t* __restrict__ g, const acc_t* __restrict__ hp,
                                const acc_t* __restrict__ wl, const acc_t* __restrict__ wc,
                                const acc_t* __restrict__ wr, const acc_t* __restrict__ ql,
                                const acc_t* __restrict__ qc, const acc_t* __restrict__ qr, acc_t* __restrict__ dgl,
                                acc_t* __restrict__ dgc, acc_t* __restrict__ dgr, acc_t* __restrict__ next_l,
                                acc_t* __restrict__ next_c, acc_t* __restrict__ next_r) {
  for (int64_t l = 0; l < L; ++l) {
    const acc_t dwl = g[l] * hp[l - 1], dwc = g[l] * hp[l], dwr = g[l] * hp[l + 1];
    const acc_t dot = wl[l] * dwl + wc[l] * dwc + wr[l] * dwr;
    dgl[l] = ql[l] * (dwl - dot);
    dgc[l] = qc[l] * (dwc - dot);
    dgr[l] = qr[l] * (dwr - dot);
    next_l[l] = wl[l] * g[l];
    next_c[l] = wc[l] * g[l];
    next_r[l] = wr[l] * g[l];
  }
}

// Per-thread frame buffers, each of one plane's size.
template <typename acc_t>
struct Frames {
  int64_t size;
  std::vector<acc_t> storage;
  Frames(int64_t HW, int count) : size(HW), storage(count * HW) {}
  acc_t* frame(int k) { return storage.data() + k * size; }
};

// The normalised weights (and with kGrad the wq factors) of each direction, kept per thread while
// consecutive channels share their gate groups: recomputed only when a direction's gate planes change.
template <typename acc_t, bool kGrad>
struct GateCache {
  static constexpr int kPerDirection = kGrad ? 6 : 3;
  Frames<acc_t> frames;
  std::array<std::array<int64_t, 3>, kDirections> planes;
  explicit GateCache(int64_t HW) : frames(HW, kDirections * kPerDirection) {
    for (auto& p : planes) p = {-1, -1, -1};
  }
  // Frames (wl, wc, wr[, ql, qc, qr]) of direction d for the gate planes of (b, c).
  template <typename scalar_t>
  acc_t* get(int d, const std::array<int64_t, 3>& plane, const ScanGeometry& geo, int64_t HW, const scalar_t* gl,
             const scalar_t* gc, const scalar_t* gr) {
    acc_t* f = frames.frame(d * kPerDirection);
    if (planes[d] != plane) {
      gather_frame(gl + plane[0] * HW, geo, f);
      gather_frame(gc + plane[1] * HW, geo, f + HW);
      gather_frame(gr + plane[2] * HW, geo, f + 2 * HW);
      normalize_frames<acc_t, kGrad>(geo.steps, geo.lanes, f, f + HW, f + 2 * HW, kGrad ? f + 3 * HW : nullptr,
                                     kGrad ? f + 4 * HW : nullptr, kGrad ? f + 5 * HW : nullptr);
      planes[d] = plane;
    }
    return f;
  }
};

std::array<int64_t, 3> gate_planes(const ScanShape& sh, int64_t b, int d, int64_t c) {
  return {gate_plane(b, d, c, sh.C, sh.g_gl), gate_plane(b, d, c, sh.C, sh.g_gc), gate_plane(b, d, c, sh.C, sh.g_gr)};
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const scalar_t* lam, const scalar_t* gl, const scalar_t* gc,
                    const scalar_t* gr, const scalar_t* u, scalar_t* y, const ScanShape& sh, int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W;
  const int64_t max_lanes = std::max(sh.H, sh.W);
  at::parallel_for(0, sh.B * sh.C, plane_grain(4 * HW), [&](int64_t begin, int64_t end) {
    enum { LAM, U, kFrames };
    Frames<acc_t> f(HW, kFrames);
    GateCache<acc_t, false> gates(HW);
    PlaneLayouts<acc_t> x_plane(sh.H, sh.W);
    PlaneAccumulator<acc_t> y_plane(sh.H, sh.W);
    std::vector<acc_t> padded(2 * (max_lanes + 2), acc_t(0));  // two zero-padded state rows
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / sh.C, c = p % sh.C;
      x_plane.load(x + p * HW);
      y_plane.zero();
      for (int d = 0; d < kDirections; ++d) {
        const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
        const int64_t L = geo.lanes;
        const acc_t* w = gates.get(d, gate_planes(sh, b, d, c), geo, HW, gl, gc, gr);
        gather_frame(lam + gate_plane(b, d, c, sh.C, sh.g_lam) * HW, geo, f.frame(LAM));
        gather_frame(u + gate_plane(b, d, c, sh.C, sh.g_u) * HW, geo, f.frame(U));
        const RowView<const acc_t> xs = x_plane.view(d);
        const RowView<acc_t> ys = y_plane.view(d);
        acc_t* h_prev = padded.data() + 1;
        acc_t* h = h_prev + max_lanes + 2;
        std::fill(padded.begin(), padded.end(), acc_t(0));  // a shorter L reads its pad at h[L]
        for (int64_t s = 0; s < geo.steps; ++s) {
          const int64_t r = s * L;
          step_states(L, restarts_at(s, chunk), f.frame(LAM) + r, xs.row(s), w + r, w + HW + r, w + 2 * HW + r,
                      h_prev, h);
          const acc_t* __restrict__ u_r = f.frame(U) + r;
          acc_t* __restrict__ y_r = ys.row(s);
          for (int64_t l = 0; l < L; ++l) y_r[l] += u_r[l] * h[l];
          std::swap(h_prev, h);
        }
      }
      y_plane.write(y + p * HW);
    }
  });
}

// Gradients of one (batch, channel-block) task. Every channel group of every gate tensor that
// these channels touch belongs to this task alone (the block spans lcm_k(C / G_k) channels),
// so the grouped sums accumulate without atomics and in a fixed order (deterministic). A gate
// tensor with one group per channel (G = C) is written once per plane, in its own dtype; grouped
// ones accumulate in the compute type (`grouped` below).
//
// Per direction: recompute the hidden states h (see the memory note at the top), then sweep the
// steps backwards with the adjoint g_s = u_s gy_s + A_{s+1}^T g_{s+1} (A_{s+1} absent where step
// s+1 restarts). With w_k the normalised weights, the logit gradients are
//     dg_k = w_k (1 - sigmoid(g_k)) (dw_k - sum_m w_m dw_m),   dw_k = g h_{s-1}[neighbour k].
template <typename scalar_t>
void backward_kernel(const scalar_t* gy, const scalar_t* x, const scalar_t* lam, const scalar_t* gl,
                     const scalar_t* gc, const scalar_t* gr, const scalar_t* u, scalar_t* d_x,
                     const std::array<void*, 5>& d_gates, const std::array<bool, 5>& grouped, const ScanShape& sh,
                     int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W;
  const int64_t max_lanes = std::max(sh.H, sh.W);
  const int64_t padded_lanes = max_lanes + 2;
  const std::array<int64_t, 5> groups = {sh.g_lam, sh.g_gl, sh.g_gc, sh.g_gr, sh.g_u};
  int64_t block = 1;
  for (int64_t g : groups) block = std::lcm(block, sh.C / g);
  const int64_t blocks_per_batch = sh.C / block;
  at::parallel_for(0, sh.B * blocks_per_batch, plane_grain(4 * block * HW), [&](int64_t begin, int64_t end) {
    enum { LAM, U, DLAM, DGL, DGC, DGR, DU, kFrames };
    Frames<acc_t> f(HW, kFrames);
    GateCache<acc_t, true> gates(HW);
    PlaneLayouts<acc_t> x_plane(sh.H, sh.W), gy_plane(sh.H, sh.W);
    PlaneAccumulator<acc_t> dx_plane(sh.H, sh.W);
    // All hidden states of one direction, each row zero-padded on both sides.
    std::vector<acc_t> h_rows((max_lanes + 1) * padded_lanes, acc_t(0));
    // g of the step after the current one, times each of its three weights, zero-padded.
    std::vector<acc_t> next_rows(3 * padded_lanes, acc_t(0));
    std::vector<acc_t> g_row(max_lanes);
    acc_t* __restrict__ g = g_row.data();  // a plain pointer: the lane loops reload a vector's on every store
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks_per_batch;
      for (int64_t c = (task % blocks_per_batch) * block; c < (task % blocks_per_batch + 1) * block; ++c) {
        const int64_t p = b * sh.C + c;
        x_plane.load(x + p * HW);
        gy_plane.load(gy + p * HW);
        dx_plane.zero();
        for (int d = 0; d < kDirections; ++d) {
          const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
          const int64_t L = geo.lanes, S = geo.steps;
          const std::array<int64_t, 3> gate_p = gate_planes(sh, b, d, c);
          const int64_t o_lam = gate_plane(b, d, c, sh.C, sh.g_lam) * HW;
          const int64_t o_u = gate_plane(b, d, c, sh.C, sh.g_u) * HW;
          const acc_t* w = gates.get(d, gate_p, geo, HW, gl, gc, gr);
          const acc_t* wq = w + 3 * HW;
          gather_frame(lam + o_lam, geo, f.frame(LAM));
          gather_frame(u + o_u, geo, f.frame(U));
          const RowView<const acc_t> xs = x_plane.view(d), gys = gy_plane.view(d);
          const RowView<acc_t> dxs = dx_plane.view(d);
          // h_row(s) for s in [-1, S): row -1 is all zeros (never read across a restart).
          auto h_row = [&](int64_t s) { return h_rows.data() + (s + 1) * padded_lanes + 1; };
          for (int64_t s = 0; s < S; ++s) {
            const int64_t r = s * L;
            acc_t* h = h_row(s);
            step_states(L, restarts_at(s, chunk), f.frame(LAM) + r, xs.row(s), w + r, w + HW + r, w + 2 * HW + r,
                        h_row(s - 1), h);
            h[L] = acc_t(0);
          }
          acc_t* next_l = next_rows.data() + 1;
          acc_t* next_c = next_l + padded_lanes;
          acc_t* next_r = next_c + padded_lanes;
          next_l[L] = next_c[L] = next_r[L] = acc_t(0);  // pads (an earlier direction may have had more lanes)
          for (int64_t s = S - 1; s >= 0; --s) {
            const int64_t r = s * L;
            const bool next_applies = s + 1 < S && !restarts_at(s + 1, chunk);
            const bool restart = restarts_at(s, chunk);
            const acc_t* __restrict__ u_r = f.frame(U) + r;
            const acc_t* __restrict__ gy_r = gys.row(s);
            const acc_t* __restrict__ x_r = xs.row(s);
            const acc_t* __restrict__ lam_r = f.frame(LAM) + r;
            const acc_t* __restrict__ h = h_row(s);
            if (next_applies) {
              for (int64_t l = 0; l < L; ++l) g[l] = u_r[l] * gy_r[l] + next_c[l] + next_l[l + 1] + next_r[l - 1];
            } else {
              for (int64_t l = 0; l < L; ++l) g[l] = u_r[l] * gy_r[l];
            }
            adjoint_step_outputs(L, g, lam_r, x_r, gy_r, h, dxs.row(s), f.frame(DLAM) + r, f.frame(DU) + r);
            acc_t* dgl_r = f.frame(DGL) + r;
            acc_t* dgc_r = f.frame(DGC) + r;
            acc_t* dgr_r = f.frame(DGR) + r;
            if (restart) {
              std::fill(dgl_r, dgl_r + L, acc_t(0));
              std::fill(dgc_r, dgc_r + L, acc_t(0));
              std::fill(dgr_r, dgr_r + L, acc_t(0));
              continue;  // the step before this one receives nothing through A_s
            }
            gate_step_gradients(L, g, h_row(s - 1), w + r, w + HW + r, w + 2 * HW + r, wq + r, wq + HW + r,
                                wq + 2 * HW + r, dgl_r, dgc_r, dgr_r, next_l, next_c, next_r);
          }
          const int frame_of[5] = {DLAM, DGL, DGC, DGR, DU};
          const int64_t plane_of[5] = {o_lam, gate_p[0] * HW, gate_p[1] * HW, gate_p[2] * HW, o_u};
          for (int k = 0; k < 5; ++k) {
            if (grouped[k]) {
              scatter_frame<true>(f.frame(frame_of[k]), geo, static_cast<acc_t*>(d_gates[k]) + plane_of[k]);
            } else {
              scatter_frame<false>(f.frame(frame_of[k]), geo, static_cast<scalar_t*>(d_gates[k]) + plane_of[k]);
            }
          }
        }
        dx_plane.write(d_x + p * HW);
      }
    }
  });
}

at::Tensor gspn_scan_fwd_cpu(const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
                             const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in,
                             int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in, chunk);
  auto x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(), gc = gc_in.contiguous(),
       gr = gr_in.contiguous(), u = u_in.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_fwd_cpu", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(),
                             gc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), sh, chunk);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gspn_scan_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
    const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in, int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in, chunk);
  check_grad_output(gy_in, x_in);
  auto gy = gy_in.contiguous(), x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(),
       gc = gc_in.contiguous(), gr = gr_in.contiguous(), u = u_in.contiguous();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // A gate tensor with a group per channel gets each element written once, in its own dtype; a
  // grouped one sums its channels' contributions in the compute type first.
  const std::array<const at::Tensor*, 5> gates = {&lam, &gl, &gc, &gr, &u};
  std::array<at::Tensor, 5> grads;
  std::array<void*, 5> grad_ptrs;
  std::array<bool, 5> grouped;
  for (int k = 0; k < 5; ++k) {
    const at::Tensor& t = *gates[k];
    grouped[k] = t.size(2) != sh.C;
    grads[k] = grouped[k] ? at::zeros(t.sizes(), t.options().dtype(acc_dtype)) : at::empty(t.sizes(), t.options());
    grad_ptrs[k] = grads[k].data_ptr();
  }
  auto d_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_bwd_cpu", [&] {
      backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(),
                                gl.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(),
                                u.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(), grad_ptrs, grouped, sh, chunk);
    });
  }
  const auto dt = x.scalar_type();
  for (auto& g : grads) g = g.to(dt);
  return {d_x, grads[0], grads[1], grads[2], grads[3], grads[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(gspn, CPU, m) {
  m.impl("gspn_scan_fwd", &gspn_scan_fwd_cpu);
  m.impl("gspn_scan_bwd", &gspn_scan_bwd_cpu);
}

}  // namespace gspn
