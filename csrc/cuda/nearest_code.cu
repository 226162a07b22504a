// ================================================================================================
// nearest_code: index of (and distance to) the nearest codebook entry of every row.
//
//   x        [N, D]  float32/bfloat16/float16, unit inner stride, row stride x_rs
//   codebook [K, D]  same dtype, row stride cb_rs
//   indices  [N]     int64 out, ties -> lowest index
//   distance [N]     float32 out: l2 max(best + ||x||^2, 0) (squared Euclidean), cosine
//                    1 + best / max(||x||, 1e-12) = 1 - cosine similarity
//
// The search itself (search.cu) leaves per-split partial (score, index) pairs; the finalize
// kernel here, one warp per row, merges them in split order with the (score, index) total order
// and adds back the row's own norm.  Extra memory: O(N) partials + K code norms.
// ================================================================================================
#include <climits>

#include "common.cuh"

namespace vqk {
namespace {

constexpr float kCosineEps = 1e-12f;

template <typename T>
__global__ void nearest_code_finalize_kernel(const T* __restrict__ x, int64_t x_rs, int n, int d,
                                             int metric, int splits,
                                             const float* __restrict__ part_score,
                                             const int* __restrict__ part_index,
                                             int64_t* __restrict__ indices,
                                             float* __restrict__ distance) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // uniform per warp
  const T* xr = x + row * x_rs;
  float ss = 0.f;
  for (int j = lane; j < d; j += 32) {
    const float v = to_f(xr[j]);
    ss = __fmaf_rn(v, v, ss);
  }
  ss = warp_sum(ss);
  if (lane != 0) return;
  float best = part_score[row];
  int best_idx = part_index[row];
  for (int s = 1; s < splits; ++s) {
    const float os = part_score[static_cast<int64_t>(s) * n + row];
    const int oi = part_index[static_cast<int64_t>(s) * n + row];
    if (better(os, oi, best, best_idx)) {
      best = os;
      best_idx = oi;
    }
  }
  indices[row] = best_idx;
  float dist;
  if (metric == VQ_METRIC_L2) {
    // Cancellation can make ||c||^2 - 2 x.c + ||x||^2 slightly negative: clamp at 0 as the
    // reference does, but let NaN through (clamp_min propagates NaN; fmaxf would not).
    const float v = __fadd_rn(best, ss);
    dist = v < 0.f ? 0.f : v;
  } else {
    const float nrm = __fsqrt_rn(ss);
    dist = __fadd_rn(1.f, __fdiv_rn(best, nrm < kCosineEps ? kCosineEps : nrm));
  }
  distance[row] = dist;
}

template <typename T>
cudaError_t finalize_t(const T* x, int64_t x_rs, int n, int d, int metric, int splits,
                       const SearchBuffers& buf, int64_t* indices, float* distance,
                       cudaStream_t stream) {
  const int threads = 256;  // 8 rows per block
  const int64_t blocks = ceil_div(static_cast<int64_t>(n) * 32, threads);
  nearest_code_finalize_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      x, x_rs, n, d, metric, splits, buf.part_score, buf.part_index, indices, distance);
  return cudaGetLastError();
}

}  // namespace
}  // namespace vqk

extern "C" size_t vq_nearest_code_workspace_bytes(int64_t n, int64_t k, int num_sms) {
  vqk::Carver c(nullptr);
  vqk::carve_search(c, n, k, num_sms);
  return c.size();
}

extern "C" cudaError_t vq_nearest_code(const void* x, int64_t x_row_stride, const void* codebook,
                                       int64_t codebook_row_stride, int64_t n, int64_t k,
                                       int64_t d, vq_dtype dtype, vq_metric metric, int num_sms,
                                       void* workspace, int64_t* indices, float* distance,
                                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n < 0 || k <= 0 || d < 0 || n > INT_MAX || k > INT_MAX || d > INT_MAX)
    return cudaErrorInvalidValue;
  vqk::Carver c(workspace);
  const vqk::SearchBuffers buf = vqk::carve_search(c, n, k, num_sms);
  const vqk::SearchPlan plan = vqk::plan_search(n, k, num_sms);
  cudaError_t err = vqk::launch_search(x, x_row_stride, codebook, codebook_row_stride, n, k, d,
                                       dtype, metric, plan, buf, stream);
  if (err != cudaSuccess) return err;
  const int ni = static_cast<int>(n), di = static_cast<int>(d);
  switch (dtype) {
    case VQ_FLOAT32:
      return vqk::finalize_t(static_cast<const float*>(x), x_row_stride, ni, di, metric,
                             plan.splits, buf, indices, distance, stream);
    case VQ_BFLOAT16:
      return vqk::finalize_t(static_cast<const __nv_bfloat16*>(x), x_row_stride, ni, di, metric,
                             plan.splits, buf, indices, distance, stream);
    case VQ_FLOAT16:
      return vqk::finalize_t(static_cast<const __half*>(x), x_row_stride, ni, di, metric,
                             plan.splits, buf, indices, distance, stream);
  }
  return cudaErrorInvalidValue;
}
