// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ quantize(x[N,D], codebook[K,D], beta, metric, codebook_loss)                               │
// │   -> (quantized[N,D] dtype of x, indices[N] int64, loss[] float32)                         │
// │   quantized = codebook[indices] (its value; the straight-through gradient is autograd's);   │
// │   loss = beta·SSE/numel [+ SSE/numel], SSE = Σ (x − q)² in fp32 terms / fp64 sum,          │
// │   numel = max(N·D, 1) (loss = 0 for N = 0).                                                │
// │ quantize_backward(grad_q[N,D], grad_loss[], x[N,D], codebook[K,D], indices[N] int64,       │
// │                   beta, codebook_loss) -> (grad_x[N,D] dtype of x, grad_codebook)          │
// │   grad_x = grad_q + (2·beta/numel)·grad_loss·(x − q);                                      │
// │   grad_codebook[k] = Σ_{i: idx_i = k} (−2/numel)·grad_loss·(x_i − q_i)  (dtype of the       │
// │   codebook), or an empty [0] tensor when codebook_loss is false.                           │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
// The forward fuses the search (shared with nearest_code), the gather and the per-row squared
// error; the backward fuses grad_x and the segment sum of the codebook gradient.  Every sum has
// an order fixed by the data (row blocks of fixed size, rows grouped by code in row order), so
// both are deterministic across runs and thread counts.
#include "cpu/common.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace vqkernels {
namespace cpu {

namespace {
constexpr int64_t kSseBlock = 1024;  // rows per partial SSE; fixed so the sum order is too
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in,
                                                        const at::Tensor& cb_in, double beta,
                                                        c10::string_view metric,
                                                        bool codebook_loss) {
  check_same_dtype_and_dim(x_in, cb_in);
  const bool cosine = parse_metric(std::string(metric.data(), metric.size()));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor codebook = cb_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  auto q = at::empty({N, D}, x.options());
  auto indices = at::empty({N}, x.options().dtype(at::kLong));
  auto loss = at::zeros({}, x.options().dtype(at::kFloat));
  if (N == 0) return {q, indices, loss};

  int64_t* idx = indices.data_ptr<int64_t>();
  {
    std::vector<float> best(static_cast<size_t>(N));
    search(x, codebook, cosine, idx, best.data());
  }

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

std::tuple<at::Tensor, at::Tensor> quantize_backward(const at::Tensor& grad_q_in,
                                                     const at::Tensor& grad_loss,
                                                     const at::Tensor& x_in,
                                                     const at::Tensor& cb_in,
                                                     const at::Tensor& indices_in, double beta,
                                                     bool codebook_loss) {
  check_same_dtype_and_dim(x_in, cb_in);
  check_cpu_float_2d(grad_q_in, "grad_quantized");
  TORCH_CHECK(grad_q_in.sizes() == x_in.sizes(),
              "vqkernels.quantize_backward (cpu backend): grad_quantized must have the shape of "
              "x ", x_in.sizes(), ", got ", grad_q_in.sizes());
  TORCH_CHECK(grad_loss.device().is_cpu() && grad_loss.numel() == 1,
              "vqkernels.quantize_backward (cpu backend): grad_loss must be a one-element CPU "
              "tensor, got shape ", grad_loss.sizes(), " on ", grad_loss.device());
  const int64_t N = x_in.size(0), D = x_in.size(1), K = cb_in.size(0);
  check_indices(indices_in, N, K, 0, "quantize_backward");

  const at::Tensor x = x_in.contiguous();
  const at::Tensor codebook = cb_in.contiguous();
  const at::Tensor gq = grad_q_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t* idx = indices.data_ptr<int64_t>();

  const double numel = static_cast<double>(std::max<int64_t>(N * D, 1));
  const float g = grad_loss.to(at::kFloat).item<float>();
  // Coefficients as the reference forms them: (python scalar) · grad_loss in fp32.
  const float coef_x = static_cast<float>(2.0 * beta / numel) * g;
  const float coef_c = static_cast<float>(-2.0 / numel) * g;

  auto grad_x = at::empty({N, D}, x.options());
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
            for (int64_t d = 0; d < D; ++d) {
              const float diff = to_f32(row[d]) - to_f32(code[d]);
              gxr[d] = static_cast<T>(to_f32(gqr[d]) + coef_x * diff);
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
    grad_cb = grad_cb32.to(codebook.scalar_type());
  } else {
    grad_cb = at::empty({0}, codebook.options());
  }
  return {grad_x, grad_cb};
}

}  // namespace cpu
}  // namespace vqkernels
