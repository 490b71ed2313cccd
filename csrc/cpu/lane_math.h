// What the CPU scan kernels compute in: acc_type_t (float32 for float32 and the half types, float64 for
// float64) and exp_lanes, a branch-free float exponential for their lane loops (std::exp's calls keep a
// loop from vectorising), with LaneExp, the functor csrc/scan_math.h's normalisation takes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace gspn {

// On a function: also compile it for x86-64-v3 (AVX2 + FMA) and pick that version at load time on a CPU
// that has it; the default build targets the baseline x86-64 (SSE2) so that one build runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GSPN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GSPN_CPU_CLONES
#endif

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The clamps become selects only where no code depends on the floating-point exception flags.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

// exp(v), branch-free so that loops calling it vectorise (std::exp's do not): Cody-Waite range
// reduction and Cephes' degree-6 polynomial, within 2 ulp of expf. Arguments are clamped to
// [-87, 88], so a result that would underflow is ~1e-38 and one that would overflow ~1.7e38.
__attribute__((always_inline)) inline float exp_lanes(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v / ln 2)
  const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline double exp_lanes(double v) { return std::exp(v); }
struct LaneExp {
  template <typename T>
  __attribute__((always_inline)) T operator()(T v) const { return exp_lanes(v); }
};

#pragma GCC pop_options

// Pack<T>: 32 bytes of T lanes (8 float32 or 4 float64) as one GCC vector, which a GSPN_CPU_CLONES
// function's x86-64-v3 clone keeps in one AVX register and the baseline build in two SSE registers; the
// channels-last kernel's per-pixel loops run on them, so what vectorises does not depend on the
// auto-vectoriser. Loads and stores are unaligned.
// (always inlined: -Wpsabi's note about passing 32-byte vectors by value in the baseline build concerns calls.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T>
struct PackOf {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using Pack = typename PackOf<T>::type;
template <typename T>
constexpr int64_t kPackLanes = int64_t(32 / sizeof(T));

template <typename T>
__attribute__((always_inline)) inline Pack<T> load_pack(const T* p) {
  Pack<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
__attribute__((always_inline)) inline void store_pack(T* p, Pack<T> v) {
  std::memcpy(p, &v, sizeof v);
}
// The sum of v's lanes.
template <typename T>
__attribute__((always_inline)) inline T lane_sum(Pack<T> v) {
  T s = 0;
  for (int64_t k = 0; k < kPackLanes<T>; ++k) s += v[k];
  return s;
}
#pragma GCC diagnostic pop

}  // namespace gspn
