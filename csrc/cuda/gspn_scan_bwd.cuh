// The fused GSPN scan's backward kernel: for each direction, a first sweep that keeps one state
// checkpoint per tile, then the adjoint sweep from the last tile back, each tile's states recomputed in
// shared memory from its checkpoint by the forward recurrence (layout and memory choices:
// gspn_scan_kernel.cuh). Launched by gspn_scan_cuda.cu with one block per (batch, channel).
#pragma once

#include "gspn_scan_kernel.cuh"

namespace gspn {
namespace cuda_kernels {

template <typename scalar_t, bool kDirectGateGrads>
GSPN_GLOBAL void gspn_scan_bwd_kernel(BwdParams<scalar_t> p) {
  using grad_t = std::conditional_t<kDirectGateGrads, scalar_t, float>;
  GSPN_DYNAMIC_SMEM(float, smem);
  const BlockFrame f = block_frame(p.in);
  const int64_t HW = f.HW, b = f.b, c = f.c;
  const int P = f.P, pitch = f.pitch, T = f.T;
  const DirectionGroup& group = f.group;
  // Carries of step s (left, centre, right: lane l's own products at slot l + 1) in set s & 1; the first
  // sweep uses the first two rows as its state rows.
  float* carries = smem;
  float* h_rows = carries;
  float* t_h = carries + kBwdCarryRows * P;  // T + 1 padded rows: the states of steps s0 - 1 .. s0 + n - 1
  float* t_x = t_h + (T + 1) * P;            // tile arrays; the gradients overwrite them in place:
  float* t_lam = t_x + pitch * T;            //   t_x <- dlam, t_lam <- dx's term,
  float* t_wl = t_lam + pitch * T;           //   t_wl, t_wc, t_wr <- dgl, dgc, dgr, t_u <- du
  float* t_wc = t_wl + pitch * T;
  float* t_wr = t_wc + pitch * T;
  float* t_ql = t_wr + pitch * T;
  float* t_qc = t_ql + pitch * T;
  float* t_qr = t_qc + pitch * T;
  float* t_u = t_qr + pitch * T;
  float* t_gy = t_u + pitch * T;

  const scalar_t* xp = p.in.x + f.plane * HW;
  const scalar_t* gyp = p.gy + f.plane * HW;
  float* dx_acc = p.dx_acc + group.slot * HW;
  scalar_t* dx = p.dx + f.plane * HW;
  float* checkpoints = p.checkpoints + group.slot * checkpoint_floats(f.max_lanes, T);
  for (int d = group.first; d < group.last; ++d) {
    const DirectionView<scalar_t> v = direction_view(p.in, b, c, d);
    const int L = v.lanes;
    const int tiles = (v.steps + T - 1) / T;
    grad_t* d_gates[5];  // this direction's planes of d_lam, d_gl, d_gc, d_gr, d_u
#pragma unroll
    for (int k = 0; k < 5; ++k) d_gates[k] = static_cast<grad_t*>(p.d_gates[k]) + v.gate_index * HW;

    // Sweep 1: the forward recurrence, keeping the state at the end of every tile but the last.
    if (threadIdx.x < 2) h_rows[threadIdx.x * P] = h_rows[threadIdx.x * P + L + 1] = 0.f;
    RestartClock clock(0, p.in.chunk);
    for (int ti = 0; ti < tiles; ++ti) {
      const int s0 = ti * T;
      const int n = v.steps - s0 < T ? v.steps - s0 : T;
      ElementOperands<scalar_t> r[kLoadBatch];
      for_tile_elements(
          d, n, L, [&](int i, int k, int l) { r[i].load(v, xp, v.offset(s0 + k, l)); },
          [&](int i, int k, int l) {
            const int t = k * pitch + l;
            r[i].weights(l, L, t_wl[t], t_wc[t], t_wr[t]);
            t_x[t] = static_cast<float>(r[i].lam) * static_cast<float>(r[i].x);
          });
      __syncthreads();
      scan_tile_forward(
          [&](int t) { return t_x[t]; }, t_wl, t_wc, t_wr, pitch, n, L, clock,
          [&](int k, const float*& prev, float*& next) {
            prev = h_rows + ((s0 + k + 1) & 1) * P;
            next = h_rows + ((s0 + k) & 1) * P;
          },
          [](int, float) {});
      if (ti + 1 < tiles) {
        const float* last = h_rows + ((s0 + n - 1) & 1) * P;
        for (int l = threadIdx.x; l < L; l += blockDim.x) checkpoints[ti * L + l] = last[l + 1];
      }
    }

    // Sweep 2: the adjoint, g_s = u_s gy_s + carries of step s + 1, from the last tile back.
    for (int i = threadIdx.x; i < kBwdCarryRows * P; i += blockDim.x) carries[i] = 0.f;
    for (int r = threadIdx.x; r <= T; r += blockDim.x) t_h[r * P] = t_h[r * P + L + 1] = 0.f;
    for (int ti = tiles - 1; ti >= 0; --ti) {
      const int s0 = ti * T;
      const int n = v.steps - s0 < T ? v.steps - s0 : T;
      ElementOperands<scalar_t> r[kLoadBatch];
      scalar_t ru[kLoadBatch], rgy[kLoadBatch];
      for_tile_elements(
          d, n, L,
          [&](int i, int k, int l) {
            const int o = v.offset(s0 + k, l);
            r[i].load(v, xp, o);
            ru[i] = v.u[o];
            rgy[i] = gyp[o];
          },
          [&](int i, int k, int l) {
            const int t = k * pitch + l;
            float slopes[3];
            r[i].weights(l, L, t_wl[t], t_wc[t], t_wr[t], slopes);
            t_ql[t] = slopes[0];
            t_qc[t] = slopes[1];
            t_qr[t] = slopes[2];
            t_x[t] = static_cast<float>(r[i].x);
            t_lam[t] = static_cast<float>(r[i].lam);
            t_u[t] = static_cast<float>(ru[i]);
            t_gy[t] = static_cast<float>(rgy[i]);
          });
      for (int l = threadIdx.x; l < L; l += blockDim.x) t_h[l + 1] = ti > 0 ? checkpoints[(ti - 1) * L + l] : 0.f;
      __syncthreads();

      // The tile's states, into t_h rows 1..n (row 0: the checkpoint of step s0 - 1).
      RestartClock tile_clock(s0, p.in.chunk);
      scan_tile_forward(
          [&](int t) { return t_lam[t] * t_x[t]; }, t_wl, t_wc, t_wr, pitch, n, L, tile_clock,
          [&](int k, const float*& prev, float*& next) {
            prev = t_h + k * P;
            next = t_h + (k + 1) * P;
          },
          [](int, float) {});

      // The adjoint over the tile's steps, last first; each step's gradients overwrite its tile slots.
      RestartClock step_clock(s0 + n - 1, p.in.chunk);
      for (int k = n - 1; k >= 0; --k) {
        const int s = s0 + k;
        const bool restart = step_clock.restarts();
        const float* in = carries + ((s + 1) & 1) * 3 * P;  // carries of step s + 1
        float* out = carries + (s & 1) * 3 * P;
        const float* h_prev = t_h + k * P;
        for (int l = threadIdx.x; l < L; l += blockDim.x) {
          const int t = k * pitch + l;
          const float gy = t_gy[t];
          const float g = adjoint<float>(t_u[t] * gy, in[l + 2], in[P + l + 1], in[2 * P + l]);
          const float wl = t_wl[t], wc = t_wc[t], wr = t_wr[t];
          float dgl = 0.f, dgc = 0.f, dgr = 0.f, cl = 0.f, cc = 0.f, cr = 0.f;
          if (!restart) {
            const float slopes[3] = {t_ql[t], t_qc[t], t_qr[t]};
            normalized_weights_backward<float>(slopes, wl, wc, wr, g * h_prev[l], g * h_prev[l + 1],
                                               g * h_prev[l + 2], dgl, dgc, dgr);
            cl = wl * g;
            cc = wc * g;
            cr = wr * g;
          }
          out[l + 1] = cl;
          out[P + l + 1] = cc;
          out[2 * P + l + 1] = cr;
          t_u[t] = gy * t_h[(k + 1) * P + l + 1];
          t_x[t] = t_x[t] * g;
          t_lam[t] = t_lam[t] * g;
          t_wl[t] = dgl;
          t_wc[t] = dgc;
          t_wr[t] = dgr;
        }
        step_clock.backward();
        __syncthreads();
      }

      // Coalesced write-out: dx summed over the directions, the gate gradients of this direction.
      with_direction_sum(group, d, [&](auto mode) {
        for_tile_elements(d, n, L, [](int, int, int) {}, [&](int, int k, int l) {
          const int o = v.offset(s0 + k, l);
          const int t = k * pitch + l;
          accumulate_direction<decltype(mode)::value>(o, t_lam[t], dx_acc, dx);
          d_gates[0][o] = static_cast<grad_t>(t_x[t]);
          d_gates[1][o] = static_cast<grad_t>(t_wl[t]);
          d_gates[2][o] = static_cast<grad_t>(t_wc[t]);
          d_gates[3][o] = static_cast<grad_t>(t_wr[t]);
          d_gates[4][o] = static_cast<grad_t>(t_u[t]);
        });
      });
      __syncthreads();
    }
  }
}

}  // namespace cuda_kernels
}  // namespace gspn
