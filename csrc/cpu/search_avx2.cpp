// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ AVX2 search block kernel (see common.h for the packed layout and the contract).            │
// │   tile = 16 rows (two ymm of 8 row lanes) x 6 codes: 12 ymm accumulators;                  │
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

// Same algorithm and the same arithmetic order as the AVX-512 kernel (search_avx512.cpp), on 8
// lanes: G = 2 ymm row groups x CT = 6 codes = 12 accumulators + 2 row vectors + 1 broadcast of
// the 16 ymm registers (the running best is reloaded from the stack only in the epilogue).
template <int G, int CT>
void block(const float* xt, int64_t ntiles, const float* cb, const float* bias, int64_t D,
           int64_t ct0, int64_t ct1, float* bval, int32_t* bidx) {
  constexpr int64_t RT = 8 * G;
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* xtile = xt + t * D * RT;
    __m256 bv[G];
    __m256i bi[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      bv[g] = _mm256_loadu_ps(bval + t * RT + 8 * g);
      bi[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bidx + t * RT + 8 * g));
    }
    for (int64_t c = ct0; c < ct1; ++c) {
      const float* ctile = cb + c * D * CT;
      const float* cbias = bias + c * CT;
      __m256 a[G][CT];
#pragma GCC unroll 16
      for (int j = 0; j < CT; ++j) {
        const __m256 b = _mm256_set1_ps(cbias[j]);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) a[g][j] = b;
      }
      for (int64_t d = 0; d < D; ++d) {
        __m256 x[G];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) x[g] = _mm256_load_ps(xtile + d * RT + 8 * g);
        const float* cd = ctile + d * CT;
#pragma GCC unroll 16
        for (int j = 0; j < CT; ++j) {
          const __m256 b = _mm256_set1_ps(cd[j]);
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) a[g][j] = _mm256_fmadd_ps(x[g], b, a[g][j]);
        }
      }
      // Fast reject seeded with the running best; NaN-safe as in the AVX-512 kernel (vminps
      // returns its second operand, the running minimum, when the score is NaN).
      __m256 any = _mm256_setzero_ps();
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        __m256 m = bv[g];
#pragma GCC unroll 16
        for (int j = 0; j < CT; ++j) m = _mm256_min_ps(a[g][j], m);
        any = _mm256_or_ps(any, _mm256_cmp_ps(m, bv[g], _CMP_LT_OQ));
      }
      if (__builtin_expect(_mm256_movemask_ps(any) != 0, 0)) {
        // Rare: update in code order; strict '<' keeps the lowest index among equal scores.
#pragma GCC unroll 16
        for (int j = 0; j < CT; ++j) {
          const __m256 kj =
              _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(c * CT + j)));
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) {
            const __m256 l = _mm256_cmp_ps(a[g][j], bv[g], _CMP_LT_OQ);
            bv[g] = _mm256_blendv_ps(bv[g], a[g][j], l);
            bi[g] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi[g]), kj, l));
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      _mm256_storeu_ps(bval + t * RT + 8 * g, bv[g]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bidx + t * RT + 8 * g), bi[g]);
    }
  }
}

}  // namespace

SearchKernel avx2_search_kernel(int64_t /*D*/) { return {Isa::kAvx2, 16, 6, &block<2, 6>}; }

}  // namespace cpu
}  // namespace vqkernels

#pragma GCC pop_options

#endif  // x86-64
