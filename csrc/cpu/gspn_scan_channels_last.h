// The CPU kernel of gspn::gspn_scan_fwd / gspn_scan_bwd for channels-last maps whose five gate tensors share
// one channel grouping (csrc/cpu/gspn_scan_channels_last.cpp); gspn_scan_cpu.cpp hands it the inputs it
// applies to.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../gspn_scan_common.h"

namespace gspn {

// Channels per group from which the channels-last kernel runs: at least one vector of float32 lanes.
constexpr int64_t kMinGroupChannels = 8;

// Whether the channels-last kernel takes these inputs: x channels-last (scan_memory_format) and lam, gl, gc,
// gr and u all with one group count G, of at least kMinGroupChannels channels each.
bool channels_last_kernel_applies(const at::Tensor& x, const ScanShape& sh);

// y (channels-last, as x) of the fused scan.
at::Tensor gspn_scan_fwd_channels_last(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& gl,
                                       const at::Tensor& gc, const at::Tensor& gr, const at::Tensor& u,
                                       const ScanShape& sh, int64_t chunk);

// (dx channels-last, dlam, dgl, dgc, dgr, du contiguous) from grad_y.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gspn_scan_bwd_channels_last(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& lam, const at::Tensor& gl, const at::Tensor& gc,
    const at::Tensor& gr, const at::Tensor& u, const ScanShape& sh, int64_t chunk);

}  // namespace gspn
