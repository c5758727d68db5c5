/* Native CUDA baselines for the gallop_kernels benchmarks: a small C ABI loaded with ctypes.
 *
 * Nothing here is needed to use the package; the benchmarks put these beside the Triton kernels.
 * Every function returns 0 on success or a CUDA error code (cudaError_t as int); the message of
 * the last failure on the calling thread is in gallop_bl_last_error(). Pointers are device
 * pointers; `stream` is a cudaStream_t (NULL = legacy default stream). Nothing allocates device
 * memory: callers pass a temporary buffer of the size the *_temp_bytes query returns, so a
 * caching allocator (torch's) can own all memory and no cudaMalloc lands in a timed region.
 */
#ifndef GALLOP_BASELINES_H
#define GALLOP_BASELINES_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* dtype codes for parameters and gradients */
#define GALLOP_BL_F32 0
#define GALLOP_BL_BF16 1
#define GALLOP_BL_F16 2

/* which CUB algorithm gallop_bl_topk_threshold uses */
#define GALLOP_BL_TOPK_RADIX_SORT 0 /* cub::DeviceRadixSort::SortKeysDescending, then key k-1 */
#define GALLOP_BL_TOPK_DEVICE_TOPK 1 /* cub::DeviceTopK::MaxKeys (AIR top-k), then a min-reduce */

int gallop_bl_abi_version(void);          /* 1 */
int gallop_bl_topk_method(void);          /* GALLOP_BL_TOPK_* compiled in */
const char* gallop_bl_last_error(void);

/* scores[i] = |g[i]| / (|theta[i]| + eps) in float32 (the "gallop" score), materialised: the way a
 * user without fused kernels computes it before a top-k. */
int gallop_bl_gallop_score(const void* theta, const void* grad, int dtype, int64_t n, float eps,
                           float* scores, void* stream);

/* Exact k-th largest value of scores[0..n) (1 <= k <= n), written to *threshold (a device float).
 * The scores are not modified. */
int gallop_bl_topk_threshold_temp_bytes(int64_t n, int64_t k, size_t* bytes);
int gallop_bl_topk_threshold(const float* scores, int64_t n, int64_t k, void* temp,
                             size_t temp_bytes, float* threshold, void* stream);

/* One AdamW step (PyTorch order of operations, float32 math) on the `count` selected entries of
 * one tensor. indices: int32 (index_is_int64 = 0) or int64; grad is the dense gradient (gathered
 * at the indices); exp_avg, exp_avg_sq and (optional, may be NULL) master are float32 of length
 * count. Without master the weight is read from and written to the param. One thread per entry.
 * Hyperparameters are doubles; the kernel's float32 scalars are formed from them as torch does. */
int gallop_bl_sparse_adamw(void* param, int param_dtype, const void* grad, int grad_dtype,
                           const void* indices, int index_is_int64, float* exp_avg,
                           float* exp_avg_sq, float* master, int64_t count, int64_t step,
                           double lr, double beta1, double beta2, double eps, double weight_decay,
                           void* stream);

#ifdef __cplusplus
}
#endif

#endif /* GALLOP_BASELINES_H */
