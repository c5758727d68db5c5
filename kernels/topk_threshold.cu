// CUB baseline for selection: materialise the GaLLoP score, then the exact k-th largest value with
// CUB (DeviceTopK where the toolkit has it, else a full DeviceRadixSort and a read of key k-1).
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#ifdef GALLOP_BL_HAVE_DEVICE_TOPK
#include "device_topk.cuh"
#endif

namespace gallop_bl {
namespace {

inline size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

template <typename T>
__global__ void gallop_score_kernel(const T* __restrict__ theta, const T* __restrict__ grad,
                                    int64_t n, float eps, float* __restrict__ scores) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float t = fabsf(load_f32(theta, i));
    const float g = fabsf(load_f32(grad, i));
    scores[i] = __fdiv_rn(g, t + eps);
  }
}

// temp = [n float sorted keys][DeviceRadixSort temp]; temp == nullptr: size query.
cudaError_t radix_sort_threshold(const float* scores, int64_t n, int64_t k, void* temp,
                                 size_t* temp_bytes, float* threshold, cudaStream_t stream) {
  size_t sort_bytes = 0;
  cudaError_t err = cub::DeviceRadixSort::SortKeysDescending(
      nullptr, sort_bytes, scores, static_cast<float*>(nullptr), n, 0, 32, stream);
  if (err != cudaSuccess) return err;
  const size_t keys_bytes = align256(static_cast<size_t>(n) * sizeof(float));
  const size_t need = keys_bytes + align256(sort_bytes);
  if (temp == nullptr) {
    *temp_bytes = need;
    return cudaSuccess;
  }
  if (*temp_bytes < need) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(temp);
  float* sorted = reinterpret_cast<float*>(base);
  err = cub::DeviceRadixSort::SortKeysDescending(base + keys_bytes, sort_bytes, scores, sorted, n, 0,
                                                 32, stream);
  if (err != cudaSuccess) return err;
  return cudaMemcpyAsync(threshold, sorted + (k - 1), sizeof(float), cudaMemcpyDeviceToDevice,
                         stream);
}

cudaError_t threshold_dispatch(const float* scores, int64_t n, int64_t k, void* temp,
                               size_t* temp_bytes, float* threshold, cudaStream_t stream) {
#ifdef GALLOP_BL_HAVE_DEVICE_TOPK
  return device_topk_threshold(scores, n, k, temp, temp_bytes, threshold, stream);
#else
  return radix_sort_threshold(scores, n, k, temp, temp_bytes, threshold, stream);
#endif
}

}  // namespace
}  // namespace gallop_bl

using namespace gallop_bl;

extern "C" int gallop_bl_topk_method(void) {
#ifdef GALLOP_BL_HAVE_DEVICE_TOPK
  return GALLOP_BL_TOPK_DEVICE_TOPK;
#else
  return GALLOP_BL_TOPK_RADIX_SORT;
#endif
}

extern "C" int gallop_bl_gallop_score(const void* theta, const void* grad, int dtype, int64_t n,
                                      float eps, float* scores, void* stream) {
  if (n <= 0) return 0;
  const int threads = 256;
  const unsigned blocks = grid_for(n, threads);
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case GALLOP_BL_F32:
      gallop_score_kernel<<<blocks, threads, 0, s>>>(static_cast<const float*>(theta),
                                                     static_cast<const float*>(grad), n, eps, scores);
      break;
    case GALLOP_BL_BF16:
      gallop_score_kernel<<<blocks, threads, 0, s>>>(static_cast<const __nv_bfloat16*>(theta),
                                                     static_cast<const __nv_bfloat16*>(grad), n, eps,
                                                     scores);
      break;
    case GALLOP_BL_F16:
      gallop_score_kernel<<<blocks, threads, 0, s>>>(static_cast<const __half*>(theta),
                                                     static_cast<const __half*>(grad), n, eps, scores);
      break;
    default:
      set_error_msg("gallop_bl_gallop_score: unknown dtype code");
      return static_cast<int>(cudaErrorInvalidValue);
  }
  GALLOP_BL_CHECK(cudaGetLastError());
  return 0;
}

extern "C" int gallop_bl_topk_threshold_temp_bytes(int64_t n, int64_t k, size_t* bytes) {
  if (n <= 0 || k < 1 || k > n || bytes == nullptr) {
    set_error_msg("gallop_bl_topk_threshold_temp_bytes: need 1 <= k <= n and a bytes pointer");
    return static_cast<int>(cudaErrorInvalidValue);
  }
  GALLOP_BL_CHECK(threshold_dispatch(nullptr, n, k, nullptr, bytes, nullptr, nullptr));
  return 0;
}

extern "C" int gallop_bl_topk_threshold(const float* scores, int64_t n, int64_t k, void* temp,
                                        size_t temp_bytes, float* threshold, void* stream) {
  if (n <= 0 || k < 1 || k > n || temp == nullptr) {
    set_error_msg("gallop_bl_topk_threshold: need 1 <= k <= n and a temp buffer");
    return static_cast<int>(cudaErrorInvalidValue);
  }
  size_t have = temp_bytes;
  GALLOP_BL_CHECK(threshold_dispatch(scores, n, k, temp, &have, threshold, as_stream(stream)));
  GALLOP_BL_CHECK(cudaGetLastError());
  return 0;
}
