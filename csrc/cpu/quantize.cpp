// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ quantize(x[N,D], codebook[K,D], beta, metric, codebook_loss, estimator)                    │
// │   -> (quantized[N,D] dtype of x, indices[N] int64, loss[] float32)                         │
// │   quantized = codebook[indices] (its value; the straight-through gradient is autograd's);   │
// │   loss = beta·SSE/numel [+ SSE/numel], SSE = Σ (x − q)² in fp32 terms / fp64 sum,          │
// │   numel = max(N·D, 1) (loss = 0 for N = 0).                                                │
// │ quantize_backward(grad_q[N,D], grad_loss[], x[N,D], codebook[K,D], indices[N] int64,       │
// │                   beta, codebook_loss, estimator) -> (grad_x[N,D] dtype of x, grad_cb)     │
// │   grad_x = E(grad_q) + (2·beta/numel)·grad_loss·(x − q), E = identity ("ste") or the       │
// │   rotation trick's s·(g − 2w(w·g) + 2u(q̂·g)) ("rotation", O(D) per row, see below);        │
// │   grad_codebook[k] = Σ_{i: idx_i = k} (−2/numel)·grad_loss·(x_i − q_i)  (dtype of the       │
// │   codebook), or an empty [0] tensor when codebook_loss is false.                           │
// │ Multi-head: codebook [H,K,D], x [N,H,D], indices [N,H]: each (row, head) vector is a row  │
// │ of the flattened problem x [N·H, D] against the flattened codebook [H·K, D] with global    │
// │ codes h·K + idx; only the search is per head.                                             │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
// The forward fuses the search (shared with nearest_code), the gather and the per-row squared
// error; the backward fuses grad_x and the segment sum of the codebook gradient.  Every sum has
// an order fixed by the data (row blocks of fixed size, rows grouped by code in row order), so
// both are deterministic across runs and thread counts.
#include "cpu/common.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

namespace vqkernels {
namespace cpu {

namespace {
constexpr int64_t kSseBlock = 1024;  // rows per partial SSE; fixed so the sum order is too
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in,
                                                        const at::Tensor& cb_in, double beta,
                                                        c10::string_view metric,
                                                        bool codebook_loss,
                                                        c10::string_view estimator) {
  check_search_args(x_in, cb_in);
  parse_estimator(estimator);  // the forward is the same for both estimators
  const bool cosine = parse_metric(std::string(metric.data(), metric.size()));
  const at::Tensor x3 = x_in.contiguous();
  const at::Tensor cb3 = cb_in.contiguous();
  const int64_t H = cb3.dim() == 3 ? cb3.size(0) : 1;
  const int64_t D = x3.size(-1), Kh = cb3.size(-2);
  // Flattened views: rows (n, h) -> n·H + h, codes (h, k) -> h·K + k.
  const at::Tensor x = x3.reshape({-1, D});
  const at::Tensor codebook = cb3.reshape({-1, D});
  const int64_t N = x.size(0);
  auto q = at::empty(x3.sizes(), x3.options());
  auto indices = at::empty(x3.sizes().slice(0, x3.dim() - 1), x3.options().dtype(at::kLong));
  auto loss = at::zeros({}, x.options().dtype(at::kFloat));
  if (N == 0) return {q, indices, loss};

  std::vector<int64_t> gidx;
  {
    std::vector<float> best(static_cast<size_t>(N));
    search_heads(x3, cb3, cosine, 0.0, 0, indices.data_ptr<int64_t>(), best.data(), nullptr);
    gidx = global_indices(indices.data_ptr<int64_t>(), N / H, H, Kh);
  }
  const int64_t* idx = gidx.data();

  const int64_t nblocks = (N + kSseBlock - 1) / kSseBlock;
  std::vector<double> partial(static_cast<size_t>(nblocks), 0.0);
  const Isa isa = active_isa();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const T* cp = reinterpret_cast<const T*>(codebook.data_ptr());
    T* qp = reinterpret_cast<T*>(q.data_ptr());
    at::parallel_for(0, nblocks, std::max<int64_t>(1, 64 / std::max<int64_t>(D, 1)),
                     [&](int64_t b0, int64_t b1) {
      with_isa(isa, [&]() VQK_INLINE {
        for (int64_t b = b0; b < b1; ++b) {
          double sse = 0.0;
          const int64_t i1 = std::min(N, (b + 1) * kSseBlock);
          for (int64_t i = b * kSseBlock; i < i1; ++i) {
            const T* code = cp + idx[i] * D;
            const T* row = xp + i * D;
            std::memcpy(qp + i * D, code, static_cast<size_t>(D) * sizeof(T));
            // Each difference is formed and squared in fp32 (as the reference's
            // (x.float() − q.float())²), then accumulated in fp64 in a fixed order.
            sse += sum_sq8(D, [&](int64_t d) VQK_INLINE {
              return to_f32(row[d]) - to_f32(code[d]);
            });
          }
          partial[b] = sse;
        }
      });
    });
  });
  double sse = 0.0;
  for (double p : partial) sse += p;
  const double numel = static_cast<double>(std::max<int64_t>(N * D, 1));
  // fp32 like the reference: commit = SSE/numel; loss = beta·commit (+ commit).
  const float commit = static_cast<float>(sse / numel);
  float l = static_cast<float>(beta) * commit;
  if (codebook_loss) l = l + commit;
  loss.fill_(l);
  return {q, indices, loss};
}

namespace {

// Rotation trick (LR 1.32's rotate_to), per row, in fp32 from fp64 dot products: with
// u = x/max(‖x‖, ε), q̂ = q/max(‖q‖, ε), w = (u + q̂)/max(‖u + q̂‖, ε), s = ‖q‖/max(‖x‖, ε)
// (ε = 1e-6, LR's safe_div / l2norm), the gradient s·(g − 2w(w·g) + 2u(q̂·g)) is written
// s·g − a·(u + q̂) + b·u with a = 2s(w·g)/max(‖u+q̂‖, ε) = 2s((u+q̂)·g)/max(‖u+q̂‖, ε)² and
// b = 2s(q̂·g): three O(D) passes (norms; the two dot products; the output), never a D×D matrix.
struct RotationCoefs {
  float cu, cq, s, a, b;  // u = cu·x, q̂ = cq·q
};

// The fp64 sums run over 8 interleaved lanes (lane d mod 8) combined pairwise, as sum_sq8: a
// fixed order (deterministic), and vectorizable — one running sum per quantity was a
// latency-bound chain of dependent fp64 adds (~10x the cost of the STE backward at D = 128).
// GCC does not vectorize the lane loops by itself here, hence the vector types (one zmm of 8
// doubles under AVX-512; mul and add stay separate roundings: -ffp-contract=off).
typedef float RotF8 __attribute__((vector_size(32)));
typedef double RotD8 __attribute__((vector_size(64)));

// (Output by reference: a 64-byte vector returned by value draws GCC's -Wpsabi ABI note.)
template <typename T>
VQK_INLINE inline void load_d8(const T* p, RotD8& out) {
  float tmp[8];
  for (int j = 0; j < 8; ++j) tmp[j] = to_f32(p[j]);
  RotF8 f;
  std::memcpy(&f, tmp, sizeof(f));
  out = __builtin_convertvector(f, RotD8);
}

template <typename T, typename G>
VQK_INLINE inline RotationCoefs rotation_coefs(const T* row, const T* code, const G* g,
                                               int64_t D) {
  constexpr double kEps = 1e-6;
  constexpr int64_t L = 8;
  const auto combine = [](const RotD8& l) VQK_INLINE {
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  };
  RotD8 lxx = {0, 0, 0, 0, 0, 0, 0, 0}, lqq = lxx;
  int64_t d0 = 0;
  for (; d0 + L <= D; d0 += L) {
    RotD8 xv, qv;
    load_d8(row + d0, xv);
    load_d8(code + d0, qv);
    lxx += xv * xv;
    lqq += qv * qv;
  }
  for (int64_t j = 0; d0 + j < D; ++j) {
    const double xv = to_f32(row[d0 + j]), qv = to_f32(code[d0 + j]);
    lxx[j] += xv * xv;
    lqq[j] += qv * qv;
  }
  const double xx = combine(lxx), qq = combine(lqq);
  const double xn = std::sqrt(xx), qn = std::sqrt(qq);
  const double cu = 1.0 / std::max(xn, kEps), cq = 1.0 / std::max(qn, kEps);
  RotD8 lvv = {0, 0, 0, 0, 0, 0, 0, 0}, lvg = lvv, lqg = lvv;  // v = u + q̂
  for (d0 = 0; d0 + L <= D; d0 += L) {
    RotD8 xv, qv, gd;
    load_d8(row + d0, xv);
    load_d8(code + d0, qv);
    load_d8(g + d0, gd);
    const RotD8 v = cu * xv + cq * qv;
    lvv += v * v;
    lvg += v * gd;
    lqg += cq * qv * gd;
  }
  for (int64_t j = 0; d0 + j < D; ++j) {
    const int64_t d = d0 + j;
    const double v = cu * to_f32(row[d]) + cq * to_f32(code[d]);
    const double gd = to_f32(g[d]);
    lvv[j] += v * v;
    lvg[j] += v * gd;
    lqg[j] += cq * to_f32(code[d]) * gd;
  }
  const double vv = combine(lvv), vg = combine(lvg), qg = combine(lqg);
  const double vn = std::max(std::sqrt(vv), kEps);
  const double s = qn * cu;
  RotationCoefs c;
  c.cu = static_cast<float>(cu);
  c.cq = static_cast<float>(cq);
  c.s = static_cast<float>(s);
  c.a = static_cast<float>(2.0 * s * vg / (vn * vn));
  c.b = static_cast<float>(2.0 * s * qg);
  return c;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_backward(const at::Tensor& grad_q_in,
                                                     const at::Tensor& grad_loss,
                                                     const at::Tensor& x_in,
                                                     const at::Tensor& cb_in,
                                                     const at::Tensor& indices_in, double beta,
                                                     bool codebook_loss,
                                                     c10::string_view estimator) {
  check_search_args(x_in, cb_in);
  const bool rotation = parse_estimator(estimator);
  TORCH_CHECK(grad_q_in.device().is_cpu(),
              "vqkernels.quantize_backward (cpu backend): grad_quantized must be a CPU tensor");
  TORCH_CHECK(grad_q_in.sizes() == x_in.sizes(),
              "vqkernels.quantize_backward (cpu backend): grad_quantized must have the shape of "
              "x ", x_in.sizes(), ", got ", grad_q_in.sizes());
  check_cpu_float_2d(grad_q_in.reshape({-1, x_in.size(-1)}), "grad_quantized");
  TORCH_CHECK(grad_loss.device().is_cpu() && grad_loss.numel() == 1,
              "vqkernels.quantize_backward (cpu backend): grad_loss must be a one-element CPU "
              "tensor, got shape ", grad_loss.sizes(), " on ", grad_loss.device());
  const int64_t H = cb_in.dim() == 3 ? cb_in.size(0) : 1;
  const int64_t D = x_in.size(-1), Kh = cb_in.size(-2);
  const int64_t N = x_in.numel() / std::max<int64_t>(D, 1), K = H * Kh;
  TORCH_CHECK(indices_in.sizes() == x_in.sizes().slice(0, x_in.dim() - 1),
              "vqkernels.quantize_backward (cpu backend): indices must have shape ",
              x_in.sizes().slice(0, x_in.dim() - 1), ", got ", indices_in.sizes());
  check_indices(indices_in.reshape({-1}), N, Kh, 0, "quantize_backward");

  const at::Tensor x = x_in.contiguous().reshape({-1, D});
  const at::Tensor codebook = cb_in.contiguous().reshape({-1, D});
  const at::Tensor gq = grad_q_in.contiguous().reshape({-1, D});
  const at::Tensor indices = indices_in.contiguous();
  const std::vector<int64_t> gidx = global_indices(indices.data_ptr<int64_t>(), N / H, H, Kh);
  const int64_t* idx = gidx.data();

  const double numel = static_cast<double>(std::max<int64_t>(N * D, 1));
  const float g = grad_loss.to(at::kFloat).item<float>();
  // Coefficients as the reference forms them: (python scalar) · grad_loss in fp32.
  const float coef_x = static_cast<float>(2.0 * beta / numel) * g;
  const float coef_c = static_cast<float>(-2.0 / numel) * g;

  auto grad_x = at::empty(x_in.sizes(), x.options());
  at::Tensor grad_cb;
  at::Tensor grad_cb32;
  if (codebook_loss) {
    grad_cb32 = at::zeros({K, D}, x.options().dtype(at::kFloat));
  }

  const Isa isa = active_isa();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const T* cp = reinterpret_cast<const T*>(codebook.data_ptr());
    T* gxp = reinterpret_cast<T*>(grad_x.data_ptr());
    dispatch_float(gq.scalar_type(), [&](auto gtag) {
      using G = decltype(gtag);
      const G* gqp = reinterpret_cast<const G*>(gq.data_ptr());
      at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(D, 1)),
                       [&](int64_t i0, int64_t i1) {
        with_isa(isa, [&]() VQK_INLINE {
          for (int64_t i = i0; i < i1; ++i) {
            const T* row = xp + i * D;
            const T* code = cp + idx[i] * D;
            const G* gqr = gqp + i * D;
            T* gxr = gxp + i * D;
            if (rotation) {
              const RotationCoefs c = rotation_coefs(row, code, gqr, D);
              for (int64_t d = 0; d < D; ++d) {
                const float xv = to_f32(row[d]), qv = to_f32(code[d]);
                const float u = c.cu * xv;
                const float rot = c.s * to_f32(gqr[d]) - c.a * (u + c.cq * qv) + c.b * u;
                gxr[d] = static_cast<T>(rot + coef_x * (xv - qv));
              }
            } else {
              for (int64_t d = 0; d < D; ++d) {
                const float diff = to_f32(row[d]) - to_f32(code[d]);
                gxr[d] = static_cast<T>(to_f32(gqr[d]) + coef_x * diff);
              }
            }
          }
        });
      });
    });
    if (codebook_loss && N > 0) {
      // Segment sum by code, rows in increasing order (as a serial index_add_), fp32 terms
      // (−2/numel)·g·(x − q) accumulated in fp32 like the reference; codes are independent so
      // the thread split does not change any bit.
      std::vector<int64_t> offsets, order;
      bucket_rows(idx, N, K, offsets, order);
      float* gcp = grad_cb32.data_ptr<float>();
      const int64_t rows_per_code = N / K + 1;
      at::parallel_for(0, K,
                       std::max<int64_t>(1, 65536 / (std::max<int64_t>(D, 1) * rows_per_code)),
                       [&](int64_t k0, int64_t k1) {
                         with_isa(isa, [&]() VQK_INLINE {
                           for (int64_t k = k0; k < k1; ++k) {
                             float* out = gcp + k * D;
                             const T* code = cp + k * D;
                             for (int64_t p = offsets[k]; p < offsets[k + 1]; ++p) {
                               const T* row = xp + order[p] * D;
                               for (int64_t d = 0; d < D; ++d) {
                                 out[d] += coef_c * (to_f32(row[d]) - to_f32(code[d]));
                               }
                             }
                           }
                         });
                       });
    }
  });
  if (codebook_loss) {
    grad_cb = grad_cb32.to(codebook.scalar_type()).reshape(cb_in.sizes());
  } else {
    grad_cb = at::empty({0}, codebook.options());
  }
  return {grad_x, grad_cb};
}

}  // namespace cpu
}  // namespace vqkernels
