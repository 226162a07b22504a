// ================================================================================================
// nearest_code with Gumbel-max sampling (sample_temperature > 0): one warp per row.
//
//   x        [N, D]  float32/bfloat16/float16, unit inner stride, row stride x_rs
//   codebook [K, D]  same dtype, row stride cb_rs
//   indices  [N]     int64 out: argmin_k(-logit_k * inv_temp - g(seed, row_base + i*row_step, k)),
//                    ties -> lowest index; logit = -sqrt(max(||c||^2 - 2 x.c + ||x||^2, 1e-8))
//                    (l2, LR's -cdist) or x.c^/max(||x||, 1e-12) (cosine similarity)
//   distance [N]     float32 out: that of the chosen code (as nearest_code)
//
// g is the counter-based Gumbel noise of vqkernels/reference/sampling.py (the same 32-bit hash;
// u = (2 (bits >> 9) + 1) 2^-24; g = -log(-log(u)) with the accurate logf, not __logf).  Each
// lane walks codes lane, lane + 32, ... in ascending order with a strict "<", then the warp folds
// the lanes' (score, index) pairs with better() (ties -> lower index): the lowest index among
// equal perturbed scores, as the reference's min.  Scores are fp32 fma chains in d order; they
// differ from the reference's matmul only by rounding, so a draw can differ only where two
// perturbed scores are within float rounding.  Extra memory: none (never N x K).
// ================================================================================================
#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace vqk {
namespace {

__device__ __forceinline__ uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x21F0AAADu;
  v ^= v >> 15;
  v *= 0x735A2D97u;
  v ^= v >> 15;
  return v;
}

inline uint32_t mix32_host(uint32_t v) {
  v ^= v >> 16;
  v *= 0x21F0AAADu;
  v ^= v >> 15;
  v *= 0x735A2D97u;
  v ^= v >> 15;
  return v;
}

template <typename T>
__global__ void sample_kernel(const T* __restrict__ x, int64_t x_rs, const T* __restrict__ cb,
                              int64_t cb_rs, int n, int k, int d, int metric, float inv_temp,
                              uint32_t seed_key, int64_t row_base, int64_t row_step,
                              int64_t* __restrict__ indices, float* __restrict__ distance) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // uniform per warp
  const T* xr = x + row * x_rs;
  float xsq = 0.f;
  for (int j = lane; j < d; j += 32) {
    const float v = to_f(xr[j]);
    xsq = __fmaf_rn(v, v, xsq);
  }
  xsq = warp_sum(xsq);
  const float xn = __fsqrt_rn(xsq);
  const float nrm = xn < 1e-12f ? 1e-12f : xn;
  const uint64_t ctr = static_cast<uint64_t>(row_base + row * row_step);
  uint32_t key = mix32(seed_key ^ static_cast<uint32_t>(ctr >> 32));
  key = mix32(key ^ static_cast<uint32_t>(ctr));
  float best = INFINITY;
  int best_idx = 0;
  float best_score = 0.f;
  for (int c = lane; c < k; c += 32) {
    const T* cr = cb + static_cast<int64_t>(c) * cb_rs;
    float dot = 0.f, csq = 0.f;
    for (int j = 0; j < d; ++j) {
      const float xv = to_f(xr[j]), cv = to_f(cr[j]);
      dot = __fmaf_rn(xv, cv, dot);
      csq = __fmaf_rn(cv, cv, csq);
    }
    float score, logit;
    if (metric == VQ_METRIC_L2) {
      score = __fsub_rn(csq, __fmul_rn(2.f, dot));
      const float d2 = __fadd_rn(score, xsq);
      logit = -__fsqrt_rn(d2 > 1e-8f ? d2 : 1e-8f);
    } else {
      const float cn = __fsqrt_rn(csq);
      score = -__fdiv_rn(dot, cn < 1e-12f ? 1e-12f : cn);
      logit = __fdiv_rn(-score, nrm);
    }
    const uint32_t bits = mix32(key ^ mix32(static_cast<uint32_t>(c)));
    const float u = __fmul_rn(static_cast<float>((bits >> 9) * 2u + 1u), 5.9604644775390625e-08f);
    const float g = -logf(-logf(u));
    const float z = __fsub_rn(-__fmul_rn(logit, inv_temp), g);
    if (z < best) {  // strict: this lane's codes ascend, the first of equal scores stays
      best = z;
      best_idx = c;
      best_score = score;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, off);
    const int oi = __shfl_xor_sync(0xffffffffu, best_idx, off);
    const float os = __shfl_xor_sync(0xffffffffu, best_score, off);
    if (better(ob, oi, best, best_idx)) {
      best = ob;
      best_idx = oi;
      best_score = os;
    }
  }
  if (lane != 0) return;
  indices[row] = best_idx;
  if (metric == VQ_METRIC_L2) {
    const float v = __fadd_rn(best_score, xsq);
    distance[row] = v < 0.f ? 0.f : v;
  } else {
    distance[row] = __fadd_rn(1.f, __fdiv_rn(best_score, nrm));
  }
}

template <typename T>
cudaError_t sample_t(const void* x, int64_t x_rs, const void* cb, int64_t cb_rs, int64_t n,
                     int64_t k, int64_t d, int metric, float inv_temp, uint32_t seed_key,
                     int64_t row_base, int64_t row_step, int64_t* indices, float* distance,
                     cudaStream_t stream) {
  const int threads = 256;  // 8 rows (warps) per block
  const int64_t blocks = ceil_div(n * 32, threads);
  sample_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(x), x_rs, static_cast<const T*>(cb), cb_rs, static_cast<int>(n),
      static_cast<int>(k), static_cast<int>(d), metric, inv_temp, seed_key, row_base, row_step,
      indices, distance);
  return cudaGetLastError();
}

}  // namespace
}  // namespace vqk

extern "C" cudaError_t vq_nearest_code_sample(const void* x, int64_t x_row_stride,
                                              const void* codebook, int64_t codebook_row_stride,
                                              int64_t n, int64_t k, int64_t d, vq_dtype dtype,
                                              vq_metric metric, double temperature,
                                              uint64_t seed, int64_t row_base, int64_t row_step,
                                              int64_t* indices, float* distance,
                                              cudaStream_t stream) {
  if (n < 0 || k <= 0 || d < 0 || n > INT_MAX || k > INT_MAX || d > INT_MAX ||
      !(temperature > 0.0))
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  // The seed half of every row key, as vqkernels/reference/sampling.py::row_keys.
  const uint32_t seed_key = vqk::mix32_host(
      vqk::mix32_host(static_cast<uint32_t>(seed >> 32) ^ 0x9E3779B9u) ^
      static_cast<uint32_t>(seed));
  // 1/τ rounded once to fp32 (the reference multiplies the fp32 logits by the same value).
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const int m = static_cast<int>(metric);
  switch (dtype) {
    case VQ_FLOAT32:
      return vqk::sample_t<float>(x, x_row_stride, codebook, codebook_row_stride, n, k, d, m,
                                  inv_temp, seed_key, row_base, row_step, indices, distance,
                                  stream);
    case VQ_BFLOAT16:
      return vqk::sample_t<__nv_bfloat16>(x, x_row_stride, codebook, codebook_row_stride, n, k,
                                          d, m, inv_temp, seed_key, row_base, row_step, indices,
                                          distance, stream);
    case VQ_FLOAT16:
      return vqk::sample_t<__half>(x, x_row_stride, codebook, codebook_row_stride, n, k, d, m,
                                   inv_temp, seed_key, row_base, row_step, indices, distance,
                                   stream);
    default:
      return cudaErrorInvalidValue;
  }
}
