// What the fused GSPN scan's CUDA kernels (gspn_scan_fwd.cuh, gspn_scan_bwd.cuh) share: their
// parameter structs, the walk over a staged tile, the forward recurrence (the forward kernel and the
// backward's recompute run this one function) and the arithmetic of their launch (threads, tile,
// shared memory), which the launchers in gspn_scan_cuda.cu and tests/kernels/cuda_emulation/ use alike.
//
// Layout of the work. A thread block owns one (batch, channel) plane and runs its four directions one
// after the other, so the direction sums (y, and dx in the backward) need no atomics; when there are too
// few planes to fill the GPU (1 x 64 planes on 132 SMs), directions_per_block (direction_split) gives
// each block of a plane one of them (blockIdx.y picks which; 2 works too), each block sums its directions
// into its own fp32 partial map and sum_direction_groups_kernel adds the partial maps in a fixed order.
// The tile is the largest that fits launch_tile's share of an SM: small enough for three blocks per SM when
// there are blocks for them, so that their staging (memory) and scanning (barriers, arithmetic) overlap, and
// for two when there are more blocks than SMs.
// Within a direction the block walks the S scan steps in tiles of T steps; a tile of all L lanes x T
// steps of every input is staged in shared memory with coalesced global reads (consecutive threads
// take consecutive lanes of a step for the vertical scans, consecutive steps of a lane for the
// horizontal ones, whose step axis is the contiguous one), each thread loading kLoadBatch elements
// before it computes on any (normalised gates while staging), then scanned from shared memory, then
// written back coalesced. The previous step's lane vector stays in shared memory (padded with a zero
// on either side, so the neighbour sums have no edge branches). Everything is computed in fp32; offsets
// within a plane are 32-bit (a plane has at most 2048 x 2048 elements), plane bases 64-bit, formed once
// per direction (register_pointer). Staged elements keep their values side by side (fwd_slot, bwd_slot).
//
// Memory: the forward saves only its inputs. The backward recomputes each direction's hidden states:
// a first sweep keeps the state at the end of every tile (an fp32 lane vector per tile: 4/T bytes per
// element), and the adjoint sweep, tile by tile from the last, recomputes the tile's T states in shared
// memory from that checkpoint with the same forward recurrence, then runs the adjoint over them.
// Gate gradients are written in the inputs' dtype when every gate is per-channel; when any is grouped
// (G < C), all five as per-channel fp32 planes that the host sums over each group in a fixed order
// (deterministic; no atomics) or casts.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../gspn_scan_common.h"
#include "kernel_macros.h"

namespace gspn {

// The CUDA kernels' exponential and reciprocal (GSPN_FAST_EXP / GSPN_FAST_RCP), for normalized_weights.
struct FastExp {
  GSPN_DEVICE float operator()(float v) const { return GSPN_FAST_EXP(v); }
};
GSPN_DEVICE float reciprocal_with(const FastExp&, float v) { return GSPN_FAST_RCP(v); }

namespace cuda_kernels {

constexpr int kMaxTile = 16;
constexpr int kLoadBatch = 4;  // elements whose global loads a thread issues before computing on the first

// The six inputs of the op (x is (B, C, H, W); the rest (B, 4, G, H, W)) and what both passes need to know.
template <typename scalar_t>
struct ScanArgs {
  const scalar_t* x;
  const scalar_t* lam;
  const scalar_t* gl;
  const scalar_t* gc;
  const scalar_t* gr;
  const scalar_t* u;
  ScanShape shape;
  int64_t chunk;            // 0: one global scan per direction
  int tile;                 // T, steps per staged tile (pick_tile)
  int directions_per_block; // 4, or 2 / 1 with gridDim.y = 4 / directions_per_block blocks per plane
};

template <typename scalar_t>
struct FwdParams {
  ScanArgs<scalar_t> in;
  float* y_acc;  // the direction sum in fp32 (y itself for fp32 outputs), or the partial maps (direction_group)
  scalar_t* y;
};

// The five gate gradients (d_lam, d_gl, d_gc, d_gr, d_u), each (B, 4, C, H, W) per-channel planes: in the
// inputs' dtype when every gate is per-channel (the kernel's kDirectGateGrads), else fp32 planes that the host
// sums over each group (and casts, for a per-channel gate among grouped ones).
template <typename scalar_t>
struct BwdParams {
  ScanArgs<scalar_t> in;
  const scalar_t* gy;
  float* checkpoints;  // (B*C) x checkpoint_floats(max_lanes, tile): the state at the end of each tile
  float* dx_acc;       // the direction sum of dx in fp32 (dx itself for fp32), or the partial maps
  scalar_t* dx;
  void* d_gates[5];    // scalar_t* with kDirectGateGrads, else float*
};

// The directions this block runs and where their sum goes: all four into the plane's fp32 sum map, the
// last one writing the output, when one block runs a plane; else group blockIdx.y's directions into its
// partial map (groups x planes x HW floats), which sum_direction_groups_kernel adds up. `slot` also
// indexes the block's checkpoint buffer.
struct DirectionGroup {
  int first, last;     // directions [first, last)
  int64_t slot;        // plane, or group * planes + plane
  bool writes_output;  // the last direction writes the output (one group per plane)
};

GSPN_DEVICE DirectionGroup direction_group(int per_block, int64_t plane, int64_t planes) {
  const int g = static_cast<int>(blockIdx.y);
  const bool whole = per_block == kDirections;
  return DirectionGroup{g * per_block, (g + 1) * per_block, whole ? plane : g * planes + plane, whole};
}

// out[i] = the sum over the groups' partial maps in group order, for the n elements of one map.
template <typename scalar_t>
GSPN_GLOBAL void sum_direction_groups_kernel(const float* __restrict__ partial, int groups, int64_t n,
                                             scalar_t* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float sum = partial[i];
    for (int g = 1; g < groups; ++g) sum += partial[g * n + i];
    out[i] = static_cast<scalar_t>(sum);
  }
}

// One direction's view of one plane: its geometry (32-bit, within the plane) and its gate planes.
template <typename scalar_t>
struct DirectionView {
  int steps, lanes, origin, step_stride, lane_stride;
  const scalar_t *lam, *gl, *gc, *gr, *u;
  int64_t gate_index;  // (b * 4 + d) * C + c: this direction's plane in a per-channel (B, 4, C, H, W) map
};

template <typename scalar_t>
GSPN_DEVICE DirectionView<scalar_t> direction_view(const ScanArgs<scalar_t>& a, int64_t b, int64_t c, int d) {
  const ScanShape& sh = a.shape;
  const ScanGeometry g = scan_geometry(d, sh.H, sh.W);
  const int64_t HW = sh.H * sh.W;
  DirectionView<scalar_t> v;
  v.steps = static_cast<int>(g.steps);
  v.lanes = static_cast<int>(g.lanes);
  v.origin = static_cast<int>(g.origin);
  v.step_stride = static_cast<int>(g.step_stride);
  v.lane_stride = static_cast<int>(g.lane_stride);
  v.lam = register_pointer(a.lam + gate_plane(b, d, c, sh.C, sh.g_lam) * HW);
  v.gl = register_pointer(a.gl + gate_plane(b, d, c, sh.C, sh.g_gl) * HW);
  v.gc = register_pointer(a.gc + gate_plane(b, d, c, sh.C, sh.g_gc) * HW);
  v.gr = register_pointer(a.gr + gate_plane(b, d, c, sh.C, sh.g_gr) * HW);
  v.u = register_pointer(a.u + gate_plane(b, d, c, sh.C, sh.g_u) * HW);
  v.gate_index = gate_plane(b, d, c, sh.C, sh.C);
  return v;
}

// One element of a staged tile as for_tile_elements visits it: its offset in the plane, its tile element
// t = k * pitch + l (step k, lane l) and its lane.
struct TileElement {
  int o, t, l;
};

// This thread's elements of a staged tile of n steps x L lanes, in the order that makes consecutive
// threads touch consecutive global addresses: lanes fastest for the vertical scans (d < 2), steps fastest
// for the horizontal ones. Starts at element threadIdx.x and advances blockDim.x elements per next(): o, t
// and l each by a fixed amount, and by a second one when the fast index wraps (two divisions per tile, no
// multiplication per element).
struct TileWalk {
  TileElement e;
  int fast, fast_size, dfast;
  TileElement step, wrap;

  // origin: the plane offset of the tile's step 0, lane 0.
  GSPN_DEVICE TileWalk(bool lanes_fast, int n, int L, int pitch, int origin, int step_stride, int lane_stride) {
    const TileElement per_step{step_stride, pitch, 0}, per_lane{lane_stride, 1, 1};
    const TileElement f = lanes_fast ? per_lane : per_step, s = lanes_fast ? per_step : per_lane;
    const int tid = static_cast<int>(threadIdx.x), threads = static_cast<int>(blockDim.x);
    fast_size = lanes_fast ? L : n;
    fast = tid % fast_size;
    dfast = threads % fast_size;
    const int slow = tid / fast_size, dslow = threads / fast_size;
    e = TileElement{origin + fast * f.o + slow * s.o, fast * f.t + slow * s.t, fast * f.l + slow * s.l};
    step = TileElement{dfast * f.o + dslow * s.o, dfast * f.t + dslow * s.t, dfast * f.l + dslow * s.l};
    wrap = TileElement{s.o - fast_size * f.o, s.t - fast_size * f.t, s.l - fast_size * f.l};
  }
  GSPN_DEVICE void next() {
    fast += dfast;
    e.o += step.o;
    e.t += step.t;
    e.l += step.l;
    if (fast >= fast_size) {
      fast -= fast_size;
      e.o += wrap.o;
      e.t += wrap.t;
      e.l += wrap.l;
    }
  }
};

// A staged tile holds each element's values side by side (AoS): element t's kSlots floats start at
// tile + t * kSlots, so one address reaches all of them (constant offsets), and an odd kSlots keeps 32
// consecutive elements, or 32 elements a (odd) pitch apart, in 32 different banks. The normalised weights
// take the first three slots in both kernels (scan_tile_forward reads them there).
constexpr int kSlotWl = 0, kSlotWc = 1, kSlotWr = 2;

// One element's scan operands in registers (x, lam and the three gate logits), loaded by a
// for_tile_elements load ahead of the arithmetic that stages them.
template <typename scalar_t>
struct ElementOperands {
  scalar_t x, lam, gl, gc, gr;

  GSPN_DEVICE void load(const DirectionView<scalar_t>& v, const scalar_t* xp, int o) {
    x = xp[o];
    lam = v.lam[o];
    gl = v.gl[o];
    gc = v.gc[o];
    gr = v.gr[o];
  }
  // The normalised weights of lane l of a line of L lanes into slot's weight slots (and their slopes, when
  // asked for).
  GSPN_DEVICE void weights(int l, int L, float* slot, float* slopes = nullptr) const {
    float w[3], q[3];  // in registers: stores through slot could alias the slopes' slots
    normalized_weights<float>(static_cast<float>(gl), static_cast<float>(gc), static_cast<float>(gr), l > 0,
                              l < L - 1, w[0], w[1], w[2], FastExp(), slopes != nullptr ? q : nullptr);
    slot[kSlotWl] = w[0];
    slot[kSlotWc] = w[1];
    slot[kSlotWr] = w[2];
    if (slopes != nullptr) {
      slopes[0] = q[0];
      slopes[1] = q[1];
      slopes[2] = q[2];
    }
  }
};

// How a direction's values join the map summed over the directions of the block's group: the group's
// first direction starts its fp32 partial sum, later ones add to it, and the last direction of a group
// that writes the output writes the total in the output's dtype. The same for a whole direction, so the
// kernels pick it once per direction (with_direction_sum) and the element loops hold no branch for it.
enum class DirectionSum { kFirst, kAdd, kLastToOutput };

template <DirectionSum kMode, typename scalar_t>
GSPN_DEVICE void accumulate_direction(int o, float value, float* acc, scalar_t* out) {
  if constexpr (kMode == DirectionSum::kFirst) {
    acc[o] = value;
  } else if constexpr (kMode == DirectionSum::kAdd) {
    acc[o] += value;
  } else {
    out[o] = static_cast<scalar_t>(acc[o] + value);
  }
}

// fn(std::integral_constant<DirectionSum, mode>{}) with direction d's mode in `group`.
template <typename Fn>
GSPN_DEVICE void with_direction_sum(const DirectionGroup& group, int d, Fn fn) {
  using M = DirectionSum;
  if (d == kDirections - 1 && group.writes_output) {
    fn(std::integral_constant<M, M::kLastToOutput>{});
  } else if (d == group.first) {
    fn(std::integral_constant<M, M::kFirst>{});
  } else {
    fn(std::integral_constant<M, M::kAdd>{});
  }
}

// Calls load(i, e) for kLoadBatch of this thread's elements e of direction v's tile of n steps from step s0,
// then use(i, e) for each: the loads of a batch are issued before any of its arithmetic, so their
// latencies overlap. Full batches run without per-element checks; the remaining elements go one by one.
template <typename scalar_t, typename Load, typename Use>
GSPN_DEVICE void for_tile_elements(const DirectionView<scalar_t>& v, int d, int s0, int n, int pitch, Load load,
                                   Use use) {
  TileWalk w(d < 2, n, v.lanes, pitch, v.origin + s0 * v.step_stride, v.step_stride, v.lane_stride);
  const int total = n * v.lanes, tid = static_cast<int>(threadIdx.x), stride = static_cast<int>(blockDim.x);
  const int mine = tid < total ? (total - 1 - tid) / stride + 1 : 0;  // once per tile
  int j = 0;
  for (; j + kLoadBatch <= mine; j += kLoadBatch) {
    TileElement es[kLoadBatch];
#pragma unroll
    for (int i = 0; i < kLoadBatch; ++i) {
      es[i] = w.e;
      load(i, es[i]);
      w.next();
    }
#pragma unroll
    for (int i = 0; i < kLoadBatch; ++i) use(i, es[i]);
  }
  for (; j < mine; ++j) {
    load(0, w.e);
    use(0, w.e);
    w.next();
  }
}

// The forward recurrence over one staged tile of kSlots-float elements: steps k = 0..n-1 of a line of L
// lanes, this thread taking lanes threadIdx.x, threadIdx.x + blockDim.x, ... . drive(e) is lam x of the
// element whose slots start at e, rows(k, prev, next) names the padded state rows of step k (lane l at
// slot l + 1, zeros at 0 and L + 1), clock says which steps restart, and visit(e, h) sees each new state.
// One barrier per step. The forward kernel and the backward's two sweeps all run this function.
template <int kSlots, typename Drive, typename Rows, typename Visit>
GSPN_DEVICE void scan_tile_forward(float* tile, int pitch, int n, int L, RestartClock& clock, Drive drive, Rows rows,
                                   Visit visit) {
  for (int k = 0; k < n; ++k) {
    const float* prev;
    float* next;
    rows(k, prev, next);
    // The restart test is the same for every lane of a step: made once, outside the lane loops.
    auto lanes = [&](auto state) {
      for (int l = threadIdx.x; l < L; l += blockDim.x) {
        float* e = tile + (k * pitch + l) * kSlots;
        const float h = state(e, l);
        next[l + 1] = h;
        visit(e, h);
      }
    };
    if (clock.restarts()) {
      lanes([&](const float* e, int) { return drive(e); });
    } else {
      lanes([&](const float* e, int l) {
        return scan_step<float>(e[kSlotWl], e[kSlotWc], e[kSlotWr], prev[l], prev[l + 1], prev[l + 2], drive(e), 1.f);
      });
    }
    clock.forward();
    __syncthreads();
  }
}

// Directions per block for `planes` planes on `sms` multiprocessors: all four when the planes alone give
// at least 90% of the SMs a block, else one (four blocks per plane, at the cost of the partial maps'
// traffic). The kernels also run 2 (the emulation tests it).
inline int direction_split(int64_t planes, int sms) { return 10 * planes >= 9 * int64_t(sms) ? kDirections : 1; }

// Blocks per SM worth making room for in a launch of `blocks` blocks on `sms` multiprocessors: three when
// there are blocks for them (one stages while the others scan), else two when there are more blocks than
// SMs (so that every block is resident at once), else one.
inline int blocks_per_sm_target(int64_t blocks, int sms) {
  return 10 * blocks >= 18 * int64_t(sms) ? 3 : (blocks > sms ? 2 : 1);
}

// The shared memory one of `per_sm` blocks sharing an SM may take (the runtime reserves 1 KiB a block).
inline size_t smem_share(int per_sm, size_t smem_per_sm, size_t smem_per_block) {
  const size_t share = smem_per_sm / per_sm > 1024 ? smem_per_sm / per_sm - 1024 : 0;
  return share < smem_per_block ? share : smem_per_block;
}

// Threads of one block: one per lane, rounded up to whole warps, at most 256 (a 16-lane plane gets one
// warp: more would idle in every scan step and take registers that more blocks per SM could use).
inline int threads_for(int64_t max_lanes) {
  const int64_t rounded = (max_lanes + 31) / 32 * 32;
  return static_cast<int>(rounded > 256 ? 256 : rounded);
}

// Shared-memory layout sizes (floats): padded state rows of max_lanes + 2, tile rows of max_lanes + 1
// (the +1 spreads the horizontal scans' staging over the banks).
GSPN_HD int64_t padded_row(int64_t max_lanes) { return max_lanes + 2; }
GSPN_HD int64_t tile_pitch(int64_t max_lanes) { return max_lanes + 1; }

// What a block derives from the launch before it scans: its plane (batch b, channel c), its group of
// directions, and the tile geometry (padded state rows of P floats, tile rows of `pitch`, T steps).
struct BlockFrame {
  int64_t HW, plane, b, c;
  int max_lanes, P, pitch, T;
  DirectionGroup group;
};

template <typename scalar_t>
GSPN_DEVICE BlockFrame block_frame(const ScanArgs<scalar_t>& a) {
  const ScanShape& sh = a.shape;
  BlockFrame f;
  f.HW = sh.H * sh.W;
  f.max_lanes = static_cast<int>(sh.H > sh.W ? sh.H : sh.W);
  f.P = static_cast<int>(padded_row(f.max_lanes));
  f.pitch = static_cast<int>(tile_pitch(f.max_lanes));
  f.T = a.tile;
  f.plane = blockIdx.x;
  f.b = f.plane / sh.C;
  f.c = f.plane % sh.C;
  f.group = direction_group(a.directions_per_block, f.plane, sh.B * sh.C);
  return f;
}

// The forward's slots: the weights, lam x, u (then u h).
namespace fwd_slot {
constexpr int kDrive = 3, kU = 4, kCount = 5;
}
// The backward's: the weights, x, lam, the weights' slopes, u, gy; the gradients overwrite them in place
// (x <- dlam, lam <- dx's term, the weights <- dgl, dgc, dgr, u <- du). Ten, padded to an odd eleven.
namespace bwd_slot {
constexpr int kX = 3, kLam = 4, kSlopes = 5, kU = 8, kGy = 9, kCount = 11;
}
constexpr int kBwdCarryRows = 6;  // two sets of the left / centre / right carries (the first sweep's two state rows)

inline int64_t fwd_smem_floats(int64_t max_lanes, int64_t tile) {
  return 2 * padded_row(max_lanes) + fwd_slot::kCount * tile_pitch(max_lanes) * tile;
}
inline int64_t bwd_smem_floats(int64_t max_lanes, int64_t tile) {
  return (kBwdCarryRows + tile + 1) * padded_row(max_lanes) + bwd_slot::kCount * tile_pitch(max_lanes) * tile;
}
// Checkpoint floats per plane: one lane vector per tile of the longest direction.
GSPN_HD int64_t checkpoint_floats(int64_t max_lanes, int64_t tile) { return (max_lanes + tile - 1) / tile * max_lanes; }

// The largest tile (<= kMaxTile steps) whose staging fits `smem_limit` bytes, or 0 if none does.
template <typename SmemFloats>
int pick_tile(int64_t max_lanes, SmemFloats smem_floats, size_t smem_limit) {
  for (int tile = kMaxTile; tile >= 1; tile /= 2) {
    if (static_cast<size_t>(smem_floats(max_lanes, tile)) * sizeof(float) <= smem_limit) return tile;
  }
  return 0;
}

// The tile of a launch of `blocks` blocks: the largest that leaves room for blocks_per_sm_target blocks per
// SM, else for one fewer, down to one; 0 when even a one-step tile exceeds a block's shared memory.
template <typename SmemFloats>
int launch_tile(int64_t max_lanes, SmemFloats smem_floats, int64_t blocks, int sms, size_t smem_per_sm,
                size_t smem_per_block) {
  for (int per_sm = blocks_per_sm_target(blocks, sms); per_sm >= 1; --per_sm) {
    const int tile = pick_tile(max_lanes, smem_floats, smem_share(per_sm, smem_per_sm, smem_per_block));
    if (tile > 0) return tile;
  }
  return 0;
}

}  // namespace cuda_kernels
}  // namespace gspn
