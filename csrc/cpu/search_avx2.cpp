// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ AVX2 search block kernel (see common.h for the packed layout and the contract).            │
// │   tile = 16 rows (two ymm of 8 row lanes) x 6 codes: 12 of the 16 ymm registers;           │
// │   score = bias[k] + Σ_d xt[d][row]·cb[k][d] (fp32 FMA), folded into a per-row running       │
// │   (min, argmin) held in registers; ties keep the lowest index.                             │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
// Compiled for AVX2+FMA with a function-level target (no -march in the build) and only called
// after __builtin_cpu_supports("avx2"/"fma") said yes (nearest_code.cpp: best_isa()).
#include "cpu/common.h"

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace vqkernels {
namespace cpu {
namespace {

constexpr int64_t RT = 16;  // rows per tile: 2 x 8 lanes
constexpr int CT = 6;       // codes per tile: 2 x 6 = 12 accumulators of the 16 ymm registers

// One row tile x one code tile.  Rows live in lanes, so every lane sees the codes in increasing
// index order: the strict '<' keeps the first of equal scores (torch.argmin's tie rule) without
// any cross-lane merge.
__attribute__((always_inline)) inline void tile(const float* __restrict xt,
                                                const float* __restrict ct,
                                                const float* __restrict bias, int64_t D,
                                                int32_t kbase, __m256& bv0, __m256& bv1,
                                                __m256i& bi0, __m256i& bi1) {
  __m256 a0[CT], a1[CT];
#pragma GCC unroll 6
  for (int j = 0; j < CT; ++j) {
    a0[j] = _mm256_setzero_ps();
    a1[j] = _mm256_setzero_ps();
  }
  for (int64_t d = 0; d < D; ++d) {
    const __m256 x0 = _mm256_load_ps(xt + d * RT);
    const __m256 x1 = _mm256_load_ps(xt + d * RT + 8);
    const float* c = ct + d * CT;
#pragma GCC unroll 6
    for (int j = 0; j < CT; ++j) {
      const __m256 b = _mm256_set1_ps(c[j]);
      a0[j] = _mm256_fmadd_ps(x0, b, a0[j]);
      a1[j] = _mm256_fmadd_ps(x1, b, a1[j]);
    }
  }
  // score = dot + bias: one rounding, like the reference's c_sq − 2·(x·c).
#pragma GCC unroll 6
  for (int j = 0; j < CT; ++j) {
    const __m256 bj = _mm256_set1_ps(bias[j]);
    a0[j] = _mm256_add_ps(a0[j], bj);
    a1[j] = _mm256_add_ps(a1[j], bj);
  }
  // Fast reject: m = min(score_j, m) seeded with the running best.  vminps returns its second
  // operand when either is NaN, so a NaN score (NaN/Inf in the data) can never poison m and
  // hide a finite improvement; m < best exactly when some code in the tile strictly improves.
  __m256 m0 = bv0, m1 = bv1;
#pragma GCC unroll 6
  for (int j = 0; j < CT; ++j) {
    m0 = _mm256_min_ps(a0[j], m0);
    m1 = _mm256_min_ps(a1[j], m1);
  }
  const __m256 u0 = _mm256_cmp_ps(m0, bv0, _CMP_LT_OQ);
  const __m256 u1 = _mm256_cmp_ps(m1, bv1, _CMP_LT_OQ);
  if (__builtin_expect(_mm256_movemask_ps(_mm256_or_ps(u0, u1)) != 0, 0)) {
    // Rare after the first tiles (a row improves O(log K) times): update in code order.
#pragma GCC unroll 6
    for (int j = 0; j < CT; ++j) {
      const __m256i kj = _mm256_set1_epi32(kbase + j);
      const __m256 l0 = _mm256_cmp_ps(a0[j], bv0, _CMP_LT_OQ);
      const __m256 l1 = _mm256_cmp_ps(a1[j], bv1, _CMP_LT_OQ);
      bv0 = _mm256_blendv_ps(bv0, a0[j], l0);
      bv1 = _mm256_blendv_ps(bv1, a1[j], l1);
      bi0 = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(bi0), _mm256_castsi256_ps(kj), l0));
      bi1 = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(bi1), _mm256_castsi256_ps(kj), l1));
    }
  }
}

void avx2_block(const float* xt, int64_t ntiles, const float* cb, const float* bias, int64_t D,
                  int64_t ct0, int64_t ct1, float* bval, int32_t* bidx) {
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* xtile = xt + t * D * RT;
    __m256 bv0 = _mm256_loadu_ps(bval + t * RT);
    __m256 bv1 = _mm256_loadu_ps(bval + t * RT + 8);
    __m256i bi0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bidx + t * RT));
    __m256i bi1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bidx + t * RT + 8));
    for (int64_t c = ct0; c < ct1; ++c) {
      tile(xtile, cb + c * D * CT, bias + c * CT, D, static_cast<int32_t>(c * CT), bv0, bv1, bi0,
           bi1);
    }
    _mm256_storeu_ps(bval + t * RT, bv0);
    _mm256_storeu_ps(bval + t * RT + 8, bv1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bidx + t * RT), bi0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bidx + t * RT + 8), bi1);
  }
}

}  // namespace

SearchKernel avx2_search_kernel() { return {Isa::kAvx2, RT, CT, &avx2_block}; }

}  // namespace cpu
}  // namespace vqkernels

#pragma GCC pop_options

#endif  // x86-64
