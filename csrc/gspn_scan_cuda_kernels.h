// The fused GSPN scan's CUDA kernels (forward and backward) and the arithmetic of their launch
// (threads_for, pick_tile, shared-memory sizes), kept apart from the host code in
// csrc/cuda/gspn_scan_cuda.cu so that tests/cuda_emulation/ can also compile them as plain C++
// and run every thread of a block as a fiber (GSPN_CUDA_EMULATION), and
// tests/test_cuda_resources.py can read ptxas's register report without ATen. The layout of the
// work and the memory choices are explained at the top of csrc/cuda/gspn_scan_cuda.cu.
#pragma once

#include <cstdint>

#include "cuda/kernel_macros.h"
#include "gspn_scan_common.h"

namespace gspn {
namespace cuda_kernels {

constexpr int kMaxTile = 16;

struct GatePlanes {
  int64_t lam, gl, gc, gr, u;  // plane indices into the (B, 4, G, H, W) tensors
};

GSPN_DEVICE GatePlanes gate_planes(const ScanShape& sh, int64_t b, int d, int64_t c) {
  return GatePlanes{gate_plane(b, d, c, sh.C, sh.g_lam), gate_plane(b, d, c, sh.C, sh.g_gl),
                    gate_plane(b, d, c, sh.C, sh.g_gc), gate_plane(b, d, c, sh.C, sh.g_gr),
                    gate_plane(b, d, c, sh.C, sh.g_u)};
}

// The i-th element of a staged tile of n_steps steps x L lanes, in the order that makes
// consecutive i consecutive in global memory (see the layout note above). 32-bit: a tile holds
// at most kMaxTile x (max lanes) elements, and 64-bit division is slow on the GPU.
GSPN_DEVICE void tile_coords(int d, int i, int L, int n_steps, int& k, int& l) {
  if (d < 2) {
    k = i / L;
    l = i % L;
  } else {
    l = i / n_steps;
    k = i % n_steps;
  }
}

template <typename scalar_t>
GSPN_GLOBAL void gspn_scan_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                                     const scalar_t* __restrict__ gl, const scalar_t* __restrict__ gc,
                                     const scalar_t* __restrict__ gr, const scalar_t* __restrict__ u,
                                     float* y_acc, scalar_t* y, ScanShape sh, int64_t chunk, int tile) {
  GSPN_DYNAMIC_SMEM(float, smem);
  const int64_t H = sh.H, W = sh.W, HW = H * W;
  const int64_t max_lanes = H > W ? H : W;
  const int pitch = static_cast<int>(max_lanes) + 1;  // tile row pitch; +1 spreads the horizontal staging over banks
  float* h_buf = smem;                  // 2 x max_lanes
  float* t_drive = h_buf + 2 * max_lanes;
  float* t_wl = t_drive + pitch * tile;
  float* t_wc = t_wl + pitch * tile;
  float* t_wr = t_wc + pitch * tile;
  float* t_u = t_wr + pitch * tile;  // u, then u * h

  const int64_t p = blockIdx.x;
  const int64_t b = p / sh.C, c = p % sh.C;
  const scalar_t* xp = x + p * HW;
  for (int d = 0; d < kDirections; ++d) {
    const ScanGeometry geo = scan_geometry(d, H, W);
    const int L = static_cast<int>(geo.lanes);
    const GatePlanes gp = gate_planes(sh, b, d, c);
    const scalar_t* lam_p = lam + gp.lam * HW;
    const scalar_t* gl_p = gl + gp.gl * HW;
    const scalar_t* gc_p = gc + gp.gc * HW;
    const scalar_t* gr_p = gr + gp.gr * HW;
    const scalar_t* u_p = u + gp.u * HW;
    int cur = 0;
    for (int64_t s0 = 0; s0 < geo.steps; s0 += tile) {
      const int n = static_cast<int>(geo.steps - s0 < tile ? geo.steps - s0 : tile);
      for (int i = threadIdx.x; i < n * L; i += blockDim.x) {
        int k, l;
        tile_coords(d, i, L, n, k, l);
        const int64_t o = geo.offset(s0 + k, l);
        const int t = k * pitch + l;
        float wl, wc, wr;
        normalized_weights<float>(static_cast<float>(gl_p[o]), static_cast<float>(gc_p[o]),
                                  static_cast<float>(gr_p[o]), l > 0, l < L - 1, wl, wc, wr);
        t_drive[t] = static_cast<float>(lam_p[o]) * static_cast<float>(xp[o]);
        t_wl[t] = wl;
        t_wc[t] = wc;
        t_wr[t] = wr;
        t_u[t] = static_cast<float>(u_p[o]);
      }
      __syncthreads();
      for (int k = 0; k < n; ++k) {
        const bool restart = restarts_at(s0 + k, chunk);
        const float* prev = h_buf + cur * max_lanes;
        float* next = h_buf + (1 - cur) * max_lanes;
        for (int l = threadIdx.x; l < L; l += blockDim.x) {
          const int t = k * pitch + l;
          float h = t_drive[t];
          if (!restart) {
            h += t_wc[t] * prev[l];
            if (l > 0) h += t_wl[t] * prev[l - 1];
            if (l < L - 1) h += t_wr[t] * prev[l + 1];
          }
          next[l] = h;
          t_u[t] *= h;
        }
        cur = 1 - cur;
        __syncthreads();
      }
      for (int i = threadIdx.x; i < n * L; i += blockDim.x) {
        int k, l;
        tile_coords(d, i, L, n, k, l);
        const int64_t o = p * HW + geo.offset(s0 + k, l);
        const float v = t_u[k * pitch + l];
        if (d == 0) {
          y_acc[o] = v;
        } else if (d < kDirections - 1) {
          y_acc[o] += v;
        } else {
          y[o] = static_cast<scalar_t>(y_acc[o] + v);
        }
      }
      __syncthreads();
    }
  }
}

// d_lam .. d_u are per-channel (B, 4, C, H, W) fp32 planes, whatever the inputs' group counts: every
// element is written once, by the block of its (batch, channel), so no two blocks meet and the host
// sums a group's channels afterwards in a fixed order (deterministic; no atomics).
template <typename scalar_t>
GSPN_GLOBAL void gspn_scan_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ lam, const scalar_t* __restrict__ gl,
                                     const scalar_t* __restrict__ gc, const scalar_t* __restrict__ gr,
                                     const scalar_t* __restrict__ u, float* h_scratch, float* dx_acc,
                                     scalar_t* dx, float* d_lam, float* d_gl, float* d_gc, float* d_gr,
                                     float* d_u, ScanShape sh, int64_t chunk, int tile) {
  GSPN_DYNAMIC_SMEM(float, smem);
  const int64_t H = sh.H, W = sh.W, HW = H * W;
  const int64_t max_lanes = H > W ? H : W;
  const int pitch = static_cast<int>(max_lanes) + 1;
  float* g_buf = smem;                       // 2 x max_lanes: adjoint of step s+1 / step s
  float* w_buf = g_buf + 2 * max_lanes;      // 2 x 3 x max_lanes: normalised weights of step s+1 / s
  float* t_x = w_buf + 6 * max_lanes;        // staged tile; slots are reused for the outputs:
  float* t_lam = t_x + pitch * tile;         //   t_x <- dlam, t_lam <- dx,
  float* t_gl = t_lam + pitch * tile;        //   t_gl/t_gc/t_gr <- dgl/dgc/dgr,
  float* t_gc = t_gl + pitch * tile;
  float* t_gr = t_gc + pitch * tile;
  float* t_u = t_gr + pitch * tile;          //   t_u <- du
  float* t_gy = t_u + pitch * tile;
  float* t_h = t_gy + pitch * tile;          // (tile + 1) steps: h of steps s0-1 .. s0+n-1

  const int64_t p = blockIdx.x;
  const int64_t b = p / sh.C, c = p % sh.C;
  const scalar_t* xp = x + p * HW;
  const scalar_t* gyp = gy + p * HW;
  float* hp = h_scratch + p * HW;
  for (int d = 0; d < kDirections; ++d) {
    const ScanGeometry geo = scan_geometry(d, H, W);
    const int L = static_cast<int>(geo.lanes);
    const GatePlanes gp = gate_planes(sh, b, d, c);
    const scalar_t* lam_p = lam + gp.lam * HW;
    const scalar_t* gl_p = gl + gp.gl * HW;
    const scalar_t* gc_p = gc + gp.gc * HW;
    const scalar_t* gr_p = gr + gp.gr * HW;
    const scalar_t* u_p = u + gp.u * HW;

    // Phase A: recompute this direction's hidden states into the scratch plane.
    int cur = 0;
    for (int64_t s0 = 0; s0 < geo.steps; s0 += tile) {
      const int n = static_cast<int>(geo.steps - s0 < tile ? geo.steps - s0 : tile);
      for (int i = threadIdx.x; i < n * L; i += blockDim.x) {
        int k, l;
        tile_coords(d, i, L, n, k, l);
        const int64_t o = geo.offset(s0 + k, l);
        const int t = k * pitch + l;
        float wl, wc, wr;
        normalized_weights<float>(static_cast<float>(gl_p[o]), static_cast<float>(gc_p[o]),
                                  static_cast<float>(gr_p[o]), l > 0, l < L - 1, wl, wc, wr);
        t_x[t] = static_cast<float>(lam_p[o]) * static_cast<float>(xp[o]);
        t_gl[t] = wl;
        t_gc[t] = wc;
        t_gr[t] = wr;
      }
      __syncthreads();
      for (int k = 0; k < n; ++k) {
        const bool restart = restarts_at(s0 + k, chunk);
        const float* prev = g_buf + cur * max_lanes;
        float* next = g_buf + (1 - cur) * max_lanes;
        for (int l = threadIdx.x; l < L; l += blockDim.x) {
          const int t = k * pitch + l;
          float h = t_x[t];
          if (!restart) {
            h += t_gc[t] * prev[l];
            if (l > 0) h += t_gl[t] * prev[l - 1];
            if (l < L - 1) h += t_gr[t] * prev[l + 1];
          }
          next[l] = h;
          t_h[t] = h;
        }
        cur = 1 - cur;
        __syncthreads();
      }
      for (int i = threadIdx.x; i < n * L; i += blockDim.x) {
        int k, l;
        tile_coords(d, i, L, n, k, l);
        hp[geo.offset(s0 + k, l)] = t_h[k * pitch + l];
      }
      __syncthreads();
    }

    // Phase B: adjoint sweep from the last step back, g_s = u_s gy_s + A_{s+1}^T g_{s+1}.
    cur = 0;
    const int64_t last_tile = ((geo.steps - 1) / tile) * tile;
    for (int64_t s0 = last_tile; s0 >= 0; s0 -= tile) {
      const int n = static_cast<int>(geo.steps - s0 < tile ? geo.steps - s0 : tile);
      for (int i = threadIdx.x; i < n * L; i += blockDim.x) {
        int k, l;
        tile_coords(d, i, L, n, k, l);
        const int64_t o = geo.offset(s0 + k, l);
        const int t = k * pitch + l;
        t_x[t] = static_cast<float>(xp[o]);
        t_lam[t] = static_cast<float>(lam_p[o]);
        t_gl[t] = static_cast<float>(gl_p[o]);
        t_gc[t] = static_cast<float>(gc_p[o]);
        t_gr[t] = static_cast<float>(gr_p[o]);
        t_u[t] = static_cast<float>(u_p[o]);
        t_gy[t] = static_cast<float>(gyp[o]);
      }
      // h of steps s0-1 .. s0+n-1 at tile rows 0 .. n (row 0 only exists when s0 > 0).
      const int first = s0 > 0 ? 0 : 1;
      for (int i = threadIdx.x; i < (n + 1 - first) * L; i += blockDim.x) {
        int k, l;
        tile_coords(d, i, L, n + 1 - first, k, l);
        k += first;
        t_h[k * pitch + l] = hp[geo.offset(s0 - 1 + k, l)];
      }
      __syncthreads();
      for (int k = n - 1; k >= 0; --k) {
        const int64_t s = s0 + k;
        const bool next_applies = s + 1 < geo.steps && !restarts_at(s + 1, chunk);
        const bool restart = restarts_at(s, chunk);
        const float* g_next = g_buf + cur * max_lanes;
        float* g_cur = g_buf + (1 - cur) * max_lanes;
        const float* wl_next = w_buf + cur * 3 * max_lanes;
        const float* wc_next = wl_next + max_lanes;
        const float* wr_next = wc_next + max_lanes;
        float* wl_cur = w_buf + (1 - cur) * 3 * max_lanes;
        float* wc_cur = wl_cur + max_lanes;
        float* wr_cur = wc_cur + max_lanes;
        for (int l = threadIdx.x; l < L; l += blockDim.x) {
          const int t = k * pitch + l;
          const float gy_v = t_gy[t];
          float g = t_u[t] * gy_v;
          if (next_applies) {
            g += wc_next[l] * g_next[l];
            if (l > 0) g += wr_next[l - 1] * g_next[l - 1];
            if (l < L - 1) g += wl_next[l + 1] * g_next[l + 1];
          }
          g_cur[l] = g;
          const float* h_prev = t_h + k * pitch;  // step s-1
          const float h = t_h[(k + 1) * pitch + l];
          const float lg = t_gl[t], cg = t_gc[t], rg = t_gr[t];
          normalized_weights<float>(lg, cg, rg, l > 0, l < L - 1, wl_cur[l], wc_cur[l], wr_cur[l]);
          float dgl = 0.f, dgc = 0.f, dgr = 0.f;
          if (!restart) {
            const float dwl = l > 0 ? g * h_prev[l - 1] : 0.f;
            const float dwc = g * h_prev[l];
            const float dwr = l < L - 1 ? g * h_prev[l + 1] : 0.f;
            normalized_weights_backward<float>(lg, cg, rg, wl_cur[l], wc_cur[l], wr_cur[l], l > 0, l < L - 1, dwl,
                                               dwc, dwr, dgl, dgc, dgr);
          }
          t_u[t] = gy_v * h;
          const float x_v = t_x[t];
          t_x[t] = x_v * g;
          t_lam[t] = t_lam[t] * g;
          t_gl[t] = dgl;
          t_gc[t] = dgc;
          t_gr[t] = dgr;
        }
        cur = 1 - cur;
        __syncthreads();
      }
      for (int i = threadIdx.x; i < n * L; i += blockDim.x) {
        int k, l;
        tile_coords(d, i, L, n, k, l);
        const int64_t o = geo.offset(s0 + k, l);
        const int t = k * pitch + l;
        const int64_t ox = p * HW + o;
        if (d == 0) {
          dx_acc[ox] = t_lam[t];
        } else if (d < kDirections - 1) {
          dx_acc[ox] += t_lam[t];
        } else {
          dx[ox] = static_cast<scalar_t>(dx_acc[ox] + t_lam[t]);
        }
        // Per-channel planes, each written by this block alone: grouped sums are taken afterwards.
        const int64_t og = (gate_plane(b, d, c, sh.C, sh.C)) * HW + o;
        d_lam[og] = t_x[t];
        d_gl[og] = t_gl[t];
        d_gc[og] = t_gc[t];
        d_gr[og] = t_gr[t];
        d_u[og] = t_u[t];
      }
      __syncthreads();
    }
  }
}

// Threads of one block: one per lane, rounded up to whole warps, between 64 and 256.
inline int threads_for(int64_t max_lanes) {
  const int64_t rounded = (max_lanes + 31) / 32 * 32;
  return static_cast<int>(rounded < 64 ? 64 : (rounded > 256 ? 256 : rounded));
}

// Shared-memory floats of one block for a tile of `tile` steps.
inline int64_t fwd_smem_floats(int64_t max_lanes, int64_t tile) { return 2 * max_lanes + 5 * (max_lanes + 1) * tile; }
inline int64_t bwd_smem_floats(int64_t max_lanes, int64_t tile) {
  return 8 * max_lanes + 7 * (max_lanes + 1) * tile + (max_lanes + 1) * (tile + 1);
}

// The largest tile (<= kMaxTile steps) whose staging fits `smem_limit` bytes, or 0 if none does.
template <typename SmemFloats>
int pick_tile(int64_t max_lanes, SmemFloats smem_floats, size_t smem_limit) {
  for (int tile = kMaxTile; tile >= 1; tile /= 2) {
    if (static_cast<size_t>(smem_floats(max_lanes, tile)) * sizeof(float) <= smem_limit) return tile;
  }
  return 0;
}

}  // namespace cuda_kernels
}  // namespace gspn
