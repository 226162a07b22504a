// ================================================================================================
// Codebook search (shared by nearest_code and quantize): K-streaming tiles with a fused running
// (min, argmin); never an N x K buffer.
//
//   x        [N, D]  float32/bfloat16/float16, unit inner stride, row stride x_rs
//   codebook [K, D]  same dtype, row stride cb_rs
//   code_aux [K]     float32 out: ||c||^2 (l2) or 1/max(||c||, 1e-12) (cosine)
//   part_score, part_index  [splits, N] float32 / int32 out: best of each K-split per row
//
// Each block owns BM = 128 rows of x and one K-split; it streams that split's codes through
// shared memory in BN = 128-code x BK = 16-dim tiles (both converted to fp32 on load), each of
// its 256 threads computing an 8 x 8 micro-tile of dot products with fp32 FMAs (4 shared-memory
// float4 reads per 64 FMAs).  Every (row, code) dot
// accumulates over d = 0..D-1 in order, whatever the tiling or split, so scores (and the chosen
// indices) are identical for every launch configuration.  Scores: l2 ||c||^2 - 2 x.c (||x||^2 is
// constant per row and added back only for the reported distance); cosine -(x.c)/max(||c||, eps).
// Ties -> lowest index: each thread visits its codes in ascending order with a strict "<", and
// the merges (across the 16 threads sharing a row, then across splits in the finalize kernels)
// use the (score, index) total order.
// ================================================================================================
#include <climits>
#include <cmath>

#include "common.cuh"

namespace vqk {
namespace {

constexpr int kBM = 128;       // rows of x per block
constexpr int kBN = 128;       // codes per shared-memory tile
constexpr int kBK = 16;        // dims per shared-memory tile
constexpr int kThreads = 256;  // 16 x 16 threads
constexpr int kTM = 8;         // rows per thread
constexpr int kTN = 8;         // codes per thread
constexpr int kHalf = 64;      // offset of a thread's second group of 4 rows / codes
constexpr int kLoads = kBM * kBK / kThreads;  // tile elements each thread loads
constexpr float kCosineEps = 1e-12f;

static_assert(kBM == kBN && kBM * kBK == kLoads * kThreads, "x and code tiles load alike");
static_assert(16 * kTM == kBM && 16 * kTN == kBN && 2 * kHalf == kBM, "8 x 8 micro-tiles");

// One warp per code: ||c||^2 in fp32 from the same rounded (dtype) values the products use.
template <typename T>
__global__ void code_aux_kernel(const T* __restrict__ cb, int64_t cb_rs, int k, int d, int metric,
                                float* __restrict__ aux) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= k) return;  // uniform per warp
  const T* c = cb + warp * cb_rs;
  float ss = 0.f;
  for (int j = lane; j < d; j += 32) {
    const float v = to_f(c[j]);
    ss = __fmaf_rn(v, v, ss);
  }
  ss = warp_sum(ss);
  if (lane == 0) {
    if (metric == VQ_METRIC_L2) {
      aux[warp] = ss;
    } else {
      // F.normalize: c / max(||c||, eps).  Scaling the dot by the reciprocal is the same value up
      // to the last-ulp rounding of the reference's elementwise division.
      const float nrm = __fsqrt_rn(ss);
      aux[warp] = __frcp_rn(nrm > kCosineEps ? nrm : kCosineEps);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    search_tile_kernel(const T* __restrict__ x, int64_t x_rs, const T* __restrict__ cb,
                       int64_t cb_rs, const float* __restrict__ code_aux, int n, int k, int d,
                       int metric, int codes_per_split, float* __restrict__ part_score,
                       int* __restrict__ part_index) {
  // Transposed tiles ([dim][row]) so a thread reads 4 consecutive rows / codes as one float4;
  // +4 floats of padding keep rows 16-byte aligned and spread the transposing stores over banks.
  __shared__ __align__(16) float xs[kBK][kBM + 4];
  __shared__ __align__(16) float cs[kBK][kBN + 4];

  const int tid = threadIdx.x;
  const int tx = tid & 15;  // code group
  const int ty = tid >> 4;  // row group
  // A thread owns rows {ty*4 + i, 64 + ty*4 + i} and codes {tx*4 + j, 64 + tx*4 + j}, i, j < 4:
  // two float4 reads per operand and kk, each covering 16 consecutive float4s across a
  // half-warp (conflict-free), and the codes it visits are in ascending order (j = 0..7).
  const int row0 = blockIdx.x * kBM;
  const int code_begin = blockIdx.y * codes_per_split;
  const int code_end = min(k, code_begin + codes_per_split);

  // Start from a valid index of this split, so a row whose scores are all NaN still reports a
  // valid code (documented unchecked behaviour: some valid index, NaN distance).
  float best[kTM];
  int best_idx[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best[i] = INFINITY;
    best_idx[i] = code_begin;
  }

  // The (code tile, dim tile) steps in order, software-pipelined: the global loads of step s + 1
  // are issued into registers before the FMAs of step s, so their latency hides behind the
  // math (one block of 8 warps per SM at this register count).  D = 0 still takes one
  // (all-padding) step per code tile so that every code is scored.
  const int nd = d > 0 ? (d + kBK - 1) / kBK : 1;
  const int steps = ((code_end - code_begin + kBN - 1) / kBN) * nd;
  float px[kLoads], pc[kLoads];
  auto load = [&](int step) {
    const int c0 = code_begin + (step / nd) * kBN;
    const int d0 = (step % nd) * kBK;
    // Consecutive threads read consecutive dims of one row (coalesced); padding is zero, which
    // adds exact zeros to the dot products and is never compared (codes >= code_end skipped).
#pragma unroll
    for (int r = 0; r < kLoads; ++r) {
      const int e = tid + r * kThreads;
      const int m = e / kBK;
      const int dd = d0 + e % kBK;
      const int row = row0 + m;
      const int code = c0 + m;
      px[r] = (row < n && dd < d) ? to_f(x[static_cast<int64_t>(row) * x_rs + dd]) : 0.f;
      pc[r] = (code < code_end && dd < d) ? to_f(cb[static_cast<int64_t>(code) * cb_rs + dd])
                                          : 0.f;
    }
  };

  float acc[kTM][kTN];
  if (steps > 0) load(0);
  for (int step = 0; step < steps; ++step) {
#pragma unroll
    for (int r = 0; r < kLoads; ++r) {
      const int e = tid + r * kThreads;
      xs[e % kBK][e / kBK] = px[r];
      cs[e % kBK][e / kBK] = pc[r];
    }
    __syncthreads();
    if (step + 1 < steps) load(step + 1);
    if (step % nd == 0) {  // first dim tile of a code tile
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(&xs[kk][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&xs[kk][kHalf + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&cs[kk][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&cs[kk][kHalf + tx * 4]);
      const float av[kTM] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[kTN] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = __fmaf_rn(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();  // the next step overwrites the tiles
    if (step % nd != nd - 1) continue;
    // Last dim tile: score the code tile.  Ascending codes: strict "<" keeps the lowest of ties.
    const int c0 = code_begin + (step / nd) * kBN;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int code = c0 + (j < 4 ? tx * 4 + j : kHalf + tx * 4 + (j - 4));
      if (code < code_end) {
        const float aux = code_aux[code];
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          // l2: ||c||^2 - 2 x.c (2 x.c is exact); cosine: -(x.c) / max(||c||, eps).
          const float s = metric == VQ_METRIC_L2 ? __fsub_rn(aux, 2.f * acc[i][j])
                                                 : -__fmul_rn(acc[i][j], aux);
          if (s < best[i]) {
            best[i] = s;
            best_idx[i] = code;
          }
        }
      }
    }
  }

  // The 16 threads sharing a row group are lanes tx = 0..15 of one half-warp: butterfly merge
  // with the (score, index) order, so every lane ends with the group's best.
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const float os = __shfl_xor_sync(0xffffffffu, best[i], off);
      const int oi = __shfl_xor_sync(0xffffffffu, best_idx[i], off);
      if (better(os, oi, best[i], best_idx[i])) {
        best[i] = os;
        best_idx[i] = oi;
      }
    }
  }
  if (tx == 0) {
    const int64_t base = static_cast<int64_t>(blockIdx.y) * n;
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int row = row0 + (i < 4 ? ty * 4 + i : kHalf + ty * 4 + (i - 4));
      if (row < n) {
        part_score[base + row] = best[i];
        part_index[base + row] = best_idx[i];
      }
    }
  }
}

template <typename T>
cudaError_t launch_search_t(const T* x, int64_t x_rs, const T* cb, int64_t cb_rs, int n, int k,
                            int d, int metric, const SearchPlan& plan, const SearchBuffers& buf,
                            cudaStream_t stream) {
  {
    const int threads = 256;  // 8 codes per block
    const int64_t blocks = ceil_div(static_cast<int64_t>(k) * 32, threads);
    code_aux_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(cb, cb_rs, k, d,
                                                                              metric, buf.code_aux);
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kBM)), static_cast<unsigned>(plan.splits));
  search_tile_kernel<T><<<grid, kThreads, 0, stream>>>(x, x_rs, cb, cb_rs, buf.code_aux, n, k, d,
                                                       metric, plan.codes_per_split,
                                                       buf.part_score, buf.part_index);
  return cudaGetLastError();
}

}  // namespace

SearchPlan plan_search(int64_t n, int64_t k, int num_sms) {
  // Split K across blocks only when the row blocks alone cannot fill the GPU (small N, large K):
  // aim for about two blocks per multiprocessor.  The partials cost splits * N * 8 bytes, which
  // stays O(N) because splits > 1 only while N < 2 * num_sms * BM.
  SearchPlan p;
  const int64_t row_blocks = ceil_div(n > 0 ? n : 1, kBM);
  const int64_t code_tiles = ceil_div(k > 0 ? k : 1, kBN);
  const int64_t target = 2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int64_t splits = ceil_div(target, row_blocks);
  if (splits < 1) splits = 1;
  if (splits > code_tiles) splits = code_tiles;
  const int64_t tiles_per_split = ceil_div(code_tiles, splits);
  p.codes_per_split = static_cast<int>(tiles_per_split * kBN);
  p.splits = static_cast<int>(ceil_div(k > 0 ? k : 1, p.codes_per_split));  // no empty split
  return p;
}

SearchBuffers carve_search(Carver& c, int64_t n, int64_t k, int num_sms) {
  const SearchPlan p = plan_search(n, k, num_sms);
  SearchBuffers b;
  b.code_aux = c.take<float>(k);
  b.part_score = c.take<float>(static_cast<int64_t>(p.splits) * n);
  b.part_index = c.take<int>(static_cast<int64_t>(p.splits) * n);
  return b;
}

cudaError_t launch_search(const void* x, int64_t x_rs, const void* cb, int64_t cb_rs, int64_t n,
                          int64_t k, int64_t d, vq_dtype dtype, vq_metric metric,
                          const SearchPlan& plan, const SearchBuffers& buf, cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  if (n > INT_MAX || k > INT_MAX || d > INT_MAX) return cudaErrorInvalidValue;
  const int ni = static_cast<int>(n), ki = static_cast<int>(k), di = static_cast<int>(d);
  switch (dtype) {
    case VQ_FLOAT32:
      return launch_search_t(static_cast<const float*>(x), x_rs, static_cast<const float*>(cb),
                             cb_rs, ni, ki, di, metric, plan, buf, stream);
    case VQ_BFLOAT16:
      return launch_search_t(static_cast<const __nv_bfloat16*>(x), x_rs,
                             static_cast<const __nv_bfloat16*>(cb), cb_rs, ni, ki, di, metric,
                             plan, buf, stream);
    case VQ_FLOAT16:
      return launch_search_t(static_cast<const __half*>(x), x_rs, static_cast<const __half*>(cb),
                             cb_rs, ni, ki, di, metric, plan, buf, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vqk
