// ================================================================================================
// cluster_stats and ema_update_ (EMA codebook update with Laplace smoothing), deterministic.
//
//   x            [N, D] float32/bfloat16/float16 (accumulated in float64, stored as fp32)
//   indices      [N]    int64 in [-1, K): -1 (and anything outside [0, K)) = ignored row
//   counts       [K]    float32 out      sums [K, D] float32 out          (cluster_stats)
//   codebook     [K, D] float32, cluster_size [K] float32, embed_sum [K, D] float32, in place
//
// ema_update_, with the reference's fp32 rounding steps:
//   cluster_size <- fma(counts, 1 - decay, cluster_size * decay)
//   embed_sum    <- fma(sums,   1 - decay, embed_sum * decay)
//   n = sum(cluster_size)  (float64, fixed tree, rounded once to fp32)
//   codebook[k]  <- embed_sum[k] / ((cluster_size[k] + eps) / (n + K eps) * n)
// (ATen's vectorized add(self, other, alpha) is fmadd(other, alpha, self), hence the FMAs.)
// Counts and sums come from segment_sum.cu (stable sort by code + ordered segmented sums), so
// the whole update is bitwise reproducible run to run.
// ================================================================================================
#include <climits>

#include "common.cuh"

namespace vqk {
namespace {

constexpr int kReduceThreads = 1024;

// One block: blend cluster_size and reduce its new total in a fixed order.
__global__ void __launch_bounds__(kReduceThreads)
    blend_size_kernel(float* __restrict__ cluster_size, const float* __restrict__ counts, int k,
                      float decay, float one_minus_decay, float* __restrict__ total) {
  __shared__ double red[kReduceThreads];
  double local = 0.0;
  for (int c = threadIdx.x; c < k; c += kReduceThreads) {
    const float v = __fmaf_rn(counts[c], one_minus_decay, __fmul_rn(cluster_size[c], decay));
    cluster_size[c] = v;
    local += static_cast<double>(v);
  }
  red[threadIdx.x] = local;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *total = static_cast<float>(red[0]);
}

__global__ void blend_embed_kernel(float* __restrict__ codebook,
                                   const float* __restrict__ cluster_size,
                                   float* __restrict__ embed_sum, const float* __restrict__ sums,
                                   const float* __restrict__ total, int64_t k, int64_t d,
                                   float decay, float one_minus_decay, float eps, float k_eps) {
  const float n = *total;
  const float denom = __fadd_rn(n, k_eps);
  const int64_t numel = k * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e / d;
    const float es = __fmaf_rn(sums[e], one_minus_decay, __fmul_rn(embed_sum[e], decay));
    embed_sum[e] = es;
    // Laplace smoothing: (cluster_size + eps) / (n + K eps) * n, rounded step by step.
    const float smoothed = __fmul_rn(__fdiv_rn(__fadd_rn(cluster_size[c], eps), denom), n);
    codebook[e] = __fdiv_rn(es, smoothed);
  }
}

struct EmaBuffers {
  float* counts = nullptr;  // [K]
  float* sums = nullptr;    // [K, D]
  float* total = nullptr;   // [1]
  SegmentBuffers seg;
};

EmaBuffers carve_ema(Carver& c, int64_t n, int64_t k, int64_t d) {
  EmaBuffers b;
  b.counts = c.take<float>(k);
  b.sums = c.take<float>(k * d);
  b.total = c.take<float>(1);
  b.seg = carve_segments(c, n, k, d);
  return b;
}

bool bad_sizes(int64_t n, int64_t k, int64_t d) {
  return n < 0 || k < 0 || d < 0 || n > INT_MAX || k >= INT_MAX || d > INT_MAX;
}

cudaError_t cluster_stats_impl(const void* x, int64_t x_rs, const int64_t* indices, int64_t n,
                               int64_t k, int64_t d, vq_dtype dtype, const SegmentBuffers& seg,
                               float* counts, float* sums, cudaStream_t stream) {
  cudaError_t err = launch_sort_by_code(indices, n, k, seg, counts, stream);
  if (err != cudaSuccess) return err;
  return launch_segment_sum(x, x_rs, nullptr, 0, dtype, /*out_is_f32=*/true, n, k, d,
                            /*grad_loss=*/nullptr, 0.f, seg, sums, stream);
}

}  // namespace
}  // namespace vqk

extern "C" size_t vq_cluster_stats_workspace_bytes(int64_t n, int64_t k, int64_t d) {
  vqk::Carver c(nullptr);
  vqk::carve_segments(c, n, k, d);
  return c.size();
}

extern "C" cudaError_t vq_cluster_stats(const void* x, int64_t x_row_stride,
                                        const int64_t* indices, int64_t n, int64_t k, int64_t d,
                                        vq_dtype dtype, void* workspace, float* counts,
                                        float* sums, cudaStream_t stream) {
  if (vqk::bad_sizes(n, k, d)) return cudaErrorInvalidValue;
  if (k == 0) return cudaSuccess;
  vqk::Carver c(workspace);
  const vqk::SegmentBuffers seg = vqk::carve_segments(c, n, k, d);
  return vqk::cluster_stats_impl(x, x_row_stride, indices, n, k, d, dtype, seg, counts, sums,
                                 stream);
}

extern "C" size_t vq_ema_update_workspace_bytes(int64_t n, int64_t k, int64_t d) {
  vqk::Carver c(nullptr);
  vqk::carve_ema(c, n, k, d);
  return c.size();
}

extern "C" cudaError_t vq_ema_update(float* codebook, float* cluster_size, float* embed_sum,
                                     const void* x, int64_t x_row_stride, const int64_t* indices,
                                     int64_t n, int64_t k, int64_t d, vq_dtype dtype, double decay,
                                     double eps, void* workspace, cudaStream_t stream) {
  if (vqk::bad_sizes(n, k, d)) return cudaErrorInvalidValue;
  if (k == 0) return cudaSuccess;
  vqk::Carver c(workspace);
  const vqk::EmaBuffers b = vqk::carve_ema(c, n, k, d);
  cudaError_t err = vqk::cluster_stats_impl(x, x_row_stride, indices, n, k, d, dtype, b.seg,
                                            b.counts, b.sums, stream);
  if (err != cudaSuccess) return err;
  // Scalars as the reference sees them: a Python float applied to an fp32 tensor is rounded to
  // fp32 (decay, 1 - decay computed in double first, eps, K * eps computed in double first).
  const float decay_f = static_cast<float>(decay);
  const float omd_f = static_cast<float>(1.0 - decay);
  const float eps_f = static_cast<float>(eps);
  const float keps_f = static_cast<float>(static_cast<double>(k) * eps);
  vqk::blend_size_kernel<<<1, vqk::kReduceThreads, 0, stream>>>(
      cluster_size, b.counts, static_cast<int>(k), decay_f, omd_f, b.total);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t numel = k * d;
  if (numel == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = vqk::ceil_div(numel, threads) < 65536 ? vqk::ceil_div(numel, threads)
                                                                : 65536;
  vqk::blend_embed_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      codebook, cluster_size, embed_sum, b.sums, b.total, k, d, decay_f, omd_f, eps_f, keps_f);
  return cudaGetLastError();
}
