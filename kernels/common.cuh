// Shared helpers of the native baselines: error reporting, dtype loads/stores, stream casts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "gallop_baselines.h"

namespace gallop_bl {

// Message of the last failure on this thread (gallop_bl_last_error).
void set_error(const char* where, cudaError_t err);
void set_error_msg(const char* msg);

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

#define GALLOP_BL_CHECK(expr)                           \
  do {                                                  \
    cudaError_t gallop_bl_err_ = (expr);                \
    if (gallop_bl_err_ != cudaSuccess) {                \
      ::gallop_bl::set_error(#expr, gallop_bl_err_);    \
      return static_cast<int>(gallop_bl_err_);          \
    }                                                   \
  } while (0)

template <typename T>
__device__ __forceinline__ float load_f32(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load_f32<float>(const float* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load_f32<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <>
__device__ __forceinline__ float load_f32<__half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}

template <typename T>
__device__ __forceinline__ void store_f32(T* p, int64_t i, float v);
template <>
__device__ __forceinline__ void store_f32<float>(float* p, int64_t i, float v) { p[i] = v; }
template <>
__device__ __forceinline__ void store_f32<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ void store_f32<__half>(__half* p, int64_t i, float v) {
  p[i] = __float2half_rn(v);
}

// Grid for a grid-stride loop over n items: enough blocks to fill the device, capped.
inline unsigned grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = 65535LL * 8;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

}  // namespace gallop_bl
