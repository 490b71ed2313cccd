// Index arithmetic of the fused four-direction GSPN scan, shared by the CPU kernel
// (csrc/cpu/gspn_scan_cpu.cpp) and the CUDA kernels (csrc/cuda/gspn_scan_*.cuh); the per-element
// math (normalisation, restart predicate) is csrc/scan_math.h.
//
// Contract: dit_gspn/ops/reference.py::gspn_scan_reference. For direction d the scan runs over
// S "steps" and L "lanes" of one (H, W) plane; step s, lane l lives at plane offset
//     origin + s * step_stride + l * lane_stride
// so that the four directions read the original layout with no flipped or transposed copies:
//     d=0 top-down    S=H, L=W, origin 0,         step +W, lane +1
//     d=1 bottom-up   S=H, L=W, origin (H-1)*W,   step -W, lane +1
//     d=2 left-right  S=W, L=H, origin 0,         step +1, lane +W
//     d=3 right-left  S=W, L=H, origin W-1,       step -1, lane +W
// The lane axis is the gates' neighbour axis: wl is 0 on lane 0 and wr is 0 on lane L-1.
#pragma once

#include <cstdint>

#include "scan_math.h"

namespace gspn {

constexpr int kDirections = 4;

struct ScanGeometry {
  int64_t steps;
  int64_t lanes;
  int64_t origin;
  int64_t step_stride;
  int64_t lane_stride;

  GSPN_HD int64_t offset(int64_t s, int64_t l) const { return origin + s * step_stride + l * lane_stride; }
};

GSPN_HD ScanGeometry scan_geometry(int d, int64_t H, int64_t W) {
  switch (d) {
    case 0: return ScanGeometry{H, W, 0, W, 1};
    case 1: return ScanGeometry{H, W, (H - 1) * W, -W, 1};
    case 2: return ScanGeometry{W, H, 0, 1, W};
    default: return ScanGeometry{W, H, W - 1, -1, W};
  }
}

// The sizes every kernel needs; channel groups are per tensor (gate tensors are (B, 4, G, H, W)).
struct ScanShape {
  int64_t B, C, H, W;
  int64_t g_lam, g_gl, g_gc, g_gr, g_u;
};

// Plane index (into a (B, 4, G, H, W) tensor) of direction d's gates for batch b, channel c.
GSPN_HD int64_t gate_plane(int64_t b, int d, int64_t c, int64_t channels, int64_t groups) {
  return (b * kDirections + d) * groups + c / (channels / groups);
}

}  // namespace gspn
