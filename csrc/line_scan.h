// Argument checks and shapes of the line-scan kernels, shared by the CPU and CUDA sources. The public entry
// (dit_gspn/ops/line_scan.py) checks every argument and gives the user's messages; here only what keeps a
// direct torch.ops.gspn call from reading or writing out of bounds: one shape, one dtype (every tensor is
// read as the first one's scalar type) and one device (the dispatcher picks the kernel by the highest
// device, so a CPU tensor could reach the CUDA kernel). A wrong chunk only changes where scans restart.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>

namespace gspn {

/// A (..., H, W) map seen as `planes` contiguous (H, W) planes.
struct PlaneShape {
  int64_t planes;
  int64_t H;
  int64_t W;
};

/// Checks that every tensor matches the first one's shape, device and dtype and has at least two dims;
/// names the offending argument otherwise.
template <size_t N>
PlaneShape check_same_maps(const char* op, const std::array<const at::Tensor*, N>& tensors,
                           const std::array<const char*, N>& names) {
  const at::Tensor& ref = *tensors[0];
  TORCH_CHECK(ref.dim() >= 2, op, ": ", names[0], " must have shape (..., H, W), got ", ref.sizes());
  for (size_t k = 1; k < N; ++k) {
    const at::Tensor& t = *tensors[k];
    TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", names[k], " has shape ", t.sizes(),
                " but ", names[0], " has shape ", ref.sizes());
    TORCH_CHECK(t.device() == ref.device(), op, ": ", names[k], " is on ", t.device(), " but ",
                names[0], " is on ", ref.device());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", names[k], " has dtype ",
                t.scalar_type(), " but ", names[0], " has dtype ", ref.scalar_type());
  }
  const int64_t H = ref.size(-2);
  const int64_t W = ref.size(-1);
  const int64_t planes = (H * W == 0) ? 0 : ref.numel() / (H * W);
  return {planes, H, W};
}

}  // namespace gspn
