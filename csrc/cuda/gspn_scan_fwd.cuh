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
  using namespace fwd_slot;
  float* h_rows = smem;      // 2 padded state rows: step s in row s & 1
  float* tile = h_rows + 2 * P;  // pitch x T elements of kCount slots (fwd_slot)

  const scalar_t* xp = register_pointer(p.in.x + f.plane * HW);
  float* y_acc = register_pointer(p.y_acc + group.slot * HW);
  scalar_t* y = register_pointer(p.y + f.plane * HW);
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
          v, d, s0, n, pitch,
          [&](int i, const TileElement& e) {
            r[i].load(v, xp, e.o);
            ru[i] = v.u[e.o];
          },
          [&](int i, const TileElement& e) {
            float* slot = tile + e.t * kCount;
            r[i].weights(e.l, L, slot);
            slot[kDrive] = static_cast<float>(r[i].lam) * static_cast<float>(r[i].x);
            slot[kU] = static_cast<float>(ru[i]);
          });
      __syncthreads();
      scan_tile_forward<kCount>(
          tile, pitch, n, L, clock, [](const float* e) { return e[kDrive]; },
          [&](int k, const float*& prev, float*& next) {
            prev = h_rows + ((s0 + k + 1) & 1) * P;
            next = h_rows + ((s0 + k) & 1) * P;
          },
          [](float* e, float h) { e[kU] *= h; });
      with_direction_sum(group, d, [&](auto mode) {
        for_tile_elements(v, d, s0, n, pitch, [](int, const TileElement&) {}, [&](int, const TileElement& e) {
          accumulate_direction<decltype(mode)::value>(e.o, tile[e.t * kCount + kU], y_acc, y);
        });
      });
      __syncthreads();
    }
  }
}

}  // namespace cuda_kernels
}  // namespace gspn
