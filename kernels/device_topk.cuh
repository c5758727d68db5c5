// The cub::DeviceTopK (AIR top-k) path of gallop_bl_topk_threshold, in a header of its own so the
// CMake probe (probe_device_topk.cu) compiles exactly this code: the library uses it only where
// the probe succeeded (GALLOP_BL_HAVE_DEVICE_TOPK), else it falls back to DeviceRadixSort.
#pragma once

#include <cub/device/device_reduce.cuh>
#include <cub/device/device_topk.cuh>
#include <cuda/stream_ref>

#include <cstddef>
#include <cstdint>

namespace gallop_bl {

inline size_t align_up(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

// DeviceTopK needs the caller to accept unordered, non-deterministic output among ties: we only
// keep the minimum of the k keys (the threshold), which is the same whichever ties were taken.
inline auto topk_env(cudaStream_t stream) {
  return cuda::std::execution::env{
      cuda::stream_ref{stream},
      cuda::execution::require(cuda::execution::determinism::not_guaranteed,
                               cuda::execution::output_ordering::unsorted)};
}

// temp = [k float keys][DeviceTopK temp][DeviceReduce temp]; with temp == nullptr: size query.
inline cudaError_t device_topk_threshold(const float* scores, int64_t n, int64_t k, void* temp,
                                         size_t* temp_bytes, float* threshold,
                                         cudaStream_t stream) {
  size_t topk_bytes = 0, reduce_bytes = 0;
  cudaError_t err = cub::DeviceTopK::MaxKeys(nullptr, topk_bytes, scores, static_cast<float*>(nullptr),
                                             n, k, topk_env(stream));
  if (err != cudaSuccess) return err;
  err = cub::DeviceReduce::Min(nullptr, reduce_bytes, static_cast<const float*>(nullptr),
                               static_cast<float*>(nullptr), k, stream);
  if (err != cudaSuccess) return err;
  const size_t keys_bytes = align_up(static_cast<size_t>(k) * sizeof(float));
  const size_t need = keys_bytes + align_up(topk_bytes) + align_up(reduce_bytes);
  if (temp == nullptr) {
    *temp_bytes = need;
    return cudaSuccess;
  }
  if (*temp_bytes < need) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(temp);
  float* keys = reinterpret_cast<float*>(base);
  void* topk_temp = base + keys_bytes;
  void* reduce_temp = base + keys_bytes + align_up(topk_bytes);
  err = cub::DeviceTopK::MaxKeys(topk_temp, topk_bytes, scores, keys, n, k, topk_env(stream));
  if (err != cudaSuccess) return err;
  return cub::DeviceReduce::Min(reduce_temp, reduce_bytes, keys, threshold, k, stream);
}

}  // namespace gallop_bl
