// Fused four-direction GSPN propagation on the CPU: the kernels of gspn::gspn_scan_fwd /
// gspn::gspn_scan_bwd (schemas in dit_gspn/ops/gspn_scan.py).
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
#include "gspn_scan_channels_last.h"
#include "lane_math.h"
#include "scan_frames.h"

namespace gspn {
namespace {

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

// The logit gradients of one step, dg_k += wq_k (dw_k - sum_m w_m dw_m) with dw_k = g h_prev[neighbour k],
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
    dgl[l] += ql[l] * (dwl - dot);
    dgc[l] += qc[l] * (dwc - dot);
    dgr[l] += qr[l] * (dwr - dot);
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

// Scatters a scan-order gradient frame into its (B, 4, G, H, W) gradient plane: added in the compute type
// where the tensor is grouped (summed over a group's channels), else written once in its own dtype.
template <typename scalar_t, typename acc_t>
void scatter_gradient(const acc_t* frame, const ScanGeometry& geo, void* grad, bool grouped, int64_t offset) {
  if (grouped) {
    scatter_frame<true>(frame, geo, static_cast<acc_t*>(grad) + offset);
  } else {
    scatter_frame<false>(frame, geo, static_cast<scalar_t*>(grad) + offset);
  }
}

// The logit gradients of each direction in scan order, summed per thread while consecutive channels share
// their gate planes and written to the gradient tensors (scatter) only when a direction's planes change and
// at the end of each task: a group's channels then cost one scatter per direction, not one each. `grads`
// and `grouped` as in backward_kernel.
template <typename scalar_t, typename acc_t>
struct GateGradAccumulator {
  Frames<acc_t> frames;
  std::array<std::array<int64_t, 3>, kDirections> planes;
  const std::array<void*, 3>& grads;
  const std::array<bool, 3>& grouped;
  int64_t H, W;
  GateGradAccumulator(int64_t H_, int64_t W_, const std::array<void*, 3>& g, const std::array<bool, 3>& grp)
      : frames(H_ * W_, kDirections * 3), grads(g), grouped(grp), H(H_), W(W_) {
    for (auto& p : planes) p = {-1, -1, -1};
  }
  // Frames (dgl, dgc, dgr) of direction d to add the gradients of the gate planes `plane` into.
  acc_t* get(int d, const std::array<int64_t, 3>& plane) {
    if (planes[d] != plane) {
      flush(d);
      planes[d] = plane;
    }
    return frames.frame(d * 3);
  }
  void flush(int d) {
    if (planes[d][0] < 0) return;
    const ScanGeometry geo = scan_geometry(d, H, W);
    const int64_t HW = H * W;
    for (int k = 0; k < 3; ++k) {
      acc_t* f = frames.frame(d * 3 + k);
      scatter_gradient<scalar_t>(f, geo, grads[k], grouped[k], planes[d][k] * HW);
      std::fill(f, f + HW, acc_t(0));
    }
    planes[d] = {-1, -1, -1};
  }
  void flush_all() {
    for (int d = 0; d < kDirections; ++d) flush(d);
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

// The channels of one backward task: every channel group of every grouped gate tensor that a task's
// channels touch belongs to that task alone (a block spans lcm_k(C / G_k) channels), so grouped sums
// accumulate without atomics and in a fixed order (deterministic).
int64_t channel_block(const ScanShape& sh) {
  int64_t block = 1;
  for (int64_t g : {sh.g_lam, sh.g_gl, sh.g_gc, sh.g_gr, sh.g_u}) block = std::lcm(block, sh.C / g);
  return block;
}

// Gradients of one (batch, channel-block) task (channel_block). `d_gates` / `grouped` are lam, gl, gc,
// gr, u's gradients and whether each is grouped (GateGrads).
//
// Per direction: recompute the hidden states h (see the memory note at the top), then sweep the
// steps backwards with the adjoint g_s = u_s gy_s + A_{s+1}^T g_{s+1} (A_{s+1} absent where step
// s+1 restarts). With w_k the normalised weights, the logit gradients are
//     dg_k = w_k (1 - sigmoid(g_k)) (dw_k - sum_m w_m dw_m),   dw_k = g h_{s-1}[neighbour k].
template <typename scalar_t>
void backward_kernel(const scalar_t* gy, const scalar_t* x, const scalar_t* lam, const scalar_t* gl,
                     const scalar_t* gc, const scalar_t* gr, const scalar_t* u, scalar_t* d_x,
                     const std::vector<void*>& d_gates, const std::vector<bool>& grouped, const ScanShape& sh,
                     int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W;
  const int64_t max_lanes = std::max(sh.H, sh.W);
  const int64_t padded_lanes = max_lanes + 2;
  const int64_t block = channel_block(sh), blocks = sh.C / block;
  const std::array<void*, 3> logit_grads = {d_gates[1], d_gates[2], d_gates[3]};
  const std::array<bool, 3> logits_grouped = {grouped[1], grouped[2], grouped[3]};
  at::parallel_for(0, sh.B * blocks, plane_grain(4 * block * HW), [&](int64_t begin, int64_t end) {
    enum { LAM, U, DLAM, DU, kFrames };
    Frames<acc_t> f(HW, kFrames);
    GateCache<acc_t, true> gates(HW);
    GateGradAccumulator<scalar_t, acc_t> gate_grads(sh.H, sh.W, logit_grads, logits_grouped);
    PlaneLayouts<acc_t> x_plane(sh.H, sh.W), gy_plane(sh.H, sh.W);
    PlaneAccumulator<acc_t> dx_plane(sh.H, sh.W);
    // All hidden states of one direction, each row zero-padded on both sides.
    std::vector<acc_t> h_rows((max_lanes + 1) * padded_lanes, acc_t(0));
    // g of the step after the current one, times each of its three weights, zero-padded.
    std::vector<acc_t> next_rows(3 * padded_lanes, acc_t(0));
    std::vector<acc_t> g_row(max_lanes);
    acc_t* __restrict__ g = g_row.data();  // a plain pointer: the lane loops reload a vector's on every store
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * block;
      for (int64_t c = c0; c < c0 + block; ++c) {
        const int64_t p = b * sh.C + c;
        x_plane.load(x + p * HW);
        gy_plane.load(gy + p * HW);
        dx_plane.zero();
        for (int d = 0; d < kDirections; ++d) {
          const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
          const int64_t L = geo.lanes, S = geo.steps;
          const std::array<int64_t, 3> gate_p = gate_planes(sh, b, d, c);
          const int64_t o_lam = gate_plane(b, d, c, sh.C, sh.g_lam) * HW, o_u = gate_plane(b, d, c, sh.C, sh.g_u) * HW;
          const acc_t* w = gates.get(d, gate_p, geo, HW, gl, gc, gr);
          const acc_t* wq = w + 3 * HW;
          acc_t* dg = gate_grads.get(d, gate_p);
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
            if (restart) continue;  // no gates act here; the step before receives nothing through A_s
            gate_step_gradients(L, g, h_row(s - 1), w + r, w + HW + r, w + 2 * HW + r, wq + r, wq + HW + r,
                                wq + 2 * HW + r, dg + r, dg + HW + r, dg + 2 * HW + r, next_l, next_c, next_r);
          }
          scatter_gradient<scalar_t>(f.frame(DLAM), geo, d_gates[0], grouped[0], o_lam);
          scatter_gradient<scalar_t>(f.frame(DU), geo, d_gates[4], grouped[4], o_u);
        }
        dx_plane.write(d_x + p * HW);
      }
      gate_grads.flush_all();  // the task's groups are its own: nothing later adds to them
    }
  });
}

// The gradients of gate tensors: a tensor with a group per channel gets each element written once, in
// its own dtype; a grouped one sums its channels' contributions in the compute type first (converted
// back by the caller).
struct GateGrads {
  std::vector<at::Tensor> grads;
  std::vector<void*> ptrs;
  std::vector<bool> grouped;
  GateGrads(std::initializer_list<const at::Tensor*> gates, int64_t C, at::ScalarType acc_dtype) {
    for (const at::Tensor* t : gates) {
      grouped.push_back(t->size(2) != C);
      grads.push_back(grouped.back() ? at::zeros(t->sizes(), t->options().dtype(acc_dtype))
                                     : at::empty(t->sizes(), t->options()));
      ptrs.push_back(grads.back().data_ptr());
    }
  }
  at::Tensor result(size_t k, at::ScalarType dtype) const { return grads[k].to(dtype); }
};

at::ScalarType compute_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor gspn_scan_fwd_cpu(const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
                             const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in,
                             int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in);
  if (channels_last_kernel_applies(x_in, sh))
    return gspn_scan_fwd_channels_last(x_in, lam_in, gl_in, gc_in, gr_in, u_in, sh, chunk);
  auto x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(), gc = gc_in.contiguous(),
       gr = gr_in.contiguous(), u = u_in.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y.contiguous(scan_memory_format(x_in));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_fwd_cpu", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(),
                             gc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), sh, chunk);
  });
  return y.contiguous(scan_memory_format(x_in));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gspn_scan_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
    const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in, int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in);
  check_grad_output(gy_in, x_in);
  if (channels_last_kernel_applies(x_in, sh))
    return gspn_scan_bwd_channels_last(gy_in, x_in, lam_in, gl_in, gc_in, gr_in, u_in, sh, chunk);
  auto gy = gy_in.contiguous(), x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(),
       gc = gc_in.contiguous(), gr = gr_in.contiguous(), u = u_in.contiguous();
  const GateGrads grads({&lam, &gl, &gc, &gr, &u}, sh.C, compute_dtype(x));
  auto d_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_bwd_cpu", [&] {
      backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(),
                                gl.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(),
                                u.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(), grads.ptrs, grads.grouped, sh, chunk);
    });
  }
  const auto dt = x.scalar_type();
  return {d_x.contiguous(scan_memory_format(x_in)), grads.result(0, dt), grads.result(1, dt), grads.result(2, dt), grads.result(3, dt), grads.result(4, dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gspn, CPU, m) {
  m.impl("gspn_scan_fwd", &gspn_scan_fwd_cpu);
  m.impl("gspn_scan_bwd", &gspn_scan_bwd_cpu);
}

}  // namespace gspn
