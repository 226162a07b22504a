// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ Tile building blocks of the codebook_softmax CPU kernels (included by codebook_softmax.cpp │
// │ only): packing, the fp32 tile product, logits per metric, the vectorizable exp, the row   │
// │ statistics pass.  Rows are the vector lanes of every loop (kRows per block).               │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
#pragma once

#include "cpu/common.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

// The BLAS that torch links (MKL in the x86 wheels; its LP64 Fortran entry points are exported by
// libtorch_cpu).  Weak: a torch without them leaves the pointers null and the hand-vectorized
// tile products run instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
// (MKL's C entry point; the lowercase name is the Fortran one, taking an int*)
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace vqkernels {
namespace cpu {
namespace softmax_tiles {

constexpr int64_t kRows = 32;   // rows per block: the vector lanes of every tile loop
constexpr int64_t kCodes = 64;  // codes per tile
constexpr float kEuclidEps = 1e-8f;

enum class Metric { kL2, kDot, kEuclid };

inline Metric parse_softmax_metric(c10::string_view metric, const char* op) {
  const std::string m(metric.data(), metric.size());
  if (m == "l2") return Metric::kL2;
  if (m == "dot") return Metric::kDot;
  if (m == "euclidean") return Metric::kEuclid;
  TORCH_CHECK(false, "vqkernels.", op, " (cpu backend): metric must be 'l2', 'dot' or ",
              "'euclidean' (cosine is 'dot' on normalized inputs), got '", m, "'");
}

// e^x for x <= 0 (every argument here is l − max or l − lse), vectorizable plain float code:
// Cephes' expf (Cody–Waite reduction x = n·ln2 + r, degree-6 polynomial, ~1 ulp), with 2^n
// built in the exponent bits.  Below −87 the result would be subnormal: return 0 (it is added to
// sums ≥ 1, where it is far below half an ulp).  Rounding to the nearest integer with the
// 1.5·2^23 trick (exact for |v| < 2^22, not folded away without fast-math).
VQK_INLINE inline float exp_neg(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float res = y * std::bit_cast<float>(bits);
  return x < -87.0f ? 0.0f : res;
}

// Fixed-order (pairwise) sum of kRows floats; vectorizes as 16+16, 8+8, ... lane adds.
VQK_INLINE inline float hsum_rows(const float* v) {
  float t[16];
  for (int i = 0; i < 16; ++i) t[i] = v[i] + v[i + 16];
  for (int i = 0; i < 8; ++i) t[i] = t[i] + t[i + 8];
  for (int i = 0; i < 4; ++i) t[i] = t[i] + t[i + 4];
  return (t[0] + t[2]) + (t[1] + t[3]);
}

// out[j·R + r] = Σ_d xt[d·R + r] · cb[j·D + d] for j < nc (rows in lanes; two codes per step so
// eight independent FMA chains are in flight).  Every element is the same fma chain over d = 0..
// D−1, whichever pass or pairing computes it, so recomputed tiles are bit-identical.
VQK_INLINE inline void tile_dot(const float* xt, const float* cb, int64_t D, int64_t nc,
                                float* out) {
  int64_t j = 0;
  for (; j + 2 <= nc; j += 2) {
    float a0[kRows] = {}, a1[kRows] = {};
    const float* c0 = cb + j * D;
    const float* c1 = c0 + D;
    for (int64_t d = 0; d < D; ++d) {
      const float* xr = xt + d * kRows;
      const float v0 = c0[d], v1 = c1[d];
      for (int r = 0; r < kRows; ++r) {
        a0[r] = std::fma(v0, xr[r], a0[r]);
        a1[r] = std::fma(v1, xr[r], a1[r]);
      }
    }
    std::memcpy(out + j * kRows, a0, sizeof(a0));
    std::memcpy(out + (j + 1) * kRows, a1, sizeof(a1));
  }
  for (; j < nc; ++j) {
    float a0[kRows] = {};
    const float* c0 = cb + j * D;
    for (int64_t d = 0; d < D; ++d) {
      const float* xr = xt + d * kRows;
      const float v0 = c0[d];
      for (int r = 0; r < kRows; ++r) a0[r] = std::fma(v0, xr[r], a0[r]);
    }
    std::memcpy(out + j * kRows, a0, sizeof(a0));
  }
}

// ── BLAS tile products ────────────────────────────────────────────────────────────────────────
// The backward's tile products (e·C for grad_x, eᵀ·X for grad_c; soft_quantize's p·V too) are
// single-threaded sgemm calls on the tile views at every D (2-4× faster than the hand loops, whose
// code-pass reduction is latency-bound), and so are the logits x·cᵀ from D = kGemmLogitsMinD on
// (below it the hand tile_dot, fused with the packed layout, is as fast: the pass is bound by exp,
// not by the product).  Measured on this 2-core AMD EPYC (MKL), N = 2048, K = 16384, 1 thread:
// backward 2.6× (D = 16) to 3× (D = 256) faster, forward 1.35× at D = 256.
// Numerics: still fp32 within a tile and fp64 across tiles; the BLAS sums a tile's products in its
// own blocked order, so results differ from the hand loops in the last bits; they are the same on
// every run and thread count on one machine (fixed tile sizes, 64-byte aligned buffers, one BLAS
// thread per call), not necessarily across CPUs whose BLAS picks another kernel.
// VQKERNELS_CPU_GEMM=0 turns the BLAS path off (the hand loops: bit-identical across ISAs).
constexpr int64_t kGemmLogitsMinD = 64;

inline bool gemm_available() {
  if (sgemm_ == nullptr) return false;
  const char* env = std::getenv("VQKERNELS_CPU_GEMM");
  return env == nullptr || std::string(env) != "0";
}

// One BLAS thread for the calls made by this thread (the tile is one task's work; a threaded
// BLAS would change the blocking, and so the bits, with the thread count).
struct SequentialBlas {
  int prev = -1;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr && prev >= 0) MKL_Set_Num_Threads_Local(prev);
  }
};

// C (column-major m x n, ldc) = op(A) · op(B), fp32, beta = 0.
inline void sgemm_tile(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a,
                       int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k),
            la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  const float one = 1.0f, zero = 0.0f;
  sgemm_(ta ? "T" : "N", tb ? "T" : "N", &mi, &ni, &ki, &one, a, &la, b, &lb, &zero, c, &lc);
}

// 64-byte aligned scratch (the BLAS's code path, and so its rounding, may depend on alignment).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) {
    const std::size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
    void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
using Buf = std::vector<float, Aligned64<float>>;

// Everything a pass needs, fp32 and packed once per call (O(N·D + K·D) memory).
struct Problem {
  bool gemm;         // e·C / eᵀ·X tile products through sgemm (BLAS available, not disabled)
  bool gemm_logits;  // logits tiles through sgemm too (D >= kGemmLogitsMinD)
  Metric metric;
  float inv_tau;
  double inv_tau_d;
  int64_t N, K, D, nb, nt;
  const float* xpack;  // [nb][D][kRows]: row blocks transposed, zero-padded rows
  const float* x32;    // [nb·kRows][D] row-major (zero-padded rows)
  const float* xsq;    // [nb·kRows] ‖x‖² (fp64 sum, rounded); 0 on padding
  const float* cb;     // [K][D] keys
  const float* csq;    // [K] ‖c‖²
};

struct Packed {
  at::Tensor xpack, x32, xsq, cb, csq;
};

inline Packed pack(const at::Tensor& x, const at::Tensor& codebook, int64_t nb) {
  const int64_t N = x.size(0), D = x.size(1);
  Packed p;
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor x32 = at::zeros({nb * kRows, D}, opts);
  if (N) x32.narrow(0, 0, N).copy_(x);
  p.x32 = x32;
  p.xpack = x32.view({nb, kRows, D}).transpose(1, 2).contiguous();
  p.xsq = x32.to(at::kDouble).square().sum(1).to(at::kFloat);
  p.cb = codebook.to(at::kFloat).contiguous();
  p.csq = p.cb.to(at::kDouble).square().sum(1).to(at::kFloat);
  return p;
}

inline Problem problem(const Packed& p, Metric metric, double temperature, int64_t N) {
  Problem P;
  P.metric = metric;
  P.inv_tau_d = 1.0 / temperature;
  P.inv_tau = static_cast<float>(P.inv_tau_d);
  P.N = N;
  P.K = p.cb.size(0);
  P.D = p.cb.size(1);
  P.nb = p.xpack.size(0);
  P.nt = (P.K + kCodes - 1) / kCodes;
  P.xpack = p.xpack.data_ptr<float>();
  P.x32 = p.x32.data_ptr<float>();
  P.xsq = p.xsq.data_ptr<float>();
  P.cb = p.cb.data_ptr<float>();
  P.csq = p.csq.data_ptr<float>();
  P.gemm = gemm_available();
  P.gemm_logits = P.gemm && P.D >= kGemmLogitsMinD;
  return P;
}

// Logits of block b against codes [k0, k0 + nc): l[j·R + r] (l2: relative to −‖x‖²/τ).  For
// "euclidean" also coef[j·R + r] = 1/sqrt(d²) where the 1e-8 clamp is inactive, else 0 (the
// derivative factor of the sqrt; the clamp's gradient is 0 as in the reference).
VQK_INLINE inline void logits_tile(const Problem& P, const float* keys, int64_t b, int64_t k0,
                                   int64_t nc, float* l, float* coef) {
  if (P.gemm_logits) {
    // l (column-major kRows x nc) = X_b (kRows x D, row-major) · C_tileᵀ.
    sgemm_tile(true, false, kRows, nc, P.D, P.x32 + b * kRows * P.D, P.D, keys + k0 * P.D, P.D,
               l, kRows);
  } else {
    tile_dot(P.xpack + b * P.D * kRows, keys + k0 * P.D, P.D, nc, l);
  }
  const float it = P.inv_tau;
  const float* csq = P.csq + k0;
  if (P.metric == Metric::kDot) {
    for (int64_t i = 0; i < nc * kRows; ++i) l[i] = l[i] * it;
  } else if (P.metric == Metric::kL2) {
    for (int64_t j = 0; j < nc; ++j) {
      const float cj = csq[j];
      for (int r = 0; r < kRows; ++r) l[j * kRows + r] = (2.0f * l[j * kRows + r] - cj) * it;
    }
  } else {
    const float* xsq = P.xsq + b * kRows;
    for (int64_t j = 0; j < nc; ++j) {
      const float cj = csq[j];
      for (int r = 0; r < kRows; ++r) {
        const float d2 = (xsq[r] - 2.0f * l[j * kRows + r]) + cj;
        const float s = std::sqrt(d2 > kEuclidEps ? d2 : kEuclidEps);
        l[j * kRows + r] = -s * it;
        coef[j * kRows + r] = d2 > kEuclidEps ? 1.0f / s : 0.0f;
      }
    }
  }
}

// ∂s/∂(x·c) factor turning ∂L/∂l into the weight e of c in grad_x (and of x in grad_c):
// grad_x = Σ_k e_k c_k − [not dot]·x·Σ_k e_k, grad_c = Σ_i e_i x_i − [not dot]·c·Σ_i e_i.
VQK_INLINE inline void scale_to_e(const Problem& P, int64_t nc, float* dl, const float* coef) {
  const float it = P.inv_tau;
  if (P.metric == Metric::kDot) {
    for (int64_t i = 0; i < nc * kRows; ++i) dl[i] = dl[i] * it;
  } else if (P.metric == Metric::kL2) {
    const float it2 = 2.0f * it;
    for (int64_t i = 0; i < nc * kRows; ++i) dl[i] = dl[i] * it2;
  } else {
    for (int64_t i = 0; i < nc * kRows; ++i) dl[i] = (dl[i] * it) * coef[i];
  }
}

// part[d·R + r] = Σ_j e[j·R + r] · m[j·D + d]  (fp32 tile partial, rows in lanes).
VQK_INLINE inline void accum_rows(bool gemm, const float* e, const float* m, int64_t D, int64_t nc,
                                  float* part) {
  if (gemm) {  // part (column-major kRows x D) = E (kRows x nc) · M (nc x D, row-major)
    sgemm_tile(false, true, kRows, D, nc, e, kRows, m, D, part, kRows);
    return;
  }
  for (int64_t i = 0; i < D * kRows; ++i) part[i] = 0.0f;
  for (int64_t j = 0; j < nc; ++j) {
    const float* mj = m + j * D;
    const float* ej = e + j * kRows;
    for (int64_t d = 0; d < D; ++d) {
      const float v = mj[d];
      float* pd = part + d * kRows;
      for (int r = 0; r < kRows; ++r) pd[r] = std::fma(ej[r], v, pd[r]);
    }
  }
}

// part[j·D + d] = Σ_r e[j·R + r] · xrows[r·D + d]: four interleaved partial sums (rows r ≡ 0..3
// mod 4, each in increasing order) combined as (s0 + s1) + (s2 + s3): a fixed order, so
// deterministic, with four independent FMA chains instead of one latency-bound chain over 32 rows.
VQK_INLINE inline void accum_codes(bool gemm, const float* e, const float* xrows, int64_t D,
                                   int64_t nc, float* part, float* scratch /* [4·D] */) {
  if (gemm) {  // part (column-major D x nc) = Xᵀ (D x kRows, X row-major) · E (kRows x nc)
    sgemm_tile(false, false, D, nc, kRows, xrows, D, e, kRows, part, D);
    return;
  }
  for (int64_t j = 0; j < nc; ++j) {
    float* s0 = scratch;
    float* s1 = scratch + D;
    float* s2 = scratch + 2 * D;
    float* s3 = scratch + 3 * D;
    for (int64_t i = 0; i < 4 * D; ++i) scratch[i] = 0.0f;
    const float* ej = e + j * kRows;
    for (int r = 0; r < kRows; r += 4) {
      const float w0 = ej[r], w1 = ej[r + 1], w2 = ej[r + 2], w3 = ej[r + 3];
      const float* x0 = xrows + r * D;
      for (int64_t d = 0; d < D; ++d) {
        s0[d] = std::fma(w0, x0[d], s0[d]);
        s1[d] = std::fma(w1, x0[D + d], s1[d]);
        s2[d] = std::fma(w2, x0[2 * D + d], s2[d]);
        s3[d] = std::fma(w3, x0[3 * D + d], s3[d]);
      }
    }
    float* pj = part + j * D;
    for (int64_t d = 0; d < D; ++d) pj[d] = (s0[d] + s1[d]) + (s2[d] + s3[d]);
  }
}

constexpr float kInf = std::numeric_limits<float>::infinity();

// Row statistics of one block over all codes: m (running max), S and T in fp64 (see the top).
VQK_INLINE inline void row_stats(const Problem& P, int64_t b, float* l, float* coef, float* m_out,
                                 double* S, double* T) {
  float m[kRows];
  for (int r = 0; r < kRows; ++r) {
    m[r] = -kInf;
    S[r] = 0.0;
    T[r] = 0.0;
  }
  for (int64_t t = 0; t < P.nt; ++t) {
    const int64_t k0 = t * kCodes, nc = std::min(kCodes, P.K - k0);
    logits_tile(P, P.cb, b, k0, nc, l, coef);
    float tmax[kRows];
    for (int r = 0; r < kRows; ++r) tmax[r] = -kInf;
    for (int64_t j = 0; j < nc; ++j)
      for (int r = 0; r < kRows; ++r) tmax[r] = std::max(tmax[r], l[j * kRows + r]);
    for (int r = 0; r < kRows; ++r) {
      if (tmax[r] > m[r]) {
        if (m[r] != -kInf) {
          // Rescale to the new max: e^{l−m'} = e^{m−m'}·e^{l−m}, (l−m') = (l−m) + (m−m').
          const double delta = static_cast<double>(m[r]) - static_cast<double>(tmax[r]);
          const double alpha = std::exp(delta);
          T[r] = alpha * (T[r] + delta * S[r]);
          S[r] = alpha * S[r];
        }
        m[r] = tmax[r];
      }
    }
    float ps[kRows] = {}, pt[kRows] = {};
    for (int64_t j = 0; j < nc; ++j) {
      for (int r = 0; r < kRows; ++r) {
        const float z = l[j * kRows + r] - m[r];
        const float e = exp_neg(z);
        ps[r] += e;
        pt[r] += e * z;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      S[r] += ps[r];
      T[r] += pt[r];
    }
  }
  for (int r = 0; r < kRows; ++r) m_out[r] = m[r];
}

}  // namespace softmax_tiles
}  // namespace cpu
}  // namespace vqkernels
