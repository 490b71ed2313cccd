// What a CUDA kernel header needs from the compiler, in two builds: nvcc, and plain C++ where
// tests/cuda_emulation/ runs every thread of a block as a fiber (GSPN_CUDA_EMULATION). The
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

// The fast single-precision exponential and reciprocal of the CUDA kernels (MUFU.EX2 and MUFU.RCP, about
// 2 ulp each, no slow path; 1 / v is 0 for |v| > 2^126, where the exact one is below 2^-126 anyway): exact
// expf and division in the emulation, whose results are compared with the float64 reference at float32
// tolerances (the GPU tests compare the real ones).
#if defined(GSPN_CUDA_EMULATION)
#define GSPN_FAST_EXP(v) expf(v)
#define GSPN_FAST_RCP(v) (1.0f / (v))
#else
#define GSPN_FAST_EXP(v) __expf(v)
#define GSPN_FAST_RCP(v) __fdividef(1.0f, (v))
#endif
