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
      if (grouped[k]) {
        scatter_frame<true>(f, geo, static_cast<acc_t*>(grads[k]) + planes[d][k] * HW);
      } else {
        scatter_frame<false>(f, geo, static_cast<scalar_t*>(grads[k]) + planes[d][k] * HW);
      }
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

// Where a kernel's lam and u frames come from, and where their gradients go. Each thread builds its own
// source from the shared arguments (Args). The kernels walk a thread's planes in chunks of at most
// chunk_channels(HW) consecutive channels of one batch: prepare(b, c0, n) before a chunk, then per channel and
// direction lam_frame / u_frame (scan order, read-only) and, in the backward only, dlam_frame / du_frame
// (scan order, written by the kernel) followed by accumulate, finish_chunk after a chunk's channels and
// finish_task after each task.
// Channels per chunk: 16 to 128, about 256K values per (direction, chunk) frame block, so that a chunk's
// GEMMs are large enough to run well and its frames stay in the cache where the maps are small.
inline int64_t chunk_channels(int64_t HW) { return std::clamp<int64_t>(262144 / std::max<int64_t>(HW, 1), 16, 128); }

// lam and u read from their (B, 4, G, H, W) tensors (gspn_scan), gathered into scan order per plane.
template <typename scalar_t, typename acc_t>
struct TensorLamU {
  struct Args {
    const scalar_t *lam, *u;
    // Backward only: d_lam, d_u in the compute type where grouped (summed over a group's channels),
    // else in their own dtype.
    std::array<void*, 2> grads;
    std::array<bool, 2> grouped;
  };
  const Args& a;
  const ScanShape& sh;
  int64_t HW;
  Frames<acc_t> f;  // lam, u, dlam, du
  TensorLamU(const Args& args, const ScanShape& shape)
      : a(args), sh(shape), HW(shape.H * shape.W), f(shape.H * shape.W, 4) {}

  void prepare(int64_t, int64_t, int64_t) {}
  const acc_t* lam_frame(int64_t b, int d, int64_t c, const ScanGeometry& geo) {
    gather_frame(a.lam + gate_plane(b, d, c, sh.C, sh.g_lam) * HW, geo, f.frame(0));
    return f.frame(0);
  }
  const acc_t* u_frame(int64_t b, int d, int64_t c, const ScanGeometry& geo) {
    gather_frame(a.u + gate_plane(b, d, c, sh.C, sh.g_u) * HW, geo, f.frame(1));
    return f.frame(1);
  }
  acc_t* dlam_frame(int, int64_t) { return f.frame(2); }
  acc_t* du_frame(int, int64_t) { return f.frame(3); }

  void accumulate(int64_t b, int d, int64_t c, const ScanGeometry& geo) {
    const int64_t planes[2] = {gate_plane(b, d, c, sh.C, sh.g_lam) * HW, gate_plane(b, d, c, sh.C, sh.g_u) * HW};
    for (int k = 0; k < 2; ++k) {
      if (a.grouped[k]) {
        scatter_frame<true>(f.frame(2 + k), geo, static_cast<acc_t*>(a.grads[k]) + planes[k]);
      } else {
        scatter_frame<false>(f.frame(2 + k), geo, static_cast<scalar_t*>(a.grads[k]) + planes[k]);
      }
    }
  }
  void finish_chunk(int64_t, int64_t, int64_t) {}
  void finish_task(int64_t, int64_t) {}
};

// The type of the proxy GEMMs: bfloat16 for bfloat16 inputs (as the composition runs them under autocast:
// float32 accumulation, bfloat16 results, twice the float32 rate where the CPU has bfloat16 dot products),
// else the compute type.
template <typename scalar_t, typename acc_t>
using gemm_type_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, c10::BFloat16, acc_t>;

// lam and u generated from the proxy, lam[b, d, c] = sum_k w_lam[d C + c, k] p[b, k] (u likewise), never
// materialised beyond one chunk of channels (gspn_proxy_scan). Each thread keeps its batch's proxy in the
// four directions' scan orders, P (4, K, HW); a chunk's lam and u frames (4, n, HW) each come from one
// batched GEMM over the directions, W[:, c0:c0+n] (4, n, K) @ P. The backward collects the chunk's dlam and
// du frames the same way and turns them into the weights' gradients (dL @ P^T, into the (B, 4, C, K) partial
// sums) and the proxy's (W^T @ dL, summed over the task's chunks into dP and, at the task's end, into its
// slot of the (B, slots, K, H, W) partial sums). The GEMMs run on the calling thread (inside the kernel's
// parallel region ATen does not start more threads).
template <typename scalar_t, typename acc_t>
struct ProxyLamU {
  using gemm_t = gemm_type_t<scalar_t, acc_t>;
  struct Args {
    const scalar_t* p;      // (B, K, H, W)
    at::Tensor w_lam, w_u;  // (4, C, K) in gemm_t
    int64_t K;
    // Backward only.
    acc_t* dp_partial = nullptr;  // (B, slots, K, H, W)
    int64_t slots = 1;
    at::Tensor dw_lam_partial, dw_u_partial;  // (B, 4, C, K) in acc_t
  };
  const Args& a;
  const ScanShape& sh;
  int64_t HW;
  int64_t chunk;                    // channels per chunk (chunk_channels)
  at::Tensor P, dP;                 // (4, K, HW) in gemm_t; dP in acc_t
  at::Tensor lam, u, dlam, du;      // (4, chunk, HW) in acc_t: the current chunk's frames
  at::Tensor lam_g, u_g;            // the GEMMs' outputs, where gemm_t is not acc_t
  int64_t loaded = -1;              // the batch whose proxy P holds
  int64_t c0 = 0;                   // the current chunk's first channel

  ProxyLamU(const Args& args, const ScanShape& shape)
      : a(args), sh(shape), HW(shape.H * shape.W), chunk(chunk_channels(shape.H * shape.W)) {
    const auto gemm_opts = args.w_lam.options();
    const auto acc_opts = gemm_opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
    P = at::empty({kDirections, a.K, HW}, gemm_opts);
    lam = at::empty({kDirections, chunk, HW}, acc_opts);
    u = at::empty_like(lam);
    if constexpr (!std::is_same_v<gemm_t, acc_t>) {
      lam_g = at::empty({kDirections, chunk, HW}, gemm_opts);
      u_g = at::empty_like(lam_g);
    }
    if (a.dp_partial != nullptr) {
      dP = at::zeros({kDirections, a.K, HW}, acc_opts);
      dlam = at::empty_like(lam);
      du = at::empty_like(lam);
    }
  }

  void load(int64_t b) {
    if (loaded == b) return;
    gemm_t* dst = P.data_ptr<gemm_t>();
    for (int d = 0; d < kDirections; ++d) {
      const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
      for (int64_t k = 0; k < a.K; ++k) gather_frame(a.p + (b * a.K + k) * HW, geo, dst + (d * a.K + k) * HW);
    }
    loaded = b;
  }

  // out[:, :n] = W[:, c0:c0+n] @ P, through the gemm_t buffer where that is another type.
  void project(at::Tensor& out, at::Tensor& out_g, const at::Tensor& w, int64_t n) {
    at::Tensor dst = out.narrow(1, 0, n);
    if constexpr (std::is_same_v<gemm_t, acc_t>) {
      at::bmm_out(dst, w.narrow(1, c0, n), P);
    } else {
      at::Tensor tmp = out_g.narrow(1, 0, n);
      at::bmm_out(tmp, w.narrow(1, c0, n), P);
      dst.copy_(tmp);
    }
  }

  void prepare(int64_t b, int64_t first, int64_t n) {
    load(b);
    c0 = first;
    project(lam, lam_g, a.w_lam, n);
    project(u, u_g, a.w_u, n);
  }
  acc_t* frame(at::Tensor& t, int d, int64_t c) { return t.data_ptr<acc_t>() + (d * chunk + c - c0) * HW; }
  const acc_t* lam_frame(int64_t, int d, int64_t c, const ScanGeometry&) { return frame(lam, d, c); }
  const acc_t* u_frame(int64_t, int d, int64_t c, const ScanGeometry&) { return frame(u, d, c); }
  acc_t* dlam_frame(int d, int64_t c) { return frame(dlam, d, c); }
  acc_t* du_frame(int d, int64_t c) { return frame(du, d, c); }
  void accumulate(int64_t, int, int64_t, const ScanGeometry&) {}

  void finish_chunk(int64_t b, int64_t first, int64_t n) {
    const at::Tensor Pt = P.transpose(1, 2);
    const at::Tensor* weights[2] = {&a.w_lam, &a.w_u};
    const at::Tensor* partials[2] = {&a.dw_lam_partial, &a.dw_u_partial};
    const at::Tensor grads[2] = {dlam.narrow(1, 0, n), du.narrow(1, 0, n)};
    for (int k = 0; k < 2; ++k) {
      const at::Tensor g = grads[k].to(P.scalar_type());
      (*partials[k])[b].narrow(1, first, n).add_(at::bmm(g, Pt));
      dP.add_(at::bmm(weights[k]->narrow(1, first, n).transpose(1, 2), g));
    }
  }

  // Adds the task's proxy gradient into its slot (in the plane layout) and clears it for the next task.
  void finish_task(int64_t b, int64_t slot) {
    acc_t* dst = a.dp_partial + (b * a.slots + slot) * a.K * HW;
    const acc_t* src = dP.data_ptr<acc_t>();
    for (int d = 0; d < kDirections; ++d) {
      const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
      for (int64_t k = 0; k < a.K; ++k) scatter_frame<true>(src + (d * a.K + k) * HW, geo, dst + k * HW);
    }
    dP.zero_();
  }
};

template <typename scalar_t, typename Source>
void forward_kernel(const scalar_t* x, const typename Source::Args& source_args, const scalar_t* gl,
                    const scalar_t* gc, const scalar_t* gr, scalar_t* y, const ScanShape& sh, int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W;
  const int64_t max_lanes = std::max(sh.H, sh.W);
  at::parallel_for(0, sh.B * sh.C, plane_grain(4 * HW), [&](int64_t begin, int64_t end) {
    Source source(source_args, sh);
    GateCache<acc_t, false> gates(HW);
    PlaneLayouts<acc_t> x_plane(sh.H, sh.W);
    PlaneAccumulator<acc_t> y_plane(sh.H, sh.W);
    std::vector<acc_t> padded(2 * (max_lanes + 2), acc_t(0));  // two zero-padded state rows
    for (int64_t first = begin; first < end;) {
      const int64_t b = first / sh.C, c0 = first % sh.C;
      const int64_t n = std::min({end - first, sh.C - c0, chunk_channels(HW)});
      source.prepare(b, c0, n);
      for (int64_t c = c0; c < c0 + n; ++c) {
        const int64_t p = b * sh.C + c;
        x_plane.load(x + p * HW);
        y_plane.zero();
        for (int d = 0; d < kDirections; ++d) {
          const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
          const int64_t L = geo.lanes;
          const acc_t* w = gates.get(d, gate_planes(sh, b, d, c), geo, HW, gl, gc, gr);
          const acc_t* lam_f = source.lam_frame(b, d, c, geo);
          const acc_t* u_f = source.u_frame(b, d, c, geo);
          const RowView<const acc_t> xs = x_plane.view(d);
          const RowView<acc_t> ys = y_plane.view(d);
          acc_t* h_prev = padded.data() + 1;
          acc_t* h = h_prev + max_lanes + 2;
          std::fill(padded.begin(), padded.end(), acc_t(0));  // a shorter L reads its pad at h[L]
          for (int64_t s = 0; s < geo.steps; ++s) {
            const int64_t r = s * L;
            step_states(L, restarts_at(s, chunk), lam_f + r, xs.row(s), w + r, w + HW + r, w + 2 * HW + r, h_prev, h);
            const acc_t* __restrict__ u_r = u_f + r;
            acc_t* __restrict__ y_r = ys.row(s);
            for (int64_t l = 0; l < L; ++l) y_r[l] += u_r[l] * h[l];
            std::swap(h_prev, h);
          }
        }
        y_plane.write(y + p * HW);
      }
      first += n;
    }
  });
}

// How the backward splits each batch's channels into tasks: `slots` tasks per batch of `span` channels
// each (the last one may be shorter), spans a multiple of `block`.
struct ChannelTasks {
  int64_t span, slots;
};

// Tasks of whole channel groups: every channel group of every grouped gate tensor that a task's
// channels touch belongs to that task alone (a block spans lcm_k(C / G_k) channels), so grouped
// sums accumulate without atomics and in a fixed order (deterministic). With max_slots, blocks are
// merged into at most that many tasks per batch.
ChannelTasks channel_tasks(const ScanShape& sh, const std::array<int64_t, 5>& groups, int64_t max_slots) {
  int64_t block = 1;
  for (int64_t g : groups) block = std::lcm(block, sh.C / g);
  const int64_t blocks = sh.C / block;
  const int64_t slots = std::max<int64_t>(1, std::min(blocks, max_slots));
  const int64_t span = (blocks + slots - 1) / slots * block;
  return {span, (sh.C + span - 1) / span};
}

// Gradients of one (batch, channel-span) task (channel_tasks). A gate tensor with one group per
// channel (G = C) is written once per plane, in its own dtype; grouped ones accumulate in the compute
// type (`grouped` below). lam's and u's gradients go to the source.
//
// Per direction: recompute the hidden states h (see the memory note at the top), then sweep the
// steps backwards with the adjoint g_s = u_s gy_s + A_{s+1}^T g_{s+1} (A_{s+1} absent where step
// s+1 restarts). With w_k the normalised weights, the logit gradients are
//     dg_k = w_k (1 - sigmoid(g_k)) (dw_k - sum_m w_m dw_m),   dw_k = g h_{s-1}[neighbour k].
template <typename scalar_t, typename Source>
void backward_kernel(const scalar_t* gy, const scalar_t* x, const typename Source::Args& source_args,
                     const scalar_t* gl, const scalar_t* gc, const scalar_t* gr, scalar_t* d_x,
                     const std::array<void*, 3>& d_gates, const std::array<bool, 3>& grouped, const ScanShape& sh,
                     const ChannelTasks& tasks, int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W;
  const int64_t max_lanes = std::max(sh.H, sh.W);
  const int64_t padded_lanes = max_lanes + 2;
  at::parallel_for(0, sh.B * tasks.slots, plane_grain(4 * tasks.span * HW), [&](int64_t begin, int64_t end) {
    Source source(source_args, sh);
    GateCache<acc_t, true> gates(HW);
    GateGradAccumulator<scalar_t, acc_t> gate_grads(sh.H, sh.W, d_gates, grouped);
    PlaneLayouts<acc_t> x_plane(sh.H, sh.W), gy_plane(sh.H, sh.W);
    PlaneAccumulator<acc_t> dx_plane(sh.H, sh.W);
    // All hidden states of one direction, each row zero-padded on both sides.
    std::vector<acc_t> h_rows((max_lanes + 1) * padded_lanes, acc_t(0));
    // g of the step after the current one, times each of its three weights, zero-padded.
    std::vector<acc_t> next_rows(3 * padded_lanes, acc_t(0));
    std::vector<acc_t> g_row(max_lanes);
    acc_t* __restrict__ g = g_row.data();  // a plain pointer: the lane loops reload a vector's on every store
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks.slots, slot = task % tasks.slots;
      const int64_t task_end = std::min(sh.C, (slot + 1) * tasks.span);
      for (int64_t c0 = slot * tasks.span; c0 < task_end; c0 += chunk_channels(HW)) {
        const int64_t n = std::min(task_end - c0, chunk_channels(HW));
        source.prepare(b, c0, n);
        for (int64_t c = c0; c < c0 + n; ++c) {
          const int64_t p = b * sh.C + c;
          x_plane.load(x + p * HW);
          gy_plane.load(gy + p * HW);
          dx_plane.zero();
          for (int d = 0; d < kDirections; ++d) {
            const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
            const int64_t L = geo.lanes, S = geo.steps;
            const std::array<int64_t, 3> gate_p = gate_planes(sh, b, d, c);
            const acc_t* w = gates.get(d, gate_p, geo, HW, gl, gc, gr);
            const acc_t* wq = w + 3 * HW;
            acc_t* dg = gate_grads.get(d, gate_p);
            const acc_t* lam_f = source.lam_frame(b, d, c, geo);
            const acc_t* u_f = source.u_frame(b, d, c, geo);
            acc_t* dlam_f = source.dlam_frame(d, c);
            acc_t* du_f = source.du_frame(d, c);
            const RowView<const acc_t> xs = x_plane.view(d), gys = gy_plane.view(d);
            const RowView<acc_t> dxs = dx_plane.view(d);
            // h_row(s) for s in [-1, S): row -1 is all zeros (never read across a restart).
            auto h_row = [&](int64_t s) { return h_rows.data() + (s + 1) * padded_lanes + 1; };
            for (int64_t s = 0; s < S; ++s) {
              const int64_t r = s * L;
              acc_t* h = h_row(s);
              step_states(L, restarts_at(s, chunk), lam_f + r, xs.row(s), w + r, w + HW + r, w + 2 * HW + r,
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
              const acc_t* __restrict__ u_r = u_f + r;
              const acc_t* __restrict__ gy_r = gys.row(s);
              const acc_t* __restrict__ x_r = xs.row(s);
              const acc_t* __restrict__ lam_r = lam_f + r;
              const acc_t* __restrict__ h = h_row(s);
              if (next_applies) {
                for (int64_t l = 0; l < L; ++l) g[l] = u_r[l] * gy_r[l] + next_c[l] + next_l[l + 1] + next_r[l - 1];
              } else {
                for (int64_t l = 0; l < L; ++l) g[l] = u_r[l] * gy_r[l];
              }
              adjoint_step_outputs(L, g, lam_r, x_r, gy_r, h, dxs.row(s), dlam_f + r, du_f + r);
              if (restart) continue;  // no gates act here; the step before receives nothing through A_s
              gate_step_gradients(L, g, h_row(s - 1), w + r, w + HW + r, w + 2 * HW + r, wq + r, wq + HW + r,
                                  wq + 2 * HW + r, dg + r, dg + HW + r, dg + 2 * HW + r, next_l, next_c, next_r);
            }
            source.accumulate(b, d, c, geo);
          }
          dx_plane.write(d_x + p * HW);
        }
        source.finish_chunk(b, c0, n);
      }
      source.finish_task(b, slot);
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
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in, chunk);
  if (channels_last_kernel_applies(x_in, sh))
    return gspn_scan_fwd_channels_last(x_in, lam_in, gl_in, gc_in, gr_in, u_in, sh, chunk);
  auto x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(), gc = gc_in.contiguous(),
       gr = gr_in.contiguous(), u = u_in.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y.contiguous(scan_memory_format(x_in));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_fwd_cpu", [&] {
    using Source = TensorLamU<scalar_t, acc_type_t<scalar_t>>;
    const typename Source::Args args{lam.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), {}, {}};
    forward_kernel<scalar_t, Source>(x.data_ptr<scalar_t>(), args, gl.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                                     gr.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), sh, chunk);
  });
  return y.contiguous(scan_memory_format(x_in));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gspn_scan_bwd_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
    const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in, int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in, chunk);
  check_grad_output(gy_in, x_in);
  if (channels_last_kernel_applies(x_in, sh))
    return gspn_scan_bwd_channels_last(gy_in, x_in, lam_in, gl_in, gc_in, gr_in, u_in, sh, chunk);
  auto gy = gy_in.contiguous(), x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(),
       gc = gc_in.contiguous(), gr = gr_in.contiguous(), u = u_in.contiguous();
  const GateGrads grads({&lam, &gl, &gc, &gr, &u}, sh.C, compute_dtype(x));
  auto d_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() > 0) {
    const ChannelTasks tasks = channel_tasks(sh, {sh.g_lam, sh.g_gl, sh.g_gc, sh.g_gr, sh.g_u}, sh.C);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_bwd_cpu", [&] {
      using Source = TensorLamU<scalar_t, acc_type_t<scalar_t>>;
      const typename Source::Args args{lam.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                       {grads.ptrs[0], grads.ptrs[4]}, {grads.grouped[0], grads.grouped[4]}};
      backward_kernel<scalar_t, Source>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), args, gl.data_ptr<scalar_t>(),
                                        gc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(),
                                        {grads.ptrs[1], grads.ptrs[2], grads.ptrs[3]},
                                        {grads.grouped[1], grads.grouped[2], grads.grouped[3]}, sh, tasks, chunk);
    });
  }
  const auto dt = x.scalar_type();
  return {d_x.contiguous(scan_memory_format(x_in)), grads.result(0, dt), grads.result(1, dt), grads.result(2, dt), grads.result(3, dt), grads.result(4, dt)};
}

// ---------------------------------------------------------------------------------------------
// gspn_proxy_scan: the same propagation with lam and u generated from the proxy inside the kernel.

// Checks p (B, K, H, W), w_lam / w_u (4 C, K) and the gate logits (B, 4, G, H, W) against x, and returns the
// scan's sizes (lam and u count as per-channel) and K.
std::pair<ScanShape, int64_t> check_proxy_inputs(const at::Tensor& x, const at::Tensor& p, const at::Tensor& w_lam,
                                                 const at::Tensor& w_u, const at::Tensor& gl, const at::Tensor& gc,
                                                 const at::Tensor& gr, int64_t chunk) {
  TORCH_CHECK(x.dim() == 4, "gspn_proxy_scan: x must be (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(chunk >= 0, "gspn_proxy_scan: chunk must be >= 1 (or 0 for a global scan), got ", chunk);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gspn_proxy_scan: x must be floating point, got ", x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(p.dim() == 4 && p.size(0) == B && p.size(2) == H && p.size(3) == W && p.size(1) >= 1,
              "gspn_proxy_scan: p must be (B, K, H, W) = (", B, ", K, ", H, ", ", W, "), got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type(), "gspn_proxy_scan: p has dtype ", p.scalar_type(), " but x has ",
              x.scalar_type());
  const int64_t K = p.size(1);
  for (const auto& [name, w] : {std::pair<const char*, const at::Tensor*>{"w_lam", &w_lam}, {"w_u", &w_u}}) {
    TORCH_CHECK(w->dim() == 2 && w->size(0) == kDirections * C && w->size(1) == K, "gspn_proxy_scan: ", name,
                " must be (4 C, K) = (", kDirections * C, ", ", K, "), got ", w->sizes());
    TORCH_CHECK(at::isFloatingType(w->scalar_type()), "gspn_proxy_scan: ", name, " must be floating point");
  }
  ScanShape sh{B, C, H, W, C, 0, 0, 0, C};
  const char* names[] = {"gl", "gc", "gr"};
  const at::Tensor* gates[] = {&gl, &gc, &gr};
  int64_t* groups[] = {&sh.g_gl, &sh.g_gc, &sh.g_gr};
  for (int k = 0; k < 3; ++k) {
    const at::Tensor& t = *gates[k];
    TORCH_CHECK(t.dim() == 5 && t.size(0) == B && t.size(1) == kDirections && t.size(3) == H && t.size(4) == W,
                "gspn_proxy_scan: ", names[k], " must be (B, 4, G, H, W) = (", B, ", 4, G, ", H, ", ", W, "), got ",
                t.sizes());
    TORCH_CHECK(t.size(2) >= 1 && C % t.size(2) == 0, "gspn_proxy_scan: ", names[k], "'s group count G=", t.size(2),
                " must divide C=", C);
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "gspn_proxy_scan: ", names[k], " has dtype ", t.scalar_type(),
                " but x has ", x.scalar_type());
    *groups[k] = t.size(2);
  }
  for (const at::Tensor* t : {&p, &w_lam, &w_u, &gl, &gc, &gr})
    TORCH_CHECK(t->device() == x.device(), "gspn_proxy_scan: every input must be on x's device ", x.device());
  return {sh, K};
}

// A (4 C, K) proxy weight as the kernel reads it: (4, C, K), contiguous, in the type of its GEMMs
// (gemm_type_t), and detached (the GEMMs run on the parallel region's threads, where no autograd guard reaches).
at::ScalarType gemm_dtype(const at::Tensor& x) { return x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : compute_dtype(x); }
at::Tensor proxy_weight(const at::Tensor& w, const ScanShape& sh, int64_t K, const at::Tensor& x) {
  return w.detach().to(gemm_dtype(x)).contiguous().view({kDirections, sh.C, K});
}

at::Tensor gspn_proxy_scan_fwd_cpu(const at::Tensor& x_in, const at::Tensor& p_in, const at::Tensor& w_lam_in,
                                   const at::Tensor& w_u_in, const at::Tensor& gl_in, const at::Tensor& gc_in,
                                   const at::Tensor& gr_in, int64_t chunk) {
  const auto [sh, K] = check_proxy_inputs(x_in, p_in, w_lam_in, w_u_in, gl_in, gc_in, gr_in, chunk);
  auto x = x_in.contiguous(), p = p_in.contiguous(), gl = gl_in.contiguous(), gc = gc_in.contiguous(),
       gr = gr_in.contiguous();
  auto w_lam = proxy_weight(w_lam_in, sh, K, x_in), w_u = proxy_weight(w_u_in, sh, K, x_in);
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_proxy_scan_fwd_cpu", [&] {
    using Source = ProxyLamU<scalar_t, acc_type_t<scalar_t>>;
    typename Source::Args args{p.data_ptr<scalar_t>(), w_lam, w_u, K};
    forward_kernel<scalar_t, Source>(x.data_ptr<scalar_t>(), args, gl.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                                     gr.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), sh, chunk);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gspn_proxy_scan_bwd_cpu(const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& p_in,
                        const at::Tensor& w_lam_in, const at::Tensor& w_u_in, const at::Tensor& gl_in,
                        const at::Tensor& gc_in, const at::Tensor& gr_in, int64_t chunk) {
  const auto [sh, K] = check_proxy_inputs(x_in, p_in, w_lam_in, w_u_in, gl_in, gc_in, gr_in, chunk);
  check_grad_output(gy_in, x_in);
  const auto acc = compute_dtype(x_in);
  auto gy = gy_in.contiguous(), x = x_in.contiguous(), p = p_in.contiguous(), gl = gl_in.contiguous(),
       gc = gc_in.contiguous(), gr = gr_in.contiguous();
  auto w_lam = proxy_weight(w_lam_in, sh, K, x_in), w_u = proxy_weight(w_u_in, sh, K, x_in);
  const GateGrads grads({&gl, &gc, &gr}, sh.C, acc);
  auto d_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  // Enough tasks per batch to keep every thread busy; each has its own slot of proxy-gradient partial sums.
  const int64_t threads = at::get_num_threads();
  const ChannelTasks tasks =
      channel_tasks(sh, {sh.C, sh.g_gl, sh.g_gc, sh.g_gr, sh.C}, (2 * threads + sh.B - 1) / std::max<int64_t>(sh.B, 1));
  auto dp_partial = at::zeros({sh.B, tasks.slots, K, sh.H, sh.W}, x.options().dtype(acc));
  auto dw_lam_partial = at::zeros({sh.B, kDirections, sh.C, K}, x.options().dtype(acc));
  auto dw_u_partial = at::zeros_like(dw_lam_partial);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_proxy_scan_bwd_cpu", [&] {
      using acc_t = acc_type_t<scalar_t>;
      using Source = ProxyLamU<scalar_t, acc_t>;
      typename Source::Args args{p.data_ptr<scalar_t>(), w_lam, w_u, K, dp_partial.data_ptr<acc_t>(), tasks.slots,
                                 dw_lam_partial, dw_u_partial};
      backward_kernel<scalar_t, Source>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), args, gl.data_ptr<scalar_t>(),
                                        gc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(),
                                        {grads.ptrs[0], grads.ptrs[1], grads.ptrs[2]},
                                        {grads.grouped[0], grads.grouped[1], grads.grouped[2]}, sh, tasks, chunk);
    });
  }
  const auto dt = x.scalar_type();
  return {d_x,
          dp_partial.sum(1).to(dt),
          dw_lam_partial.sum(0).view_as(w_lam_in).to(w_lam_in.scalar_type()),
          dw_u_partial.sum(0).view_as(w_u_in).to(w_u_in.scalar_type()),
          grads.result(0, dt),
          grads.result(1, dt),
          grads.result(2, dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gspn, CPU, m) {
  m.impl("gspn_scan_fwd", &gspn_scan_fwd_cpu);
  m.impl("gspn_scan_bwd", &gspn_scan_bwd_cpu);
  m.impl("gspn_proxy_scan_fwd", &gspn_proxy_scan_fwd_cpu);
  m.impl("gspn_proxy_scan_bwd", &gspn_proxy_scan_bwd_cpu);
}

}  // namespace gspn
