// ================================================================================================
// Deterministic per-code sums of rows (cluster_stats, ema_update_, the codebook gradient of
// quantize_backward), without a one-hot matrix and without order-dependent float atomics.
//
//   indices [N] int64 -> keys [N] uint32 (idx in [0, K), anything else -> K = "ignored")
//   1. stable radix sort of (key, row) pairs (CUB): rows of one code stay in row order;
//   2. seg[k] = first sorted position of code k (binary search; seg[K] = #valid rows) and
//      counts[k] = seg[k+1] - seg[k] (exact integers, written as float32);
//   3. the sorted positions are cut into fixed chunks of kChunk; one block per (chunk, D-slice)
//      walks its positions in order, one thread per dim, accumulating in float64.  A code whose
//      rows all lie in the chunk is written directly; a code spilling over a chunk edge leaves
//      the partial of the chunk's first/last run in `first`/`last` [chunks, D];
//   4. a fix-up pass per spilling code adds its partials in chunk order.
// Every sum is taken in a fixed order that depends only on the data (never on scheduling), so
// results are bitwise identical run to run; float64 accumulation of fp32 values makes them equal
// to the reference's float64 index_add_ rounded to fp32 in all but rare last-ulp cases.
// Long segments (a collapsed codebook) are split across chunks, so no block walks all N rows.
// ================================================================================================
#include <cub/device/device_radix_sort.cuh>

#include <climits>

#include "common.cuh"

namespace vqk {
namespace {

constexpr int kChunk = 64;  // sorted positions per block in the segmented sum

__global__ void make_keys_kernel(const int64_t* __restrict__ indices, int n, int k,
                                 uint32_t* __restrict__ keys, int* __restrict__ rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t idx = indices[i];
  keys[i] = (idx >= 0 && idx < k) ? static_cast<uint32_t>(idx) : static_cast<uint32_t>(k);
  rows[i] = static_cast<int>(i);
}

__device__ __forceinline__ int lower_bound(const uint32_t* __restrict__ keys, int n, uint32_t v) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + ((hi - lo) >> 1);
    if (keys[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// seg[c] for c in [0, K] and counts[c] for c < K.
__global__ void segments_kernel(const uint32_t* __restrict__ keys, int n, int k,
                                int* __restrict__ seg, float* __restrict__ counts) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c > k) return;
  const int start = lower_bound(keys, n, static_cast<uint32_t>(c));
  seg[c] = start;
  if (counts != nullptr && c < k) {
    const int end = lower_bound(keys, n, static_cast<uint32_t>(c + 1));
    counts[c] = static_cast<float>(end - start);
  }
}

// The summand of sorted row `row` (of code `code`) at dim `j`.
template <typename T, bool kGrad>
__device__ __forceinline__ float row_value(const T* __restrict__ x, int64_t x_rs,
                                           const T* __restrict__ cb, int64_t cb_rs, int row,
                                           uint32_t code, int j, float cg) {
  const float xv = to_f(x[static_cast<int64_t>(row) * x_rs + j]);
  if (!kGrad) return xv;
  // Reference: ((-2/numel) * g) * (x - q), each product rounded to fp32.
  const float diff = __fsub_rn(xv, to_f(cb[static_cast<int64_t>(code) * cb_rs + j]));
  return __fmul_rn(cg, diff);
}

template <typename T, typename OutT, bool kGrad>
__global__ void segsum_chunk_kernel(const T* __restrict__ x, int64_t x_rs, const T* __restrict__ cb,
                                    int64_t cb_rs, const float* __restrict__ grad_loss,
                                    float grad_coef, const uint32_t* __restrict__ keys,
                                    const int* __restrict__ rows, const int* __restrict__ seg,
                                    int k, int d, OutT* __restrict__ out,
                                    double* __restrict__ first, double* __restrict__ last) {
  const int n_valid = seg[k];
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  if (a0 >= n_valid) return;
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int a1 = static_cast<int>(a0 + kChunk < n_valid ? a0 + kChunk : n_valid);
  const float cg = kGrad ? __fmul_rn(grad_coef, *grad_loss) : 0.f;

  const int64_t slot = static_cast<int64_t>(blockIdx.x) * d + j;
  int run = static_cast<int>(a0);
  uint32_t cur = keys[run];
  double acc = 0.0;
  // Emit the run [s, e) of code `c`: directly when it is the code's whole segment, else as the
  // chunk's first and/or last partial for the fix-up pass.
  auto flush = [&](uint32_t c, int s, int e) {
    const bool starts = s > a0 || s == 0 || keys[s - 1] != c;
    const bool ends = e < a1 || e >= n_valid || keys[e] != c;
    if (starts && ends) {
      out[static_cast<int64_t>(c) * d + j] = from_f<OutT>(static_cast<float>(acc));
    } else {
      if (s == a0) first[slot] = acc;
      if (e == a1) last[slot] = acc;
    }
  };
  for (int pos = run; pos < a1; ++pos) {
    const uint32_t key = keys[pos];
    if (key != cur) {
      flush(cur, run, pos);
      cur = key;
      run = pos;
      acc = 0.0;
    }
    acc += static_cast<double>(row_value<T, kGrad>(x, x_rs, cb, cb_rs, rows[pos], key, j, cg));
  }
  flush(cur, run, a1);
}

// Codes whose rows span several chunks: last partial of the first chunk, then the (single-run)
// middle chunks, then the first partial of the last chunk, in chunk order.
template <typename OutT>
__global__ void segsum_fixup_kernel(const int* __restrict__ seg, int d,
                                    const double* __restrict__ first,
                                    const double* __restrict__ last, OutT* __restrict__ out) {
  const int64_t c = blockIdx.x;
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int s = seg[c], e = seg[c + 1];
  if (e <= s) return;
  const int p0 = s / kChunk, p1 = (e - 1) / kChunk;
  if (p0 == p1) return;
  double acc = last[static_cast<int64_t>(p0) * d + j];
  for (int p = p0 + 1; p <= p1; ++p) acc += first[static_cast<int64_t>(p) * d + j];
  out[c * d + j] = from_f<OutT>(static_cast<float>(acc));
}

int key_bits(int64_t k) {
  // Keys lie in [0, K]; sort only the bits that can be set.
  int bits = 1;
  while (bits < 32 && (static_cast<uint64_t>(k) >> bits) != 0) ++bits;
  return bits;
}

template <typename T, typename OutT, bool kGrad>
cudaError_t segment_sum_t(const T* x, int64_t x_rs, const T* cb, int64_t cb_rs,
                          const float* grad_loss, float grad_coef, int n, int k, int d,
                          const SegmentBuffers& buf, OutT* out, cudaStream_t stream) {
  const int threads = d >= 256 ? 256 : static_cast<int>(ceil_div(d, 32) * 32);
  const unsigned dblocks = static_cast<unsigned>(ceil_div(d, threads));
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kChunk)), dblocks);
  segsum_chunk_kernel<T, OutT, kGrad><<<grid, threads, 0, stream>>>(
      x, x_rs, cb, cb_rs, grad_loss, grad_coef, buf.keys, buf.rows, buf.seg, k, d, out, buf.first,
      buf.last);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  segsum_fixup_kernel<OutT><<<dim3(static_cast<unsigned>(k), dblocks), threads, 0, stream>>>(
      buf.seg, d, buf.first, buf.last, out);
  return cudaGetLastError();
}

size_t sort_temp_bytes(int64_t n, int64_t k) {
  size_t bytes = 0;
  if (n <= 0) return 0;
  // A size query only (null temp storage): no kernel runs, no memory is touched.
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                  static_cast<uint32_t*>(nullptr), static_cast<const int*>(nullptr),
                                  static_cast<int*>(nullptr), static_cast<int>(n), 0, key_bits(k));
  return bytes;
}

}  // namespace

SegmentBuffers carve_segments(Carver& c, int64_t n, int64_t k, int64_t d) {
  SegmentBuffers b;
  const int64_t chunks = ceil_div(n, kChunk);
  b.keys_in = c.take<uint32_t>(n);
  b.keys = c.take<uint32_t>(n);
  b.rows_in = c.take<int>(n);
  b.rows = c.take<int>(n);
  b.seg = c.take<int>(k + 1);
  b.first = c.take<double>(chunks * d);
  b.last = c.take<double>(chunks * d);
  b.sort_temp_bytes = sort_temp_bytes(n, k);
  b.sort_temp = c.take_bytes(b.sort_temp_bytes);
  return b;
}

cudaError_t launch_sort_by_code(const int64_t* indices, int64_t n, int64_t k,
                                const SegmentBuffers& buf, float* counts, cudaStream_t stream) {
  if (n < 0 || k < 0 || n > INT_MAX || k >= INT_MAX) return cudaErrorInvalidValue;
  const int ni = static_cast<int>(n), ki = static_cast<int>(k);
  if (ni > 0) {
    make_keys_kernel<<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream>>>(
        indices, ni, ki, buf.keys_in, buf.rows_in);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    size_t bytes = buf.sort_temp_bytes;
    err = cub::DeviceRadixSort::SortPairs(buf.sort_temp, bytes, buf.keys_in, buf.keys,
                                          buf.rows_in, buf.rows, ni, 0, key_bits(k), stream);
    if (err != cudaSuccess) return err;
  }
  segments_kernel<<<static_cast<unsigned>(ceil_div(k + 1, 256)), 256, 0, stream>>>(
      buf.keys, ni, ki, buf.seg, counts);
  return cudaGetLastError();
}

cudaError_t launch_segment_sum(const void* x, int64_t x_rs, const void* cb, int64_t cb_rs,
                               vq_dtype in_dtype, bool out_is_f32, int64_t n, int64_t k, int64_t d,
                               const float* grad_loss, float grad_coef, const SegmentBuffers& buf,
                               void* out, cudaStream_t stream) {
  if (n < 0 || k < 0 || d < 0 || n > INT_MAX || k >= INT_MAX || d > INT_MAX)
    return cudaErrorInvalidValue;
  const bool grad = grad_loss != nullptr;
  if (!grad && !out_is_f32) return cudaErrorInvalidValue;  // cluster sums are always fp32
  // Codes without rows are never written by the kernels: zero the output first (all-zero bits
  // are 0.0 in every supported dtype).
  const size_t elem = (out_is_f32 || in_dtype == VQ_FLOAT32) ? 4 : 2;
  cudaError_t err = cudaMemsetAsync(out, 0, elem * static_cast<size_t>(k * d), stream);
  if (err != cudaSuccess || n == 0 || k == 0 || d == 0) return err;
  const int ni = static_cast<int>(n), ki = static_cast<int>(k), di = static_cast<int>(d);
#define VQK_SEGSUM(T)                                                                             \
  do {                                                                                            \
    const T* xt = static_cast<const T*>(x);                                                       \
    const T* ct = static_cast<const T*>(cb);                                                      \
    if (grad && out_is_f32)                                                                       \
      return segment_sum_t<T, float, true>(xt, x_rs, ct, cb_rs, grad_loss, grad_coef, ni, ki, di, \
                                           buf, static_cast<float*>(out), stream);                \
    if (grad)                                                                                     \
      return segment_sum_t<T, T, true>(xt, x_rs, ct, cb_rs, grad_loss, grad_coef, ni, ki, di,     \
                                       buf, static_cast<T*>(out), stream);                        \
    return segment_sum_t<T, float, false>(xt, x_rs, ct, cb_rs, grad_loss, grad_coef, ni, ki, di,  \
                                          buf, static_cast<float*>(out), stream);                 \
  } while (0)
  switch (in_dtype) {
    case VQ_FLOAT32:
      VQK_SEGSUM(float);
    case VQ_BFLOAT16:
      VQK_SEGSUM(__nv_bfloat16);
    case VQ_FLOAT16:
      VQK_SEGSUM(__half);
  }
#undef VQK_SEGSUM
  return cudaErrorInvalidValue;
}

}  // namespace vqk
