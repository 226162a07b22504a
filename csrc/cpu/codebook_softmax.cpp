// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ codebook_softmax family (schemas in vqkernels/_ops.py, spec in reference/codebook_softmax) │
// │ code_distribution(x[N,D], codebook[K,D], row_weight[N] f32, τ, metric)                     │
// │     -> (logsumexp[N] f32, entropy[N] f32, mean_probs[K] f32)                               │
// │ code_distribution_backward(g_lse[N]|[0], g_H[N]|[0], g_mp[K]|[0], x, codebook, row_weight, │
// │     logsumexp, entropy, τ, metric) -> (grad_x[N,D] dtype x, grad_codebook[K,D] dtype cb)   │
// │ soft_quantize(x[N,D], keys[K,D], values[K,D], τ, metric)                                   │
// │     -> (out[N,D] dtype x, lse[N] f32, indices[N] i64 = argmax_k l_ik, ties -> lowest)      │
// │ soft_quantize_backward(grad_out, x, keys, values, out, lse, τ, metric)                     │
// │     -> (grad_x, grad_keys, grad_values)                                                    │
// │ metric: "l2" (−‖x−c‖²), "dot" (x·c), "euclidean" (−sqrt(max(‖x−c‖², 1e-8))); logits s/τ.   │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
// Never an N x K matrix: the codebook is streamed in tiles of kCodes codes against blocks of
// kRows rows; a tile of logits (kCodes x kRows fp32, 8 KiB) lives in one thread's scratch.
//
// Passes (FlashAttention-2 style; every tile is recomputed, bit-identically, where needed):
//   forward  row pass   (blocks of rows in parallel): online max m and, in fp64, S = Σ e^{l−m}
//                        and T = Σ e^{l−m}(l−m), rescaled when m grows; lse = m + log S,
//                        entropy = log S − T/S (relative to the running max: no accuracy is lost
//                        at small τ, where l itself is large);
//            code pass  (tiles of codes in parallel): mean_probs_k = Σ_i w_i·e^{l_ik − lse_i}.
//   backward row pass(es) for grad_x (one extra row pass for ḡ_i = Σ_k p_ik g_k when
//                        mean_probs has a gradient), code pass for grad_codebook.
// Determinism: each output element is produced by exactly one task, which walks the other axis
// in a fixed order with fixed tile sizes (fp32 within a tile, fp64 across tiles), so results are
// the same bits on every run and thread count; no atomics, no per-thread partials.
//
// Logits of l2 are computed relative to the row constant −‖x‖²/τ (softmax is shift-invariant):
// l'_ik = (2·x·c − ‖c‖²)/τ; only lse adds −‖x‖²/τ back (in fp64), so p, the entropy and
// mean_probs do not carry the cancellation error of ‖x‖² at small τ.
#include "cpu/common.h"

#include <ATen/Parallel.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

namespace vqkernels {
namespace cpu {

namespace {

constexpr int64_t kRows = 32;   // rows per block: the vector lanes of every tile loop
constexpr int64_t kCodes = 64;  // codes per tile
constexpr float kEuclidEps = 1e-8f;

enum class Metric { kL2, kDot, kEuclid };

Metric parse_softmax_metric(c10::string_view metric, const char* op) {
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

// Everything a pass needs, fp32 and packed once per call (O(N·D + K·D) memory).
struct Problem {
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

Packed pack(const at::Tensor& x, const at::Tensor& codebook, int64_t nb) {
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

Problem problem(const Packed& p, Metric metric, double temperature, int64_t N) {
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
  return P;
}

// Logits of block b against codes [k0, k0 + nc): l[j·R + r] (l2: relative to −‖x‖²/τ).  For
// "euclidean" also coef[j·R + r] = 1/sqrt(d²) where the 1e-8 clamp is inactive, else 0 (the
// derivative factor of the sqrt; the clamp's gradient is 0 as in the reference).
VQK_INLINE inline void logits_tile(const Problem& P, const float* keys, int64_t b, int64_t k0,
                                   int64_t nc, float* l, float* coef) {
  tile_dot(P.xpack + b * P.D * kRows, keys + k0 * P.D, P.D, nc, l);
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

// acc[d·R + r] += Σ_j e[j·R + r] · m[j·D + d]  (fp32 tile partial, rows in lanes).
VQK_INLINE inline void accum_rows(const float* e, const float* m, int64_t D, int64_t nc,
                                  float* part) {
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
VQK_INLINE inline void accum_codes(const float* e, const float* xrows, int64_t D, int64_t nc,
                                   float* part, float* scratch /* [4·D] */) {
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

// lse in the logits' frame (l2: relative), +inf on padding rows so that their p is exactly 0.
at::Tensor relative_lse(const Problem& P, const at::Tensor& lse) {
  auto rel = at::full({P.nb * kRows}, kInf, lse.options().dtype(at::kFloat));
  if (P.N) {
    auto head = rel.narrow(0, 0, P.N);
    if (P.metric == Metric::kL2) {
      auto xsq = at::from_blob(const_cast<float*>(P.xsq), {P.N}, lse.options().dtype(at::kFloat));
      head.copy_((lse.to(at::kDouble) + xsq.to(at::kDouble) * P.inv_tau_d).to(at::kFloat));
    } else {
      head.copy_(lse);
    }
  }
  return rel;
}

at::Tensor padded(const at::Tensor& t, int64_t len, float fill) {
  auto out = at::full({len}, fill, t.options().dtype(at::kFloat));
  if (t.numel()) out.narrow(0, 0, t.numel()).copy_(t);
  return out;
}

void check_2d_pair(const at::Tensor& x, const at::Tensor& cb, const char* op) {
  check_same_dtype_and_dim(x, cb);
  TORCH_CHECK(cb.size(0) >= 1, "vqkernels.", op, " (cpu backend): the codebook needs K >= 1 codes");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> code_distribution(const at::Tensor& x,
                                                                 const at::Tensor& codebook,
                                                                 const at::Tensor& row_weight,
                                                                 double temperature,
                                                                 c10::string_view metric_name) {
  check_2d_pair(x, codebook, "code_distribution");
  const Metric metric = parse_softmax_metric(metric_name, "code_distribution");
  TORCH_CHECK(temperature > 0.0, "vqkernels.code_distribution: temperature must be > 0");
  const int64_t N = x.size(0), K = codebook.size(0);
  TORCH_CHECK(row_weight.numel() == N, "vqkernels.code_distribution (cpu backend): row_weight ",
              "must have N = ", N, " entries, got ", row_weight.sizes());
  auto f32 = x.options().dtype(at::kFloat);
  auto lse = at::empty({N}, f32), entropy = at::empty({N}, f32);
  auto mean_probs = at::zeros({K}, f32);
  if (N == 0) return {lse, entropy, mean_probs};
  const int64_t nb = (N + kRows - 1) / kRows;
  const Packed pk = pack(x, codebook, nb);
  const Problem P = problem(pk, metric, temperature, N);
  auto lse_rel = at::empty({nb * kRows}, f32);
  float* lrp = lse_rel.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  float* hp = entropy.data_ptr<float>();
  const Isa isa = active_isa();
  const double inv_tau_d = 1.0 / temperature;

  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> l(kCodes * kRows), coef(kCodes * kRows);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t b = b0; b < b1; ++b) {
        float m[kRows];
        double S[kRows], T[kRows];
        row_stats(P, b, l.data(), coef.data(), m, S, T);
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = b * kRows + r;
          const double logS = std::log(S[r]);
          const double rel = static_cast<double>(m[r]) + logS;
          lrp[i] = i < N ? static_cast<float>(rel) : kInf;
          if (i < N) {
            const double shift =
                P.metric == Metric::kL2 ? static_cast<double>(P.xsq[i]) * inv_tau_d : 0.0;
            lp[i] = static_cast<float>(rel - shift);
            // entropy = log S − Σ p (l − m), clamped at 0 (it is ≥ 0; rounding can make a
            // one-hot row's value a few ulps negative).
            hp[i] = static_cast<float>(std::max(logS - T[r] / S[r], 0.0));
          }
        }
      }
    });
  });

  const at::Tensor w = padded(row_weight, nb * kRows, 0.0f);
  const float* wp = w.data_ptr<float>();
  float* mpp = mean_probs.data_ptr<float>();
  at::parallel_for(0, P.nt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> l(kCodes * kRows), coef(kCodes * kRows);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
        double acc[kCodes] = {};
        for (int64_t b = 0; b < nb; ++b) {
          logits_tile(P, P.cb, b, k0, nc, l.data(), coef.data());
          const float* lr = lrp + b * kRows;
          const float* wr = wp + b * kRows;
          for (int64_t j = 0; j < nc; ++j) {
            float* lj = l.data() + j * kRows;
            for (int r = 0; r < kRows; ++r) lj[r] = wr[r] * exp_neg(lj[r] - lr[r]);
            acc[j] += hsum_rows(lj);
          }
        }
        for (int64_t j = 0; j < nc; ++j) mpp[k0 + j] = static_cast<float>(acc[j]);
      }
    });
  });
  return {lse, entropy, mean_probs};
}

std::tuple<at::Tensor, at::Tensor> code_distribution_backward(
    const at::Tensor& grad_lse, const at::Tensor& grad_entropy, const at::Tensor& grad_mp,
    const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& row_weight,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    c10::string_view metric_name) {
  check_2d_pair(x, codebook, "code_distribution_backward");
  const Metric metric = parse_softmax_metric(metric_name, "code_distribution_backward");
  const int64_t N = x.size(0), K = codebook.size(0), D = x.size(1);
  const bool has_l = grad_lse.numel() > 0, has_h = grad_entropy.numel() > 0,
             has_m = grad_mp.numel() > 0;
  TORCH_CHECK(!has_l || grad_lse.numel() == N, "code_distribution_backward: grad_logsumexp ",
              "must have N entries or none");
  TORCH_CHECK(!has_h || grad_entropy.numel() == N, "code_distribution_backward: grad_entropy ",
              "must have N entries or none");
  TORCH_CHECK(!has_m || grad_mp.numel() == K, "code_distribution_backward: grad_mean_probs ",
              "must have K entries or none");
  auto f32 = x.options().dtype(at::kFloat);
  if (N == 0 || (!has_l && !has_h && !has_m)) {
    return {at::zeros({N, D}, x.options()), at::zeros({K, D}, codebook.options())};
  }
  const int64_t nb = (N + kRows - 1) / kRows, R = nb * kRows;
  const Packed pk = pack(x, codebook, nb);
  const Problem P = problem(pk, metric, temperature, N);
  const at::Tensor lrel = relative_lse(P, lse.to(at::kFloat));
  const at::Tensor gl = has_l ? padded(grad_lse.to(at::kFloat), R, 0.f) : at::zeros({R}, f32);
  const at::Tensor gh = has_h ? padded(grad_entropy.to(at::kFloat), R, 0.f) : at::zeros({R}, f32);
  const at::Tensor hh = padded(entropy.to(at::kFloat), R, 0.f);
  const at::Tensor w = padded(row_weight.to(at::kFloat), R, 0.f);
  const at::Tensor gm = has_m ? grad_mp.to(at::kFloat).contiguous() : at::zeros({K}, f32);
  at::Tensor gbar = at::zeros({R}, f32);
  const float *lrp = lrel.data_ptr<float>(), *glp = gl.data_ptr<float>(),
              *ghp = gh.data_ptr<float>(), *hp = hh.data_ptr<float>(), *wp = w.data_ptr<float>(),
              *gmp = gm.data_ptr<float>();
  float* gbp = gbar.data_ptr<float>();
  const Isa isa = active_isa();

  if (has_m) {
    // ḡ_i = Σ_k p_ik g_k (its own row pass: folding it into the grad_x pass would need
    // Σ p g c − ḡ Σ p c, which cancels when g is nearly constant, as for entropy gradients).
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> l(kCodes * kRows), coef(kCodes * kRows);
      with_isa(isa, [&]() VQK_INLINE {
        for (int64_t b = b0; b < b1; ++b) {
          const float* lr = lrp + b * kRows;
          double acc[kRows] = {};
          for (int64_t t = 0; t < P.nt; ++t) {
            const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
            logits_tile(P, P.cb, b, k0, nc, l.data(), coef.data());
            float part[kRows] = {};
            for (int64_t j = 0; j < nc; ++j) {
              const float g = gmp[k0 + j];
              for (int r = 0; r < kRows; ++r)
                part[r] = std::fma(exp_neg(l[j * kRows + r] - lr[r]), g, part[r]);
            }
            for (int r = 0; r < kRows; ++r) acc[r] += part[r];
          }
          for (int r = 0; r < kRows; ++r) gbp[b * kRows + r] = static_cast<float>(acc[r]);
        }
      });
    });
  }

  // e_ik (weight of c_k in grad_x_i and of x_i in grad_c_k) for block b, codes [k0, k0 + nc).
  auto e_tile = [&](int64_t b, int64_t k0, int64_t nc, float* l, float* coef) VQK_INLINE {
    logits_tile(P, P.cb, b, k0, nc, l, coef);
    const float *lr = lrp + b * kRows, *a = glp + b * kRows, *bh = ghp + b * kRows,
                *h = hp + b * kRows, *wr = wp + b * kRows, *gb = gbp + b * kRows;
    for (int64_t j = 0; j < nc; ++j) {
      const float g = gmp[k0 + j];
      float* lj = l + j * kRows;
      for (int r = 0; r < kRows; ++r) {
        // log p, floored at −88 where p is 0 anyway (padding rows have lse = +inf: this keeps
        // 0·(−inf) out of the product below).
        const float z = std::max(lj[r] - lr[r], -88.0f);
        const float p = exp_neg(z);
        // ∂L/∂l = p·(g_lse − g_H·(log p + H) + w·(g_k − ḡ))
        lj[r] = p * ((a[r] - bh[r] * (z + h[r])) + wr[r] * (g - gb[r]));
      }
    }
    scale_to_e(P, nc, l, coef);
  };

  auto gx32 = at::empty({N, D}, f32);
  float* gxp = gx32.data_ptr<float>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> l(kCodes * kRows), coef(kCodes * kRows), part(D * kRows);
    std::vector<double> acc(D * kRows);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), 0.0);
        double esum[kRows] = {};
        for (int64_t t = 0; t < P.nt; ++t) {
          const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
          e_tile(b, k0, nc, l.data(), coef.data());
          accum_rows(l.data(), P.cb + k0 * D, D, nc, part.data());
          for (int64_t i = 0; i < D * kRows; ++i) acc[i] += part[i];
          for (int64_t j = 0; j < nc; ++j)
            for (int r = 0; r < kRows; ++r) esum[r] += l[j * kRows + r];
        }
        const bool centred = P.metric != Metric::kDot;
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = b * kRows + r;
          if (i >= N) break;
          const float* xr = P.x32 + i * D;
          for (int64_t d = 0; d < D; ++d) {
            const double v = acc[d * kRows + r] - (centred ? esum[r] * xr[d] : 0.0);
            gxp[i * D + d] = static_cast<float>(v);
          }
        }
      }
    });
  });

  auto gc32 = at::empty({K, D}, f32);
  float* gcp = gc32.data_ptr<float>();
  at::parallel_for(0, P.nt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> l(kCodes * kRows), coef(kCodes * kRows), part(kCodes * D), scratch(4 * D);
    std::vector<double> acc(kCodes * D);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
        std::fill(acc.begin(), acc.end(), 0.0);
        double esum[kCodes] = {};
        for (int64_t b = 0; b < nb; ++b) {
          e_tile(b, k0, nc, l.data(), coef.data());
          accum_codes(l.data(), P.x32 + b * kRows * D, D, nc, part.data(), scratch.data());
          for (int64_t i = 0; i < nc * D; ++i) acc[i] += part[i];
          for (int64_t j = 0; j < nc; ++j) esum[j] += hsum_rows(l.data() + j * kRows);
        }
        const bool centred = P.metric != Metric::kDot;
        for (int64_t j = 0; j < nc; ++j) {
          const float* cj = P.cb + (k0 + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            const double v = acc[j * D + d] - (centred ? esum[j] * cj[d] : 0.0);
            gcp[(k0 + j) * D + d] = static_cast<float>(v);
          }
        }
      }
    });
  });
  return {gx32.to(x.scalar_type()), gc32.to(codebook.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize(const at::Tensor& x,
                                                             const at::Tensor& keys,
                                                             const at::Tensor& values,
                                                             double temperature,
                                                             c10::string_view metric_name) {
  check_2d_pair(x, keys, "soft_quantize");
  check_2d_pair(x, values, "soft_quantize");
  TORCH_CHECK(keys.sizes() == values.sizes(), "vqkernels.soft_quantize (cpu backend): keys ",
              keys.sizes(), " and values ", values.sizes(), " must have the same shape");
  const Metric metric = parse_softmax_metric(metric_name, "soft_quantize");
  const int64_t N = x.size(0), K = keys.size(0), D = x.size(1);
  auto f32 = x.options().dtype(at::kFloat);
  auto lse = at::empty({N}, f32);
  auto indices = at::empty({N}, x.options().dtype(at::kLong));
  if (N == 0) return {at::empty({0, D}, x.options()), lse, indices};
  int64_t* ip = indices.data_ptr<int64_t>();
  const int64_t nb = (N + kRows - 1) / kRows;
  const Packed pk = pack(x, keys, nb);
  const Problem P = problem(pk, metric, temperature, N);
  const at::Tensor v32 = values.to(at::kFloat).contiguous();
  const float* vp = v32.data_ptr<float>();
  auto out32 = at::empty({N, D}, f32);
  float *op = out32.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const Isa isa = active_isa();
  const double inv_tau_d = 1.0 / temperature;

  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> l(kCodes * kRows), coef(kCodes * kRows), part(D * kRows);
    std::vector<double> acc(D * kRows);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t b = b0; b < b1; ++b) {
        float m[kRows];
        double S[kRows];
        int64_t best[kRows];
        for (int r = 0; r < kRows; ++r) {
          m[r] = -kInf;
          S[r] = 0.0;
          best[r] = 0;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t t = 0; t < P.nt; ++t) {
          const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
          logits_tile(P, P.cb, b, k0, nc, l.data(), coef.data());
          // Tile max and its first position (strict >: ties keep the lowest index, as
          // torch.argmax), which becomes the row's argmax when it beats the running max.
          float tmax[kRows];
          int32_t targ[kRows];
          for (int r = 0; r < kRows; ++r) {
            tmax[r] = -kInf;
            targ[r] = 0;
          }
          for (int64_t j = 0; j < nc; ++j) {
            for (int r = 0; r < kRows; ++r) {
              const float v = l[j * kRows + r];
              targ[r] = v > tmax[r] ? static_cast<int32_t>(j) : targ[r];
              tmax[r] = v > tmax[r] ? v : tmax[r];
            }
          }
          for (int r = 0; r < kRows; ++r) {
            if (tmax[r] > m[r]) {
              best[r] = k0 + targ[r];
              if (m[r] != -kInf) {
                const double alpha =
                    std::exp(static_cast<double>(m[r]) - static_cast<double>(tmax[r]));
                S[r] *= alpha;
                for (int64_t d = 0; d < D; ++d) acc[d * kRows + r] *= alpha;
              }
              m[r] = tmax[r];
            }
          }
          float ps[kRows] = {};
          for (int64_t j = 0; j < nc; ++j) {
            for (int r = 0; r < kRows; ++r) {
              const float e = exp_neg(l[j * kRows + r] - m[r]);
              l[j * kRows + r] = e;
              ps[r] += e;
            }
          }
          accum_rows(l.data(), vp + k0 * D, D, nc, part.data());
          for (int64_t i = 0; i < D * kRows; ++i) acc[i] += part[i];
          for (int r = 0; r < kRows; ++r) S[r] += ps[r];
        }
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = b * kRows + r;
          if (i >= N) break;
          for (int64_t d = 0; d < D; ++d) op[i * D + d] = static_cast<float>(acc[d * kRows + r] / S[r]);
          const double shift =
              P.metric == Metric::kL2 ? static_cast<double>(P.xsq[i]) * inv_tau_d : 0.0;
          lp[i] = static_cast<float>(static_cast<double>(m[r]) + std::log(S[r]) - shift);
          ip[i] = best[r];
        }
      }
    });
  });
  return {out32.to(x.scalar_type()), lse, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& keys,
    const at::Tensor& values, const at::Tensor& out, const at::Tensor& lse, double temperature,
    c10::string_view metric_name) {
  check_2d_pair(x, keys, "soft_quantize_backward");
  TORCH_CHECK(keys.sizes() == values.sizes() && grad_out.sizes() == x.sizes() &&
                  out.sizes() == x.sizes(),
              "vqkernels.soft_quantize_backward (cpu backend): shape mismatch");
  const Metric metric = parse_softmax_metric(metric_name, "soft_quantize_backward");
  const int64_t N = x.size(0), K = keys.size(0), D = x.size(1);
  auto f32 = x.options().dtype(at::kFloat);
  if (N == 0) {
    return {at::zeros({0, D}, x.options()), at::zeros({K, D}, keys.options()),
            at::zeros({K, D}, values.options())};
  }
  const int64_t nb = (N + kRows - 1) / kRows, R = nb * kRows;
  const Packed pk = pack(x, keys, nb);
  const Problem P = problem(pk, metric, temperature, N);
  const at::Tensor lrel = relative_lse(P, lse.to(at::kFloat));
  const at::Tensor v32 = values.to(at::kFloat).contiguous();
  // grad_out packed like x (rows in lanes) for go·v_k, and row-major for grad_values.
  at::Tensor go32 = at::zeros({R, D}, f32);
  go32.narrow(0, 0, N).copy_(grad_out);
  const at::Tensor gopack = go32.view({nb, kRows, D}).transpose(1, 2).contiguous();
  // Δ_i = grad_out_i · out_i (fp64 sum of fp32 products).
  at::Tensor delta = at::zeros({R}, f32);
  delta.narrow(0, 0, N).copy_((grad_out.to(at::kDouble) * out.to(at::kFloat).to(at::kDouble)).sum(1));
  const float *lrp = lrel.data_ptr<float>(), *vp = v32.data_ptr<float>(),
              *gop = gopack.data_ptr<float>(), *gor = go32.data_ptr<float>(),
              *dp = delta.data_ptr<float>();
  const Isa isa = active_isa();

  // Fills l with e (key weights) and p with the probabilities, for block b / codes [k0, k0+nc).
  auto tiles = [&](int64_t b, int64_t k0, int64_t nc, float* l, float* coef, float* p,
                   float* gv) VQK_INLINE {
    logits_tile(P, P.cb, b, k0, nc, l, coef);
    tile_dot(gop + b * D * kRows, vp + k0 * D, D, nc, gv);
    const float *lr = lrp + b * kRows, *dl = dp + b * kRows;
    for (int64_t i = 0; i < nc; ++i) {
      for (int r = 0; r < kRows; ++r) {
        const int64_t q = i * kRows + r;
        const float pr = exp_neg(l[q] - lr[r]);
        p[q] = pr;
        l[q] = pr * (gv[q] - dl[r]);
      }
    }
    scale_to_e(P, nc, l, coef);
  };

  auto gx32 = at::empty({N, D}, f32);
  float* gxp = gx32.data_ptr<float>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> l(kCodes * kRows), coef(kCodes * kRows), p(kCodes * kRows),
        gv(kCodes * kRows), part(D * kRows);
    std::vector<double> acc(D * kRows);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), 0.0);
        double esum[kRows] = {};
        for (int64_t t = 0; t < P.nt; ++t) {
          const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
          tiles(b, k0, nc, l.data(), coef.data(), p.data(), gv.data());
          accum_rows(l.data(), P.cb + k0 * D, D, nc, part.data());
          for (int64_t i = 0; i < D * kRows; ++i) acc[i] += part[i];
          for (int64_t j = 0; j < nc; ++j)
            for (int r = 0; r < kRows; ++r) esum[r] += l[j * kRows + r];
        }
        const bool centred = P.metric != Metric::kDot;
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = b * kRows + r;
          if (i >= N) break;
          const float* xr = P.x32 + i * D;
          for (int64_t d = 0; d < D; ++d)
            gxp[i * D + d] =
                static_cast<float>(acc[d * kRows + r] - (centred ? esum[r] * xr[d] : 0.0));
        }
      }
    });
  });

  auto gk32 = at::empty({K, D}, f32), gv32 = at::empty({K, D}, f32);
  float *gkp = gk32.data_ptr<float>(), *gvp = gv32.data_ptr<float>();
  at::parallel_for(0, P.nt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> l(kCodes * kRows), coef(kCodes * kRows), p(kCodes * kRows),
        gv(kCodes * kRows), part(kCodes * D), scratch(4 * D);
    std::vector<double> acck(kCodes * D), accv(kCodes * D);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
        std::fill(acck.begin(), acck.end(), 0.0);
        std::fill(accv.begin(), accv.end(), 0.0);
        double esum[kCodes] = {};
        for (int64_t b = 0; b < nb; ++b) {
          tiles(b, k0, nc, l.data(), coef.data(), p.data(), gv.data());
          accum_codes(l.data(), P.x32 + b * kRows * D, D, nc, part.data(), scratch.data());
          for (int64_t i = 0; i < nc * D; ++i) acck[i] += part[i];
          accum_codes(p.data(), gor + b * kRows * D, D, nc, part.data(), scratch.data());
          for (int64_t i = 0; i < nc * D; ++i) accv[i] += part[i];
          for (int64_t j = 0; j < nc; ++j) esum[j] += hsum_rows(l.data() + j * kRows);
        }
        const bool centred = P.metric != Metric::kDot;
        for (int64_t j = 0; j < nc; ++j) {
          const float* cj = P.cb + (k0 + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            gkp[(k0 + j) * D + d] =
                static_cast<float>(acck[j * D + d] - (centred ? esum[j] * cj[d] : 0.0));
            gvp[(k0 + j) * D + d] = static_cast<float>(accv[j * D + d]);
          }
        }
      }
    });
  });
  return {gx32.to(x.scalar_type()), gk32.to(keys.scalar_type()), gv32.to(values.scalar_type())};
}

}  // namespace cpu
}  // namespace vqkernels
