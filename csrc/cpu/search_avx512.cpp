// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ AVX-512 search block kernel (see common.h for the packed layout and the contract).         │
// │   tile = 16·G rows (G zmm of 16 row lanes) x CT codes: G·CT = 24 zmm accumulators;         │
// │   score = bias[k] + Σ_d xt[d][row]·cb[k][d] (fp32 FMA), folded into a per-row running       │
// │   (min, argmin) held in registers; ties keep the lowest index.                             │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
// Compiled for AVX-512F with a function-level target (no -march in the build) and only called
// after __builtin_cpu_supports("avx512f") said yes (nearest_code.cpp: best_isa()).
#include "cpu/common.h"

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12 false positive inside <avx512fintrin.h>: _mm512_min_ps passes _mm512_undefined_ps(),
// a deliberately self-initialized value, as the (unused, all-ones mask) merge source.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace vqkernels {
namespace cpu {
namespace {

// One block = `ntiles` row tiles of RT = 16·G rows (G zmm of 16 row lanes) against code tiles of
// CT codes: G·CT zmm accumulators.  Measured on Zen 4 (one core, fp32 GFLOP/s): G=4, CT=6 is
// best for small D (fewest broadcasts per FMA: D=8 ~106 vs ~99 for 2x12), G=6, CT=4 for large D
// (~120 at D=256 vs ~112 for 2x12).
//
// Numerics: acc starts at the code's bias (‖c‖² for L2, 0 for cosine) and adds x_d·(scale·c_d)
// with one fused multiply-add per d in increasing d, the same order in every ISA's kernel (the
// scalar one uses std::fma), so all ISAs return the same bits.  Versus the reference's
// fl(‖c‖² − fl(2·x·c)) the rounding differs by O(D·u·(‖c‖² + |x|·|c|)), the size of the
// reference's own error; only near-ties below that can pick a different code.
template <int G, int CT>
void block(const float* xt, int64_t ntiles, const float* cb, const float* bias, int64_t D,
           int64_t ct0, int64_t ct1, float* bval, int32_t* bidx) {
  constexpr int64_t RT = 16 * G;
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* xtile = xt + t * D * RT;
    __m512 bv[G];
    __m512i bi[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      bv[g] = _mm512_loadu_ps(bval + t * RT + 16 * g);
      bi[g] = _mm512_loadu_si512(bidx + t * RT + 16 * g);
    }
    for (int64_t c = ct0; c < ct1; ++c) {
      const float* ctile = cb + c * D * CT;
      const float* cbias = bias + c * CT;
      __m512 a[G][CT];
#pragma GCC unroll 16
      for (int j = 0; j < CT; ++j) {
        const __m512 b = _mm512_set1_ps(cbias[j]);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) a[g][j] = b;
      }
      for (int64_t d = 0; d < D; ++d) {
        __m512 x[G];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) x[g] = _mm512_load_ps(xtile + d * RT + 16 * g);
        const float* cd = ctile + d * CT;
#pragma GCC unroll 16
        for (int j = 0; j < CT; ++j) {
          const __m512 b = _mm512_set1_ps(cd[j]);
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) a[g][j] = _mm512_fmadd_ps(x[g], b, a[g][j]);
        }
      }
      // Fast reject: m = min(score_j, m) seeded with the running best.  vminps returns its
      // second operand when either is NaN, so a NaN score (NaN/Inf in the data) never poisons
      // m and never hides a finite improvement: m < best exactly when some code of the tile
      // strictly improves some row of the group.
      __mmask16 any = 0;
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        __m512 m = bv[g];
#pragma GCC unroll 16
        for (int j = 0; j < CT; ++j) m = _mm512_min_ps(a[g][j], m);
        any |= _mm512_cmp_ps_mask(m, bv[g], _CMP_LT_OQ);
      }
      if (__builtin_expect(any != 0, 0)) {
        // Rare after the first tiles (a row improves O(log K) times): update in code order.
        // Rows live in lanes, so each lane sees codes in increasing index order and the strict
        // '<' keeps the first of equal scores (torch.argmin's tie rule) with no cross-lane merge.
#pragma GCC unroll 16
        for (int j = 0; j < CT; ++j) {
          const __m512i kj = _mm512_set1_epi32(static_cast<int32_t>(c * CT + j));
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) {
            const __mmask16 l = _mm512_cmp_ps_mask(a[g][j], bv[g], _CMP_LT_OQ);
            bv[g] = _mm512_mask_blend_ps(l, bv[g], a[g][j]);
            bi[g] = _mm512_mask_blend_epi32(l, bi[g], kj);
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      _mm512_storeu_ps(bval + t * RT + 16 * g, bv[g]);
      _mm512_storeu_si512(bidx + t * RT + 16 * g, bi[g]);
    }
  }
}

}  // namespace

SearchKernel avx512_search_kernel(int64_t D) {
  if (D <= 32) return {Isa::kAvx512, 64, 6, &block<4, 6>};
  return {Isa::kAvx512, 96, 4, &block<6, 4>};
}

}  // namespace cpu
}  // namespace vqkernels

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // x86-64
