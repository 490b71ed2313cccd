// How the CPU kernels split planes over threads.
#pragma once

#include <algorithm>
#include <cstdint>

namespace gspn {

// Work items (planes) per parallel task, for items of `item_size` elements each: enough elements
// per task that it outweighs the cost of scheduling it, so tiny maps stay on one thread.
inline int64_t plane_grain(int64_t item_size) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(item_size, 1));
}

}  // namespace gspn
