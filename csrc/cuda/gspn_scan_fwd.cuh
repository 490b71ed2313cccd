// The fused GSPN scan's forward kernel: y = sum over the four directions of u * h (layout and memory
// choices: gspn_scan_kernel.cuh). Launched by gspn_scan_cuda.cu with one block per (batch, channel).
#pragma once

#include "gspn_scan_kernel.cuh"

namespace gspn {
namespace cuda_kernels {

template <typename scalar_t>
GSPN_GLOBAL void gspn_scan_fwd_kernel(FwdParams<scalar_t> p) {
  GSPN_DYNAMIC_SMEM(float, smem);
  const ScanShape& sh = p.in.shape;
  const int64_t HW = sh.H * sh.W;
  const int max_lanes = static_cast<int>(sh.H > sh.W ? sh.H : sh.W);
  const int P = static_cast<int>(padded_row(max_lanes)), pitch = static_cast<int>(tile_pitch(max_lanes));
  const int T = p.in.tile;
  float* h_rows = smem;  // 2 padded state rows: step s in row s & 1
  float* t_drive = h_rows + 2 * P;
  float* t_wl = t_drive + pitch * T;
  float* t_wc = t_wl + pitch * T;
  float* t_wr = t_wc + pitch * T;
  float* t_u = t_wr + pitch * T;  // u, then u * h

  const int64_t plane = blockIdx.x;
  const int64_t b = plane / sh.C, c = plane % sh.C;
  const scalar_t* xp = p.in.x + plane * HW;
  const DirectionGroup group = direction_group(p.in.directions_per_block, plane, sh.B * sh.C);
  float* y_acc = p.y_acc + group.slot * HW;
  scalar_t* y = p.y + plane * HW;
  for (int d = group.first; d < group.last; ++d) {
    const DirectionView<scalar_t> v = direction_view(p.in, b, c, d);
    const int L = v.lanes;
    if (threadIdx.x < 2) h_rows[threadIdx.x * P] = h_rows[threadIdx.x * P + L + 1] = 0.f;
    RestartClock clock(0, p.in.chunk);
    for (int s0 = 0; s0 < v.steps; s0 += T) {
      const int n = v.steps - s0 < T ? v.steps - s0 : T;
      scalar_t rx[kLoadBatch], rlam[kLoadBatch], rgl[kLoadBatch], rgc[kLoadBatch], rgr[kLoadBatch], ru[kLoadBatch];
      for_tile_elements(
          d, n, L,
          [&](int i, int k, int l) {
            const int o = v.offset(s0 + k, l);
            rx[i] = xp[o];
            rlam[i] = v.lam[o];
            rgl[i] = v.gl[o];
            rgc[i] = v.gc[o];
            rgr[i] = v.gr[o];
            ru[i] = v.u[o];
          },
          [&](int i, int k, int l) {
            const int t = k * pitch + l;
            normalized_weights<float>(static_cast<float>(rgl[i]), static_cast<float>(rgc[i]),
                                      static_cast<float>(rgr[i]), l > 0, l < L - 1, t_wl[t], t_wc[t], t_wr[t],
                                      FastExp());
            t_drive[t] = static_cast<float>(rlam[i]) * static_cast<float>(rx[i]);
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
      for_tile_elements(
          d, n, L, [](int, int, int) {},
          [&](int, int k, int l) {
            const int o = v.offset(s0 + k, l);
            const float sum = (d == group.first ? 0.f : y_acc[o]) + t_u[k * pitch + l];
            if (d == kDirections - 1 && group.writes_output) {
              y[o] = static_cast<scalar_t>(sum);
            } else {
              y_acc[o] = sum;
            }
          });
      __syncthreads();
    }
  }
}

}  // namespace cuda_kernels
}  // namespace gspn
