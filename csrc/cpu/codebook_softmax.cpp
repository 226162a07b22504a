// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ codebook_softmax family (schemas in vqkernels/_ops.py, spec in reference/codebook_softmax) │
// │ code_distribution(x[N,D], codebook[K,D], row_weight[N] f32, τ, metric, row_group[N]|None,  │
// │     G) -> (logsumexp[N] f32, entropy[N] f32, mean_probs[K] f32 ([G,K] with row_group))     │
// │ code_distribution_backward(g_lse[N]|[0], g_H[N]|[0], g_mp[K]|[G,K]|[0], x, codebook,       │
// │     row_weight, logsumexp, entropy, τ, metric, row_group, G, need_grad_codebook=true,      │
// │     need_grad_x=true) -> (grad_x[N,D] dtype x, grad_codebook[K,D] dtype cb; [0] when the   │
// │     matching need_grad_* flag is false: that gradient's pass is skipped)                   │
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
// the same bits on every run and thread count; no atomics, no per-thread partials.  Tile products
// go through single-threaded sgemm calls (see "BLAS tile products" in codebook_softmax_tiles.h).
//
// Logits of l2 are computed relative to the row constant −‖x‖²/τ (softmax is shift-invariant):
// l'_ik = (2·x·c − ‖c‖²)/τ; only lse adds −‖x‖²/τ back (in fp64), so p, the entropy and
// mean_probs do not carry the cancellation error of ‖x‖² at small τ.
#include "cpu/codebook_softmax_tiles.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

namespace vqkernels {
namespace cpu {

using namespace softmax_tiles;  // NOLINT: the tile blocks of this family (one TU)

namespace {

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

// Grouped mean_probs: the group of every padded row (padding rows: group 0, weight 0), checked to
// lie in [0, G); nullopt -> ungrouped (one group).
std::vector<int64_t> padded_groups(const std::optional<at::Tensor>& row_group, int64_t num_groups,
                                   int64_t N, int64_t R, const char* op) {
  std::vector<int64_t> groups(R, 0);
  if (!row_group.has_value()) return groups;
  const at::Tensor& g = *row_group;
  TORCH_CHECK(num_groups >= 1, "vqkernels.", op, ": row_group needs num_groups >= 1, got ",
              num_groups);
  TORCH_CHECK(g.scalar_type() == at::kLong && g.numel() == N, "vqkernels.", op,
              ": row_group must be int64 with N = ", N, " entries, got ", g.scalar_type(), " ",
              g.sizes());
  const at::Tensor gc = g.contiguous();
  const int64_t* gp = gc.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(gp[i] >= 0 && gp[i] < num_groups, "vqkernels.", op, ": row_group[", i, "] = ",
                gp[i], " is outside [0, num_groups = ", num_groups, ")");
    groups[i] = gp[i];
  }
  return groups;
}

// gt[j·R + r] = grad_mp[group_r, k0 + j]: the tile of grouped mean_probs gradients in the rows-
// in-lanes layout, gathered row by row (contiguous reads of each group's row of grad_mp).
VQK_INLINE inline void grad_mp_tile(const float* gmp, const int64_t* row_off, int64_t k0,
                                    int64_t nc, float* gt) {
  for (int r = 0; r < kRows; ++r) {
    const float* src = gmp + row_off[r] + k0;
    for (int64_t j = 0; j < nc; ++j) gt[j * kRows + r] = src[j];
  }
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

// The grad_x row pass of both backwards: grad_x_i = Σ_k e_ik·c_k − [not dot]·x_i·Σ_k e_ik, where
// fill_e(b, k0, nc, l, coef, p, gv) leaves the tile's e in l (p, gv: scratch for soft_quantize).
// Each row block is one task walking the code tiles in order: fp32 tile products, fp64 across.
template <class FillE>
void grad_x_pass(const Problem& P, Isa isa, const FillE& fill_e, float* gxp) {
  const int64_t D = P.D;
  at::parallel_for(0, P.nb, 1, [&](int64_t b0, int64_t b1) {
    SequentialBlas blas;
    Buf l(kCodes * kRows), coef(kCodes * kRows), p(kCodes * kRows), gv(kCodes * kRows),
        part(D * kRows);
    std::vector<double> acc(D * kRows);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), 0.0);
        double esum[kRows] = {};
        for (int64_t t = 0; t < P.nt; ++t) {
          const int64_t k0 = t * kCodes, nc = std::min(kCodes, P.K - k0);
          fill_e(b, k0, nc, l.data(), coef.data(), p.data(), gv.data());
          accum_rows(P.gemm, l.data(), P.cb + k0 * D, D, nc, part.data());
          for (int64_t i = 0; i < D * kRows; ++i) acc[i] += part[i];
          for (int64_t j = 0; j < nc; ++j)
            for (int r = 0; r < kRows; ++r) esum[r] += l[j * kRows + r];
        }
        const bool centred = P.metric != Metric::kDot;
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = b * kRows + r;
          if (i >= P.N) break;
          const float* xr = P.x32 + i * D;
          for (int64_t d = 0; d < D; ++d)
            gxp[i * D + d] =
                static_cast<float>(acc[d * kRows + r] - (centred ? esum[r] * xr[d] : 0.0));
        }
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> code_distribution(
    const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& row_weight,
    double temperature, c10::string_view metric_name, const std::optional<at::Tensor>& row_group,
    int64_t num_groups) {
  check_2d_pair(x, codebook, "code_distribution");
  const Metric metric = parse_softmax_metric(metric_name, "code_distribution");
  TORCH_CHECK(temperature > 0.0, "vqkernels.code_distribution: temperature must be > 0");
  const int64_t N = x.size(0), K = codebook.size(0);
  TORCH_CHECK(row_weight.numel() == N, "vqkernels.code_distribution (cpu backend): row_weight ",
              "must have N = ", N, " entries, got ", row_weight.sizes());
  auto f32 = x.options().dtype(at::kFloat);
  const bool grouped = row_group.has_value();
  const int64_t G = grouped ? num_groups : 1;
  auto lse = at::empty({N}, f32), entropy = at::empty({N}, f32);
  auto mean_probs = grouped ? at::zeros({G, K}, f32) : at::zeros({K}, f32);
  const int64_t nb = (N + kRows - 1) / kRows;
  const std::vector<int64_t> groups =
      padded_groups(row_group, num_groups, N, nb * kRows, "code_distribution");
  if (N == 0) return {lse, entropy, mean_probs};
  const Packed pk = pack(x, codebook, nb);
  const Problem P = problem(pk, metric, temperature, N);
  auto lse_rel = at::empty({nb * kRows}, f32);
  float* lrp = lse_rel.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  float* hp = entropy.data_ptr<float>();
  const Isa isa = active_isa();
  const double inv_tau_d = 1.0 / temperature;

  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    SequentialBlas blas;
    Buf l(kCodes * kRows), coef(kCodes * kRows);
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
  const int64_t* grp = groups.data();
  at::parallel_for(0, P.nt, 1, [&](int64_t t0, int64_t t1) {
    SequentialBlas blas;
    Buf l(kCodes * kRows), coef(kCodes * kRows);
    // acc[g·kCodes + j]: this tile's sums per group, fp64 across rows (ungrouped: G = 1).
    std::vector<double> acc(G * kCodes);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t b = 0; b < nb; ++b) {
          logits_tile(P, P.cb, b, k0, nc, l.data(), coef.data());
          const float* lr = lrp + b * kRows;
          const float* wr = wp + b * kRows;
          const int64_t* gr = grp + b * kRows;
          for (int64_t j = 0; j < nc; ++j) {
            float* lj = l.data() + j * kRows;
            for (int r = 0; r < kRows; ++r) lj[r] = wr[r] * exp_neg(lj[r] - lr[r]);
            if (!grouped) acc[j] += hsum_rows(lj);
          }
          if (grouped) {
            // Rows in increasing order, each row's nc values into its group's fp64 sums (a
            // fixed order per (group, code): deterministic; contiguous in the codes).
            for (int r = 0; r < kRows; ++r) {
              if (wr[r] == 0.0f) continue;  // masked or padding rows add exactly nothing
              double* ag = acc.data() + gr[r] * kCodes;
              for (int64_t j = 0; j < nc; ++j) ag[j] += l[j * kRows + r];
            }
          }
        }
        for (int64_t g = 0; g < G; ++g)
          for (int64_t j = 0; j < nc; ++j)
            mpp[g * K + k0 + j] = static_cast<float>(acc[g * kCodes + j]);
      }
    });
  });
  return {lse, entropy, mean_probs};
}

std::tuple<at::Tensor, at::Tensor> code_distribution_backward(
    const at::Tensor& grad_lse, const at::Tensor& grad_entropy, const at::Tensor& grad_mp,
    const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& row_weight,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    c10::string_view metric_name, const std::optional<at::Tensor>& row_group,
    int64_t num_groups, bool need_grad_codebook, bool need_grad_x) {
  check_2d_pair(x, codebook, "code_distribution_backward");
  const Metric metric = parse_softmax_metric(metric_name, "code_distribution_backward");
  const int64_t N = x.size(0), K = codebook.size(0), D = x.size(1);
  const bool has_l = grad_lse.numel() > 0, has_h = grad_entropy.numel() > 0,
             has_m = grad_mp.numel() > 0;
  TORCH_CHECK(!has_l || grad_lse.numel() == N, "code_distribution_backward: grad_logsumexp ",
              "must have N entries or none");
  TORCH_CHECK(!has_h || grad_entropy.numel() == N, "code_distribution_backward: grad_entropy ",
              "must have N entries or none");
  const bool grouped = row_group.has_value();
  const int64_t G = grouped ? num_groups : 1;
  TORCH_CHECK(!has_m || grad_mp.numel() == G * K, "code_distribution_backward: grad_mean_probs ",
              "must have G·K = ", G * K, " entries or none, got ", grad_mp.sizes());
  auto f32 = x.options().dtype(at::kFloat);
  // Without need_grad_codebook (autograd: the codebook does not require grad, e.g. an EMA
  // buffer) grad_codebook is an empty [0] tensor and the code pass below is skipped; likewise
  // grad_x and the grad_x row pass without need_grad_x (ḡ's row pass serves both, it stays).
  auto no_grad_codebook = [&] {
    return need_grad_codebook ? at::zeros({K, D}, codebook.options())
                              : at::empty({0}, codebook.options());
  };
  auto no_grad_x = [&] {
    return need_grad_x ? at::zeros({N, D}, x.options()) : at::empty({0}, x.options());
  };
  if (N == 0 || (!has_l && !has_h && !has_m)) return {no_grad_x(), no_grad_codebook()};
  const int64_t nb = (N + kRows - 1) / kRows, R = nb * kRows;
  // Row offsets into grad_mean_probs [G, K]: row i reads g_ik = grad_mp[group_i, k].
  std::vector<int64_t> goff =
      padded_groups(row_group, num_groups, N, R, "code_distribution_backward");
  for (auto& o : goff) o *= K;
  const Packed pk = pack(x, codebook, nb);
  const Problem P = problem(pk, metric, temperature, N);
  const at::Tensor lrel = relative_lse(P, lse.to(at::kFloat));
  const at::Tensor gl = has_l ? padded(grad_lse.to(at::kFloat), R, 0.f) : at::zeros({R}, f32);
  const at::Tensor gh = has_h ? padded(grad_entropy.to(at::kFloat), R, 0.f) : at::zeros({R}, f32);
  const at::Tensor hh = padded(entropy.to(at::kFloat), R, 0.f);
  const at::Tensor w = padded(row_weight.to(at::kFloat), R, 0.f);
  const at::Tensor gm = has_m ? grad_mp.to(at::kFloat).contiguous() : at::zeros({K}, f32);
  const int64_t* gop = goff.data();
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
      SequentialBlas blas;
      Buf l(kCodes * kRows), coef(kCodes * kRows);
      with_isa(isa, [&]() VQK_INLINE {
        for (int64_t b = b0; b < b1; ++b) {
          const float* lr = lrp + b * kRows;
          double acc[kRows] = {};
          const int64_t* go = gop + b * kRows;
          for (int64_t t = 0; t < P.nt; ++t) {
            const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
            logits_tile(P, P.cb, b, k0, nc, l.data(), coef.data());
            float part[kRows] = {};
            float gt[kCodes * kRows];
            if (grouped) grad_mp_tile(gmp, go, k0, nc, gt);
            for (int64_t j = 0; j < nc; ++j) {
              if (!grouped) {
                const float g = gmp[k0 + j];
                for (int r = 0; r < kRows; ++r)
                  part[r] = std::fma(exp_neg(l[j * kRows + r] - lr[r]), g, part[r]);
              } else {
                for (int r = 0; r < kRows; ++r)
                  part[r] = std::fma(exp_neg(l[j * kRows + r] - lr[r]), gt[j * kRows + r],
                                     part[r]);
              }
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
    const int64_t* go = gop + b * kRows;
    // ∂L/∂l = p·(g_lse − g_H·(log p + H) + w·(g_k − ḡ)), with log p floored at −88 where p is 0
    // anyway (padding rows have lse = +inf: this keeps 0·(−inf) out of the product).
    auto dl = [&](float lv, int r, float g) VQK_INLINE {
      const float z = std::max(lv - lr[r], -88.0f);
      const float p = exp_neg(z);
      return p * ((a[r] - bh[r] * (z + h[r])) + wr[r] * (g - gb[r]));
    };
    float gt[kCodes * kRows];
    if (grouped) grad_mp_tile(gmp, go, k0, nc, gt);
    for (int64_t j = 0; j < nc; ++j) {
      float* lj = l + j * kRows;
      if (!grouped) {
        const float g = gmp[k0 + j];
        for (int r = 0; r < kRows; ++r) lj[r] = dl(lj[r], r, g);
      } else {
        for (int r = 0; r < kRows; ++r) lj[r] = dl(lj[r], r, gt[j * kRows + r]);
      }
    }
    scale_to_e(P, nc, l, coef);
  };

  at::Tensor grad_x = no_grad_x();
  if (need_grad_x) {
    auto gx32 = at::empty({N, D}, f32);
    grad_x_pass(P, isa, [&](int64_t b, int64_t k0, int64_t nc, float* l, float* coef, float*,
                            float*) VQK_INLINE { e_tile(b, k0, nc, l, coef); },
                gx32.data_ptr<float>());
    grad_x = gx32.to(x.scalar_type());
  }

  // The code pass recomputes every logits tile a second time (a full GEMM-class pass over all
  // tiles), so skipping it roughly halves the backward when only grad_x is wanted.
  if (!need_grad_codebook) return {grad_x, no_grad_codebook()};

  auto gc32 = at::empty({K, D}, f32);
  float* gcp = gc32.data_ptr<float>();
  at::parallel_for(0, P.nt, 1, [&](int64_t t0, int64_t t1) {
    SequentialBlas blas;
    Buf l(kCodes * kRows), coef(kCodes * kRows), part(kCodes * D), scratch(4 * D);
    std::vector<double> acc(kCodes * D);
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kCodes, nc = std::min(kCodes, K - k0);
        std::fill(acc.begin(), acc.end(), 0.0);
        double esum[kCodes] = {};
        for (int64_t b = 0; b < nb; ++b) {
          e_tile(b, k0, nc, l.data(), coef.data());
          accum_codes(P.gemm, l.data(), P.x32 + b * kRows * D, D, nc, part.data(), scratch.data());
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
  return {grad_x, gc32.to(codebook.scalar_type())};
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
    SequentialBlas blas;
    Buf l(kCodes * kRows), coef(kCodes * kRows), part(D * kRows);
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
          accum_rows(P.gemm, l.data(), vp + k0 * D, D, nc, part.data());
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
    if (P.gemm_logits) {  // gv (column-major kRows x nc) = GO_b (row-major) · V_tileᵀ
      sgemm_tile(true, false, kRows, nc, D, gor + b * kRows * D, D, vp + k0 * D, D, gv, kRows);
    } else {
      tile_dot(gop + b * D * kRows, vp + k0 * D, D, nc, gv);
    }
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
  grad_x_pass(P, isa, tiles, gx32.data_ptr<float>());

  auto gk32 = at::empty({K, D}, f32), gv32 = at::empty({K, D}, f32);
  float *gkp = gk32.data_ptr<float>(), *gvp = gv32.data_ptr<float>();
  at::parallel_for(0, P.nt, 1, [&](int64_t t0, int64_t t1) {
    SequentialBlas blas;
    Buf l(kCodes * kRows), coef(kCodes * kRows), p(kCodes * kRows),
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
          accum_codes(P.gemm, l.data(), P.x32 + b * kRows * D, D, nc, part.data(), scratch.data());
          for (int64_t i = 0; i < nc * D; ++i) acck[i] += part[i];
          accum_codes(P.gemm, p.data(), gor + b * kRows * D, D, nc, part.data(), scratch.data());
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
