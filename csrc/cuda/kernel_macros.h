// What a CUDA kernel header needs from the compiler, in two builds: nvcc, and plain C++ where
// tests/kernels/cuda_emulation/ runs every thread of a block as a fiber (GSPN_CUDA_EMULATION). The
// emulation provides threadIdx, blockIdx, blockDim, __syncthreads and gspn_emulated_smem.
#pragma once

#if defined(GSPN_CUDA_EMULATION)
#define GSPN_DEVICE inline
#define GSPN_GLOBAL
#define GSPN_LAUNCH_BOUNDS(threads)
#define GSPN_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(gspn_emulated_smem)
#else
#define GSPN_DEVICE __device__ __forceinline__
#define GSPN_GLOBAL __global__
#define GSPN_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
// One untyped extern buffer: extern __shared__ arrays of different types in templates would clash.
#define GSPN_DYNAMIC_SMEM(type, name)                          \
  extern __shared__ __align__(16) unsigned char gspn_smem_raw[]; \
  type* name = reinterpret_cast<type*>(gspn_smem_raw)
#endif

// The fast single-precision exponential and reciprocal of the CUDA kernels: one MUFU.EX2 (after the
// multiplication by log2 e) and one MUFU.RCP, the PTX approximations with denormals flushed to zero
// (relative error about 2^-22 each; exp of a very negative argument and 1 / v for |v| > 2^126 give 0,
// where the exact values are below 2^-126 anyway). Exact expf and division in the emulation, whose
// results are compared with the float64 reference at float32 tolerances (the GPU tests compare the real ones).
#if defined(GSPN_CUDA_EMULATION)
#define GSPN_FAST_EXP(v) expf(v)
#define GSPN_FAST_RCP(v) (1.0f / (v))
#else
__device__ __forceinline__ float gspn_ex2_approx(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ float gspn_rcp_approx(float v) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
#define GSPN_FAST_EXP(v) gspn_ex2_approx((v) * 1.44269504088896341f)
#define GSPN_FAST_RCP(v) gspn_rcp_approx(v)
#endif

// p, opaque to the optimiser: one 64-bit register from here on. nvcc otherwise rebuilds every address from
// the kernel parameter, the plane's 64-bit offset and the element's (four instructions a load or store
// where one IMAD.WIDE does); the kernels pass each plane's pointers through this once per direction.
template <typename T>
GSPN_DEVICE T* register_pointer(T* p) {
#if !defined(GSPN_CUDA_EMULATION)
  asm("" : "+l"(p));
  __builtin_assume(__isGlobal(p));  // still global memory: LDG / STG, not generic loads
#endif
  return p;
}
