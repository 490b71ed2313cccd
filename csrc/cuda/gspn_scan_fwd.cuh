// The fused GSPN scan's forward kernel: y = sum over the four directions of u * h (layout and memory
// choices: gspn_scan_kernel.cuh). Launched by gspn_scan_cuda.cu with one block per (batch, channel).
#pragma once

#include "gspn_scan_kernel.cuh"

namespace gspn {
namespace cuda_kernels {

template <typename scalar_t>
GSPN_GLOBAL void gspn_scan_fwd_kernel(FwdParams<scalar_t> p) {
  GSPN_DYNAMIC_SMEM(float, smem);
  const BlockFrame f = block_frame(p.in);
  const int64_t HW = f.HW, b = f.b, c = f.c;
  const int P = f.P, pitch = f.pitch, T = f.T;
  const DirectionGroup& group = f.group;
  float* h_rows = smem;  // 2 padded state rows: step s in row s & 1
  float* t_drive = h_rows + 2 * P;
  float* t_wl = t_drive + pitch * T;
  float* t_wc = t_wl + pitch * T;
  float* t_wr = t_wc + pitch * T;
  float* t_u = t_wr + pitch * T;  // u, then u * h

  const scalar_t* xp = p.in.x + f.plane * HW;
  float* y_acc = p.y_acc + group.slot * HW;
  scalar_t* y = p.y + f.plane * HW;
  for (int d = group.first; d < group.last; ++d) {
    const DirectionView<scalar_t> v = direction_view(p.in, b, c, d);
    const int L = v.lanes;
    if (threadIdx.x < 2) h_rows[threadIdx.x * P] = h_rows[threadIdx.x * P + L + 1] = 0.f;
    RestartClock clock(0, p.in.chunk);
    for (int s0 = 0; s0 < v.steps; s0 += T) {
      const int n = v.steps - s0 < T ? v.steps - s0 : T;
      ElementOperands<scalar_t> r[kLoadBatch];
      scalar_t ru[kLoadBatch];
      for_tile_elements(
          d, n, L,
          [&](int i, int k, int l) {
            const int o = v.offset(s0 + k, l);
            r[i].load(v, xp, o);
            ru[i] = v.u[o];
          },
          [&](int i, int k, int l) {
            const int t = k * pitch + l;
            r[i].weights(l, L, t_wl[t], t_wc[t], t_wr[t]);
            t_drive[t] = static_cast<float>(r[i].lam) * static_cast<float>(r[i].x);
            t_u[t] = static_cast<float>(ru[i]);
          });
      __syncthreads();
      scan_tile_forward(
          [&](int t) { return t_drive[t]; }, t_wl, t_wc, t_wr, pitch, n, L, clock,
          [&](int k, const float*& prev, float*& next) {
            prev = h_rows + ((s0 + k + 1) & 1) * P;
            next = h_rows + ((s0 + k) & 1) * P;
          },
          [&](int t, float h) { t_u[t] *= h; });
      with_direction_sum(group, d, [&](auto mode) {
        for_tile_elements(d, n, L, [](int, int, int) {}, [&](int, int k, int l) {
          accumulate_direction<decltype(mode)::value>(v.offset(s0 + k, l), t_u[k * pitch + l], y_acc, y);
        });
      });
      __syncthreads();
    }
  }
}

}  // namespace cuda_kernels
}  // namespace gspn
