// Fused four-direction GSPN propagation on the CPU: the schemas of gspn::gspn_scan_fwd /
// gspn::gspn_scan_bwd and their CPU kernels.
//
// Contract: dit_gspn/ops/reference.py::gspn_scan_reference (raw gate logits in, normalisation
// inside, the four directions read from the original layout, u gating and the direction sum
// fused). Computes in float32 for half types, in float64 for float64 (gradcheck). The gates'
// sigmoids come from one vectorised ATen pass (see gate_sigmoid); masking and normalisation
// happen in the scan loops, which run on per-direction frames (see gather_frame) so that the
// compiler vectorises them.
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

// Each direction runs on "frames": its operands copied into (S, L) buffers in scan order (row s is
// step s, lanes contiguous), converted to the compute type, with the left gate zeroed on lane 0
// and the right gate on lane L-1. The per-step loops over lanes are then branch-free and
// contiguous, so the compiler vectorises them; the copies are cheap next to the scan's arithmetic
// (a direction scanning along W would otherwise walk its lanes W elements apart).

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

// plane[geo.offset(s, l)] += frame[s * L + l].
template <typename acc_t>
void scatter_add_frame(const acc_t* frame, const ScanGeometry& geo, acc_t* plane) {
  for (int64_t s = 0; s < geo.steps; ++s) {
    const acc_t* in = frame + s * geo.lanes;
    if (geo.lane_stride == 1) {
      acc_t* row = plane + geo.origin + s * geo.step_stride;
      for (int64_t l = 0; l < geo.lanes; ++l) row[l] += in[l];
    } else {
      for (int64_t l = 0; l < geo.lanes; ++l) plane[geo.offset(s, l)] += in[l];
    }
  }
}

// The gate sigmoids of one direction as frames, masked at the lane edges (normalize_gates' masks).
template <typename acc_t>
void gather_gates(const acc_t* sig_l, const acc_t* sig_c, const acc_t* sig_r, const ScanGeometry& geo, acc_t* sl,
                  acc_t* sc, acc_t* sr) {
  gather_frame(sig_l, geo, sl);
  gather_frame(sig_c, geo, sc);
  gather_frame(sig_r, geo, sr);
  for (int64_t s = 0; s < geo.steps; ++s) {
    sl[s * geo.lanes] = acc_t(0);
    sr[s * geo.lanes + geo.lanes - 1] = acc_t(0);
  }
}

// One step of the recurrence over L lanes: h[l] = lam x + (sl hp[l-1] + sc hp[l] + sr hp[l+1]) / (sl + sc + sr),
// hp the previous step's states with a zero on each side (hp[-1] = hp[L] = 0), or h = lam x on a restart.
template <typename acc_t>
inline void step_states(int64_t L, bool restart, const acc_t* __restrict__ lam, const acc_t* __restrict__ x,
                        const acc_t* __restrict__ sl, const acc_t* __restrict__ sc, const acc_t* __restrict__ sr,
                        const acc_t* __restrict__ hp, acc_t* __restrict__ h) {
  if (restart) {
    for (int64_t l = 0; l < L; ++l) h[l] = lam[l] * x[l];
    return;
  }
  for (int64_t l = 0; l < L; ++l) {
    h[l] = lam[l] * x[l] + (sl[l] * hp[l - 1] + sc[l] * hp[l] + sr[l] * hp[l + 1]) / (sl[l] + sc[l] + sr[l]);
  }
}

// Per-thread buffers of one direction's frames.
template <typename acc_t>
struct Frames {
  int64_t size, lanes;
  std::vector<acc_t> storage;
  explicit Frames(int64_t HW, int64_t max_lanes, int count)
      : size(HW), lanes(max_lanes), storage(count * HW + 2 * (max_lanes + 2)) {}
  acc_t* frame(int k) { return storage.data() + k * size; }
  // A zero-padded lane vector: index -1 and L are valid and hold zeros.
  acc_t* padded(int k, int count) { return storage.data() + count * size + k * (lanes + 2) + 1; }
};

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const scalar_t* lam, const acc_type_t<scalar_t>* sig_l,
                    const acc_type_t<scalar_t>* sig_c, const acc_type_t<scalar_t>* sig_r, const scalar_t* u, scalar_t* y,
                    const ScanShape& sh, int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W;
  const int64_t max_lanes = std::max(sh.H, sh.W);
  at::parallel_for(0, sh.B * sh.C, plane_grain(4 * HW), [&](int64_t begin, int64_t end) {
    enum { X, LAM, SL, SC, SR, U, Y, kFrames };
    Frames<acc_t> f(HW, max_lanes, kFrames);
    std::vector<acc_t> y_plane(HW);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / sh.C, c = p % sh.C;
      std::fill(y_plane.begin(), y_plane.end(), acc_t(0));
      for (int d = 0; d < kDirections; ++d) {
        const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
        const int64_t L = geo.lanes;
        gather_frame(x + p * HW, geo, f.frame(X));
        gather_frame(lam + gate_plane(b, d, c, sh.C, sh.g_lam) * HW, geo, f.frame(LAM));
        gather_gates(sig_l + gate_plane(b, d, c, sh.C, sh.g_gl) * HW, sig_c + gate_plane(b, d, c, sh.C, sh.g_gc) * HW,
                     sig_r + gate_plane(b, d, c, sh.C, sh.g_gr) * HW, geo, f.frame(SL), f.frame(SC), f.frame(SR));
        gather_frame(u + gate_plane(b, d, c, sh.C, sh.g_u) * HW, geo, f.frame(U));
        acc_t* h_prev = f.padded(0, kFrames);
        acc_t* h = f.padded(1, kFrames);
        std::fill(h_prev - 1, h_prev + max_lanes + 1, acc_t(0));  // a shorter L reads its pad at h[L]
        std::fill(h - 1, h + max_lanes + 1, acc_t(0));
        for (int64_t s = 0; s < geo.steps; ++s) {
          const int64_t r = s * L;
          step_states(L, restarts_at(s, chunk), f.frame(LAM) + r, f.frame(X) + r, f.frame(SL) + r, f.frame(SC) + r,
                      f.frame(SR) + r, h_prev, h);
          const acc_t* u_r = f.frame(U) + r;
          acc_t* y_r = f.frame(Y) + r;
          for (int64_t l = 0; l < L; ++l) y_r[l] = u_r[l] * h[l];
          std::swap(h_prev, h);
        }
        scatter_add_frame(f.frame(Y), geo, y_plane.data());
      }
      scalar_t* yp = y + p * HW;
      for (int64_t i = 0; i < HW; ++i) yp[i] = static_cast<scalar_t>(y_plane[i]);
    }
  });
}

// Gradients of one (batch, channel-block) task. Every channel group of every gate tensor that
// these channels touch belongs to this task alone (the block spans lcm_k(C / G_k) channels),
// so the grouped sums accumulate without atomics and in a fixed order (deterministic).
//
// Per direction: recompute the hidden states h (see the memory note at the top), then sweep the
// steps backwards with the adjoint g_s = u_s gy_s + A_{s+1}^T g_{s+1} (A_{s+1} absent where step
// s+1 restarts). With w_k = s_k / T the normalised weights, the logit gradients are
//     dg_k = w_k (1 - sigmoid(g_k)) (dw_k - sum_m w_m dw_m),   dw_k = g h_{s-1}[neighbour k]
// (weights_backward_from_sigmoids, written without its divisions).
template <typename scalar_t>
void backward_kernel(const scalar_t* gy, const scalar_t* x, const scalar_t* lam, const acc_type_t<scalar_t>* sig_l,
                     const acc_type_t<scalar_t>* sig_c, const acc_type_t<scalar_t>* sig_r, const scalar_t* u, scalar_t* d_x,
                     acc_type_t<scalar_t>* d_lam, acc_type_t<scalar_t>* d_gl, acc_type_t<scalar_t>* d_gc,
                     acc_type_t<scalar_t>* d_gr, acc_type_t<scalar_t>* d_u, const ScanShape& sh, int64_t chunk) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = sh.H * sh.W;
  const int64_t max_lanes = std::max(sh.H, sh.W);
  const int64_t padded_lanes = max_lanes + 2;
  int64_t block = 1;
  for (int64_t g : {sh.g_lam, sh.g_gl, sh.g_gc, sh.g_gr, sh.g_u}) block = std::lcm(block, sh.C / g);
  const int64_t blocks_per_batch = sh.C / block;
  at::parallel_for(0, sh.B * blocks_per_batch, plane_grain(4 * block * HW), [&](int64_t begin, int64_t end) {
    enum { X, LAM, SL, SC, SR, U, GY, DX, DLAM, DGL, DGC, DGR, DU, kFrames };
    Frames<acc_t> f(HW, max_lanes, kFrames);
    // All hidden states of one direction, each row zero-padded on both sides.
    std::vector<acc_t> h_rows((max_lanes + 1) * padded_lanes, acc_t(0));
    // g of the step after the current one, times each of its three weights, zero-padded.
    std::vector<acc_t> next_rows(3 * padded_lanes, acc_t(0));
    std::vector<acc_t> dx_plane(HW);
    std::vector<acc_t> g(max_lanes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks_per_batch;
      for (int64_t c = (task % blocks_per_batch) * block; c < (task % blocks_per_batch + 1) * block; ++c) {
        const int64_t p = b * sh.C + c;
        std::fill(dx_plane.begin(), dx_plane.end(), acc_t(0));
        for (int d = 0; d < kDirections; ++d) {
          const ScanGeometry geo = scan_geometry(d, sh.H, sh.W);
          const int64_t L = geo.lanes, S = geo.steps;
          const int64_t o_lam = gate_plane(b, d, c, sh.C, sh.g_lam) * HW;
          const int64_t o_gl = gate_plane(b, d, c, sh.C, sh.g_gl) * HW;
          const int64_t o_gc = gate_plane(b, d, c, sh.C, sh.g_gc) * HW;
          const int64_t o_gr = gate_plane(b, d, c, sh.C, sh.g_gr) * HW;
          const int64_t o_u = gate_plane(b, d, c, sh.C, sh.g_u) * HW;
          gather_frame(x + p * HW, geo, f.frame(X));
          gather_frame(lam + o_lam, geo, f.frame(LAM));
          gather_gates(sig_l + o_gl, sig_c + o_gc, sig_r + o_gr, geo, f.frame(SL), f.frame(SC), f.frame(SR));
          gather_frame(u + o_u, geo, f.frame(U));
          gather_frame(gy + p * HW, geo, f.frame(GY));
          // h_row(s) for s in [-1, S): row -1 is all zeros (never read across a restart).
          auto h_row = [&](int64_t s) { return h_rows.data() + (s + 1) * padded_lanes + 1; };
          for (int64_t s = 0; s < S; ++s) {
            const int64_t r = s * L;
            acc_t* h = h_row(s);
            step_states(L, restarts_at(s, chunk), f.frame(LAM) + r, f.frame(X) + r, f.frame(SL) + r, f.frame(SC) + r,
                        f.frame(SR) + r, h_row(s - 1), h);
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
            const acc_t* __restrict__ gy_r = f.frame(GY) + r;
            const acc_t* __restrict__ x_r = f.frame(X) + r;
            const acc_t* __restrict__ lam_r = f.frame(LAM) + r;
            const acc_t* __restrict__ h = h_row(s);
            if (next_applies) {
              for (int64_t l = 0; l < L; ++l) g[l] = u_r[l] * gy_r[l] + next_c[l] + next_l[l + 1] + next_r[l - 1];
            } else {
              for (int64_t l = 0; l < L; ++l) g[l] = u_r[l] * gy_r[l];
            }
            acc_t* __restrict__ dx_r = f.frame(DX) + r;
            acc_t* __restrict__ dlam_r = f.frame(DLAM) + r;
            acc_t* __restrict__ du_r = f.frame(DU) + r;
            for (int64_t l = 0; l < L; ++l) {
              dx_r[l] = lam_r[l] * g[l];
              dlam_r[l] = x_r[l] * g[l];
              du_r[l] = gy_r[l] * h[l];
            }
            acc_t* __restrict__ dgl_r = f.frame(DGL) + r;
            acc_t* __restrict__ dgc_r = f.frame(DGC) + r;
            acc_t* __restrict__ dgr_r = f.frame(DGR) + r;
            if (restart) {
              for (int64_t l = 0; l < L; ++l) dgl_r[l] = dgc_r[l] = dgr_r[l] = acc_t(0);
              continue;  // the step before this one receives nothing through A_s
            }
            const acc_t* __restrict__ sl_r = f.frame(SL) + r;
            const acc_t* __restrict__ sc_r = f.frame(SC) + r;
            const acc_t* __restrict__ sr_r = f.frame(SR) + r;
            const acc_t* __restrict__ hp = h_row(s - 1);
            for (int64_t l = 0; l < L; ++l) {
              const acc_t inv_total = acc_t(1) / (sl_r[l] + sc_r[l] + sr_r[l]);
              const acc_t wl = sl_r[l] * inv_total, wc = sc_r[l] * inv_total, wr = sr_r[l] * inv_total;
              const acc_t dwl = g[l] * hp[l - 1], dwc = g[l] * hp[l], dwr = g[l] * hp[l + 1];
              const acc_t dot = wl * dwl + wc * dwc + wr * dwr;
              dgl_r[l] = wl * (acc_t(1) - sl_r[l]) * (dwl - dot);
              dgc_r[l] = wc * (acc_t(1) - sc_r[l]) * (dwc - dot);
              dgr_r[l] = wr * (acc_t(1) - sr_r[l]) * (dwr - dot);
              next_l[l] = wl * g[l];
              next_c[l] = wc * g[l];
              next_r[l] = wr * g[l];
            }
          }
          scatter_add_frame(f.frame(DX), geo, dx_plane.data());
          scatter_add_frame(f.frame(DLAM), geo, d_lam + o_lam);
          scatter_add_frame(f.frame(DGL), geo, d_gl + o_gl);
          scatter_add_frame(f.frame(DGC), geo, d_gc + o_gc);
          scatter_add_frame(f.frame(DGR), geo, d_gr + o_gr);
          scatter_add_frame(f.frame(DU), geo, d_u + o_u);
        }
        scalar_t* dxp = d_x + p * HW;
        for (int64_t i = 0; i < HW; ++i) dxp[i] = static_cast<scalar_t>(dx_plane[i]);
      }
    }
  });
}

// The gates' sigmoids in the compute dtype, by ATen's vectorised (SIMD, multi-threaded) sigmoid:
// the kernels below then only mask and normalise, which keeps their per-element work to a few
// multiply-adds (a scalar exp per gate in the scan loops made the op exp-bound on CPU).
at::Tensor gate_sigmoid(const at::Tensor& logits) {
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::sigmoid(logits.to(acc_dtype)).contiguous();
}

at::Tensor gspn_scan_fwd_cpu(const at::Tensor& x_in, const at::Tensor& lam_in, const at::Tensor& gl_in,
                             const at::Tensor& gc_in, const at::Tensor& gr_in, const at::Tensor& u_in,
                             int64_t chunk) {
  const ScanShape sh = check_inputs(x_in, lam_in, gl_in, gc_in, gr_in, u_in, chunk);
  auto x = x_in.contiguous(), lam = lam_in.contiguous(), gl = gl_in.contiguous(), gc = gc_in.contiguous(),
       gr = gr_in.contiguous(), u = u_in.contiguous();
  auto y = at::empty_like(x);
  if (y.numel() == 0) return y;
  const auto sig_l = gate_sigmoid(gl), sig_c = gate_sigmoid(gc), sig_r = gate_sigmoid(gr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_fwd_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(), sig_l.data_ptr<acc_t>(),
                             sig_c.data_ptr<acc_t>(), sig_r.data_ptr<acc_t>(), u.data_ptr<scalar_t>(),
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
  auto acc_zeros = [&](const at::Tensor& t) { return at::zeros(t.sizes(), t.options().dtype(acc_dtype)); };
  auto d_x = at::empty_like(x);
  auto d_lam = acc_zeros(lam), d_gl = acc_zeros(gl), d_gc = acc_zeros(gc), d_gr = acc_zeros(gr), d_u = acc_zeros(u);
  if (x.numel() > 0) {
    const auto sig_l = gate_sigmoid(gl), sig_c = gate_sigmoid(gc), sig_r = gate_sigmoid(gr);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_bwd_cpu", [&] {
      using acc_t = acc_type_t<scalar_t>;
      backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(),
                                sig_l.data_ptr<acc_t>(), sig_c.data_ptr<acc_t>(), sig_r.data_ptr<acc_t>(),
                                u.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(), d_lam.data_ptr<acc_t>(),
                                d_gl.data_ptr<acc_t>(), d_gc.data_ptr<acc_t>(), d_gr.data_ptr<acc_t>(),
                                d_u.data_ptr<acc_t>(), sh, chunk);
    });
  }
  const auto dt = x.scalar_type();
  return {d_x, d_lam.to(dt), d_gl.to(dt), d_gc.to(dt), d_gr.to(dt), d_u.to(dt)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gspn, m) {
  m.def("gspn_scan_fwd(Tensor x, Tensor lam, Tensor gl, Tensor gc, Tensor gr, Tensor u, int chunk) -> Tensor");
  m.def(
      "gspn_scan_bwd(Tensor grad_y, Tensor x, Tensor lam, Tensor gl, Tensor gc, Tensor gr, Tensor u, int chunk)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gspn, CPU, m) {
  m.impl("gspn_scan_fwd", &gspn_scan_fwd_cpu);
  m.impl("gspn_scan_bwd", &gspn_scan_bwd_cpu);
}

}  // namespace gspn
