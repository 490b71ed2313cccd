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
  using namespace bwd_slot;
  // Carries of step s (left, centre, right: lane l's own products at slot l + 1) in set s & 1; the first
  // sweep uses the first two rows as its state rows.
  float* carries = smem;
  float* h_rows = carries;
  float* t_h = carries + kBwdCarryRows * P;  // T + 1 padded rows: the states of steps s0 - 1 .. s0 + n - 1
  float* tile = t_h + (T + 1) * P;           // pitch x T elements of kCount slots (bwd_slot)

  const scalar_t* xp = register_pointer(p.in.x + f.plane * HW);
  const scalar_t* gyp = register_pointer(p.gy + f.plane * HW);
  float* dx_acc = register_pointer(p.dx_acc + group.slot * HW);
  scalar_t* dx = register_pointer(p.dx + f.plane * HW);
  float* checkpoints = p.checkpoints + group.slot * checkpoint_floats(f.max_lanes, T);
  for (int d = group.first; d < group.last; ++d) {
    const DirectionView<scalar_t> v = direction_view(p.in, b, c, d);
    const int L = v.lanes;
    const int tiles = (v.steps + T - 1) / T;
    grad_t* d_gates[5];  // this direction's planes of d_lam, d_gl, d_gc, d_gr, d_u
#pragma unroll
    for (int k = 0; k < 5; ++k) d_gates[k] = register_pointer(static_cast<grad_t*>(p.d_gates[k]) + v.gate_index * HW);

    // Sweep 1: the forward recurrence, keeping the state at the end of every tile but the last.
    if (threadIdx.x < 2) h_rows[threadIdx.x * P] = h_rows[threadIdx.x * P + L + 1] = 0.f;
    RestartClock clock(0, p.in.chunk);
    for (int ti = 0; ti < tiles; ++ti) {
      const int s0 = ti * T;
      const int n = v.steps - s0 < T ? v.steps - s0 : T;
      ElementOperands<scalar_t> r[kLoadBatch];
      for_tile_elements(
          v, d, s0, n, pitch, [&](int i, const TileElement& e) { r[i].load(v, xp, e.o); },
          [&](int i, const TileElement& e) {
            float* slot = tile + e.t * kCount;
            r[i].weights(e.l, L, slot);
            slot[kX] = static_cast<float>(r[i].lam) * static_cast<float>(r[i].x);  // the drive, in x's slot
          });
      __syncthreads();
      scan_tile_forward<kCount>(
          tile, pitch, n, L, clock, [](const float* e) { return e[kX]; },
          [&](int k, const float*& prev, float*& next) {
            prev = h_rows + ((s0 + k + 1) & 1) * P;
            next = h_rows + ((s0 + k) & 1) * P;
          },
          [](float*, float) {});
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
          v, d, s0, n, pitch,
          [&](int i, const TileElement& e) {
            r[i].load(v, xp, e.o);
            ru[i] = v.u[e.o];
            rgy[i] = gyp[e.o];
          },
          [&](int i, const TileElement& e) {
            float* slot = tile + e.t * kCount;
            r[i].weights(e.l, L, slot, slot + kSlopes);
            slot[kX] = static_cast<float>(r[i].x);
            slot[kLam] = static_cast<float>(r[i].lam);
            slot[kU] = static_cast<float>(ru[i]);
            slot[kGy] = static_cast<float>(rgy[i]);
          });
      for (int l = threadIdx.x; l < L; l += blockDim.x) t_h[l + 1] = ti > 0 ? checkpoints[(ti - 1) * L + l] : 0.f;
      __syncthreads();

      // The tile's states, into t_h rows 1..n (row 0: the checkpoint of step s0 - 1).
      RestartClock tile_clock(s0, p.in.chunk);
      scan_tile_forward<kCount>(
          tile, pitch, n, L, tile_clock, [](const float* e) { return e[kLam] * e[kX]; },
          [&](int k, const float*& prev, float*& next) {
            prev = t_h + k * P;
            next = t_h + (k + 1) * P;
          },
          [](float*, float) {});

      // The adjoint over the tile's steps, last first; each step's gradients overwrite its tile slots.
      RestartClock step_clock(s0 + n - 1, p.in.chunk);
      for (int k = n - 1; k >= 0; --k) {
        const int s = s0 + k;
        const bool restart = step_clock.restarts();
        const float* in = carries + ((s + 1) & 1) * 3 * P;  // carries of step s + 1
        float* out = carries + (s & 1) * 3 * P;
        const float* h_prev = t_h + k * P;
        for (int l = threadIdx.x; l < L; l += blockDim.x) {
          float* e = tile + (k * pitch + l) * kCount;
          const float gy = e[kGy];
          const float g = adjoint<float>(e[kU] * gy, in[l + 2], in[P + l + 1], in[2 * P + l]);
          const float wl = e[kSlotWl], wc = e[kSlotWc], wr = e[kSlotWr];
          float dgl = 0.f, dgc = 0.f, dgr = 0.f, cl = 0.f, cc = 0.f, cr = 0.f;
          if (!restart) {
            normalized_weights_backward<float>(e + kSlopes, wl, wc, wr, g * h_prev[l], g * h_prev[l + 1],
                                               g * h_prev[l + 2], dgl, dgc, dgr);
            cl = wl * g;
            cc = wc * g;
            cr = wr * g;
          }
          out[l + 1] = cl;
          out[P + l + 1] = cc;
          out[2 * P + l + 1] = cr;
          e[kU] = gy * h_prev[P + l + 1];  // h of step s: row k + 1
          e[kX] *= g;
          e[kLam] *= g;
          e[kSlotWl] = dgl;
          e[kSlotWc] = dgc;
          e[kSlotWr] = dgr;
        }
        step_clock.backward();
        __syncthreads();
      }

      // Coalesced write-out: dx summed over the directions, the gate gradients of this direction.
      with_direction_sum(group, d, [&](auto mode) {
        for_tile_elements(v, d, s0, n, pitch, [](int, const TileElement&) {}, [&](int, const TileElement& e) {
          const float* slot = tile + e.t * kCount;
          accumulate_direction<decltype(mode)::value>(e.o, slot[kLam], dx_acc, dx);
          d_gates[0][e.o] = static_cast<grad_t>(slot[kX]);
          d_gates[1][e.o] = static_cast<grad_t>(slot[kSlotWl]);
          d_gates[2][e.o] = static_cast<grad_t>(slot[kSlotWc]);
          d_gates[3][e.o] = static_cast<grad_t>(slot[kSlotWr]);
          d_gates[4][e.o] = static_cast<grad_t>(slot[kU]);
        });
      });
      __syncthreads();
    }
  }
}

}  // namespace cuda_kernels
}  // namespace gspn
