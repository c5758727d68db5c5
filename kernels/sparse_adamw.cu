// Plain CUDA sparse AdamW baseline: one thread per selected entry, one tensor per launch, the
// PyTorch AdamW order of operations in float32 (as gallop_kernels/reference.py).
#include <cmath>

#include "common.cuh"

namespace gallop_bl {
namespace {

template <typename P, typename G, typename I, bool HAS_MASTER>
__global__ void sparse_adamw_kernel(P* __restrict__ param, const G* __restrict__ grad,
                                    const I* __restrict__ indices, float* __restrict__ exp_avg,
                                    float* __restrict__ exp_avg_sq, float* __restrict__ master,
                                    int64_t count, float decay, float beta1, float omb1,
                                    float beta2, float omb2, float bc2_sqrt, float step_size, float eps) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count;
       j += stride) {
    const int64_t i = static_cast<int64_t>(indices[j]);
    const float g = load_f32(grad, i);
    float w = HAS_MASTER ? master[j] : load_f32(param, i);
    w *= decay;
    const float m = fmaf(g, omb1, exp_avg[j] * beta1);
    const float v = exp_avg_sq[j] * beta2 + (omb2 * g) * g;
    const float denom = __fdiv_rn(__fsqrt_rn(v), bc2_sqrt) + eps;
    w = w + __fdiv_rn(step_size * m, denom);
    exp_avg[j] = m;
    exp_avg_sq[j] = v;
    if (HAS_MASTER) master[j] = w;
    store_f32(param, i, w);
  }
}

template <typename P, typename G, typename I>
void launch(void* param, const void* grad, const void* indices, float* m, float* v, float* master,
            int64_t count, float decay, float beta1, float omb1, float beta2, float omb2,
            float bc2_sqrt, float step_size, float eps, cudaStream_t s) {
  const int threads = 256;
  const unsigned blocks = grid_for(count, threads);
  if (master != nullptr) {
    sparse_adamw_kernel<P, G, I, true><<<blocks, threads, 0, s>>>(
        static_cast<P*>(param), static_cast<const G*>(grad), static_cast<const I*>(indices), m, v,
        master, count, decay, beta1, omb1, beta2, omb2, bc2_sqrt, step_size, eps);
  } else {
    sparse_adamw_kernel<P, G, I, false><<<blocks, threads, 0, s>>>(
        static_cast<P*>(param), static_cast<const G*>(grad), static_cast<const I*>(indices), m, v,
        master, count, decay, beta1, omb1, beta2, omb2, bc2_sqrt, step_size, eps);
  }
}

template <typename P, typename G>
bool launch_index(int index_is_int64, void* param, const void* grad, const void* indices, float* m,
                  float* v, float* master, int64_t count, float decay, float beta1, float omb1,
                  float beta2, float omb2, float bc2_sqrt, float step_size, float eps,
                  cudaStream_t s) {
  if (index_is_int64)
    launch<P, G, int64_t>(param, grad, indices, m, v, master, count, decay, beta1, omb1, beta2,
                          omb2, bc2_sqrt, step_size, eps, s);
  else
    launch<P, G, int32_t>(param, grad, indices, m, v, master, count, decay, beta1, omb1, beta2,
                          omb2, bc2_sqrt, step_size, eps, s);
  return true;
}

}  // namespace
}  // namespace gallop_bl

using namespace gallop_bl;

extern "C" int gallop_bl_sparse_adamw(void* param, int param_dtype, const void* grad,
                                      int grad_dtype, const void* indices, int index_is_int64,
                                      float* exp_avg, float* exp_avg_sq, float* master,
                                      int64_t count, int64_t step, double lr, double beta1,
                                      double beta2, double eps, double weight_decay, void* stream) {
  if (count <= 0) return 0;
  if (step < 1) {
    set_error_msg("gallop_bl_sparse_adamw: step must be >= 1");
    return static_cast<int>(cudaErrorInvalidValue);
  }
  // Scalars as torch forms them: in double on the host, then rounded to float32.
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float step_size = static_cast<float>(-lr / bc1);
  const float b1 = static_cast<float>(beta1), omb1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), omb2 = static_cast<float>(1.0 - beta2);
  const float eps_f = static_cast<float>(eps);
  cudaStream_t s = as_stream(stream);
  const int code = param_dtype * 3 + grad_dtype;
  bool ok = true;
#define GALLOP_BL_CASE(PC, GC, P, G)                                                             \
  case (PC)*3 + (GC):                                                                            \
    launch_index<P, G>(index_is_int64, param, grad, indices, exp_avg, exp_avg_sq, master, count, \
                       decay, b1, omb1, b2, omb2, static_cast<float>(bc2_sqrt), step_size, eps_f, s);    \
    break;
  switch (code) {
    GALLOP_BL_CASE(GALLOP_BL_F32, GALLOP_BL_F32, float, float)
    GALLOP_BL_CASE(GALLOP_BL_BF16, GALLOP_BL_BF16, __nv_bfloat16, __nv_bfloat16)
    GALLOP_BL_CASE(GALLOP_BL_BF16, GALLOP_BL_F32, __nv_bfloat16, float)
    GALLOP_BL_CASE(GALLOP_BL_F16, GALLOP_BL_F16, __half, __half)
    GALLOP_BL_CASE(GALLOP_BL_F16, GALLOP_BL_F32, __half, float)
    default:
      ok = false;
  }
#undef GALLOP_BL_CASE
  if (!ok) {
    set_error_msg("gallop_bl_sparse_adamw: unsupported (param dtype, grad dtype) pair");
    return static_cast<int>(cudaErrorInvalidValue);
  }
  GALLOP_BL_CHECK(cudaGetLastError());
  return 0;
}
