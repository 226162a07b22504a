// ================================================================================================
// Shared device helpers of the vqkernels CUDA backend (plain CUDA, no torch headers).
//
// Numerics: every value is converted to float32 on load (bf16/fp16 -> fp32 is exact) and every
// rounding step that the reference performs is spelled with an explicit round-to-nearest
// intrinsic (__fadd_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn...).  setup.py compiles with
// --use_fast_math; these intrinsics keep IEEE rounding regardless and stop the compiler from
// contracting a reference multiply-then-add into one FMA where the bits matter.
// ================================================================================================
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "vq_cuda.h"

namespace vqk {

// ---------------------------------------------------------------- dtype conversion (fp32 math)
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------ (score, index) total order
// "a is better than b": smaller score, ties -> lower index (torch.argmin's rule).  NaN compares
// false both ways, so a NaN score never replaces a finite or infinite one.
__device__ __forceinline__ bool better(float sa, int ia, float sb, int ib) {
  return sa < sb || (sa == sb && ia < ib);
}

// Sum over the 32 lanes of a warp with a fixed butterfly: the same bits on every run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------ workspace carving
// One function lays out a launcher's scratch both for sizing (base == nullptr) and for use, so
// the size the bindings allocate and the pointers the kernels get cannot disagree.
struct Carver {
  char* base;
  size_t offset = 0;
  explicit Carver(void* b) : base(static_cast<char*>(b)) {}
  template <typename T>
  T* take(int64_t count) {
    offset = (offset + 255) & ~size_t(255);
    T* p = base ? reinterpret_cast<T*>(base + offset) : nullptr;
    offset += sizeof(T) * static_cast<size_t>(count > 0 ? count : 0);
    return p;
  }
  void* take_bytes(size_t bytes) {
    offset = (offset + 255) & ~size_t(255);
    void* p = base ? static_cast<void*>(base + offset) : nullptr;
    offset += bytes;
    return p;
  }
  size_t size() const { return (offset + 255) & ~size_t(255); }
};

// ------------------------------------------------------------ internal host helpers (per TU)
// Codebook search: writes, for every row and every K-split, the best (score, index) of that
// split.  Defined in search.cu; used by nearest_code.cu and quantize.cu.
struct SearchPlan {
  int splits = 1;           // blocks along K
  int codes_per_split = 0;  // multiple of the code tile
};
SearchPlan plan_search(int64_t n, int64_t k, int num_sms);
struct SearchBuffers {
  float* code_aux = nullptr;    // [K]: ||c||^2 (l2) or 1/max(||c||, eps) (cosine)
  float* part_score = nullptr;  // [splits, N]
  int* part_index = nullptr;    // [splits, N]
};
SearchBuffers carve_search(Carver& c, int64_t n, int64_t k, int num_sms);
cudaError_t launch_search(const void* x, int64_t x_rs, const void* cb, int64_t cb_rs, int64_t n,
                          int64_t k, int64_t d, vq_dtype dtype, vq_metric metric,
                          const SearchPlan& plan, const SearchBuffers& buf, cudaStream_t stream);

// Deterministic segmented sums by code.  Defined in segment_sum.cu; used by ema_update.cu
// (cluster sums of x) and quantize.cu (codebook gradient).
struct SegmentBuffers {
  uint32_t* keys_in = nullptr;   // [N]
  uint32_t* keys = nullptr;      // [N] sorted
  int* rows_in = nullptr;        // [N]
  int* rows = nullptr;           // [N] sorted (stable: row order within a code)
  int* seg = nullptr;            // [K + 1] start of each code's rows; seg[K] = #valid rows
  double* first = nullptr;       // [chunks, D] partial sum of each chunk's first run
  double* last = nullptr;        // [chunks, D] partial sum of each chunk's last run
  void* sort_temp = nullptr;
  size_t sort_temp_bytes = 0;
};
SegmentBuffers carve_segments(Carver& c, int64_t n, int64_t k, int64_t d);
// Sort rows by code and (when counts != null) write counts[K] as float.
cudaError_t launch_sort_by_code(const int64_t* indices, int64_t n, int64_t k,
                                const SegmentBuffers& buf, float* counts, cudaStream_t stream);
// out[k, :] = sum over code k's rows of value(row), zero for empty codes; `out` is [K, D]
// contiguous, float32 when out_is_f32 else in_dtype.  value(row) = x[row] (grad_loss == null) or,
// for the codebook gradient, (grad_coef * grad_loss) * (x[row] - codebook[k]) rounded in fp32
// as the reference rounds it.  Sums accumulate in float64.
cudaError_t launch_segment_sum(const void* x, int64_t x_rs, const void* cb, int64_t cb_rs,
                               vq_dtype in_dtype, bool out_is_f32, int64_t n, int64_t k, int64_t d,
                               const float* grad_loss, float grad_coef, const SegmentBuffers& buf,
                               void* out, cudaStream_t stream);

}  // namespace vqk
