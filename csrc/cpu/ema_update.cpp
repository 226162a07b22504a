// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ cluster_stats(x[N,D], indices[N] int64, K) -> (counts[K] f32, sums[K,D] f32)               │
// │ ema_update_(codebook![K,D] f32, cluster_size![K] f32, embed_sum![K,D] f32,                 │
// │             x[N,D], indices[N] int64, decay, eps) -> ()                                    │
// │   x: float32/bfloat16/float16, any strides; indices in [-1, K), -1 = ignored row.          │
// │   counts_k = #{i: idx_i = k}; sums_k = Σ_{i: idx_i = k} x_i (fp64 accumulation, rounded).  │
// │   cluster_size ← decay·cluster_size + (1−decay)·counts;                                    │
// │   embed_sum ← decay·embed_sum + (1−decay)·sums;  n = Σ cluster_size;                       │
// │   codebook_k = embed_sum_k / ((cluster_size_k + eps) / (n + K·eps) · n).                   │
// │ Multi-head: x [N,H,D], indices [N,H], counts [H,K], sums/codebook/embed_sum [H,K,D],       │
// │ cluster_size [H,K]: the statistics of the flattened rows (n·H + h) by global code h·K + k  │
// │ (the same sums, in the same row order, as H separate calls); n = Σ_k cluster_size[h, k]    │
// │ per head.                                                                                  │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
// No one-hot matrix: a counting sort groups the rows by code (O(N + K) extra), then each code's
// rows are summed in row order in fp64.  The order of every sum is fixed by the data alone, so
// the results have the same bits on every run and every thread count; fp64 accumulation makes
// them equal to the reference's (fp64 index_add_, then rounded) except in rare double-rounding
// cases (≤ 1 ulp of fp32).
#include "cpu/common.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace vqkernels {
namespace cpu {

namespace {

// counts [K] and sums [K, D] (fp32) of contiguous x [N, D] by already range-checked indices.
void compute_stats(const at::Tensor& x, const int64_t* idx, int64_t K, float* counts,
                   float* sums) {
  const int64_t N = x.size(0), D = x.size(1);
  std::vector<int64_t> offsets, order;
  bucket_rows(idx, N, K, offsets, order);
  const Isa isa = active_isa();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    // Codes are independent: any split over threads gives the same bits.
    // Grain ≈ 64 Ki summed values per chunk (small problems stay on the calling thread).
    const int64_t rows_per_code = N / K + 1;
    const int64_t grain = std::max<int64_t>(1, 65536 / (std::max<int64_t>(D, 1) * rows_per_code));
    at::parallel_for(0, K, grain,
                     [&](int64_t k0, int64_t k1) {
                       std::vector<double> acc_buf(static_cast<size_t>(D));
                       double* acc = acc_buf.data();
                       with_isa(isa, [&]() VQK_INLINE {
                         for (int64_t k = k0; k < k1; ++k) {
                           const int64_t b = offsets[k], e = offsets[k + 1];
                           counts[k] = static_cast<float>(e - b);
                           for (int64_t d = 0; d < D; ++d) acc[d] = 0.0;
                           for (int64_t p = b; p < e; ++p) {
                             const T* row = xp + order[p] * D;
                             for (int64_t d = 0; d < D; ++d) acc[d] += to_f32(row[d]);
                           }
                           float* out = sums + k * D;
                           for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(acc[d]);
                         }
                       });
                     });
  });
}

// x [N, D] (or [N, H, D]) and indices [N] ([N, H]) -> flattened contiguous rows [N·H, D] and
// global codes (h·K + idx, -1 kept) over H·K codes.
struct FlatStats {
  at::Tensor x;
  std::vector<int64_t> idx;
  int64_t heads;
};

FlatStats check_x_and_indices(const at::Tensor& x, const at::Tensor& indices, int64_t K,
                              const char* op) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "vqkernels.", op,
              " (cpu backend): x must be [N, D] (or [N, H, D] multi-head), got ", x.sizes());
  const int64_t H = x.dim() == 3 ? x.size(1) : 1;
  const int64_t D = x.size(-1);
  const at::Tensor x2 = x.contiguous().reshape({-1, D});
  check_cpu_float_2d(x2, "x");
  TORCH_CHECK(K >= 1, "vqkernels.", op, " (cpu backend): num_codes must be >= 1, got ", K);
  TORCH_CHECK(indices.sizes() == x.sizes().slice(0, x.dim() - 1), "vqkernels.", op,
              " (cpu backend): indices must have shape ", x.sizes().slice(0, x.dim() - 1),
              ", got ", indices.sizes());
  const at::Tensor flat = indices.contiguous().reshape({-1});
  check_indices(flat, x2.size(0), K, -1, op);
  return {x2, global_indices(flat.data_ptr<int64_t>(), x2.size(0) / std::max<int64_t>(H, 1), H, K),
          H};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cluster_stats(const at::Tensor& x_in,
                                                 const at::Tensor& indices_in,
                                                 int64_t num_codes) {
  const FlatStats f = check_x_and_indices(x_in, indices_in, num_codes, "cluster_stats");
  const int64_t D = f.x.size(1), H = f.heads;
  auto opts = f.x.options().dtype(at::kFloat);
  auto counts = at::empty({H * num_codes}, opts);
  auto sums = at::empty({H * num_codes, D}, opts);
  compute_stats(f.x, f.idx.data(), H * num_codes, counts.data_ptr<float>(),
                sums.data_ptr<float>());
  if (x_in.dim() == 3) return {counts.reshape({H, num_codes}), sums.reshape({H, num_codes, D})};
  return {counts, sums};
}

void ema_update_(const at::Tensor& codebook, const at::Tensor& cluster_size,
                 const at::Tensor& embed_sum, const at::Tensor& x_in,
                 const at::Tensor& indices_in, double decay, double eps) {
  const char* op = "ema_update_";
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{codebook, "codebook"},
                         {cluster_size, "cluster_size"},
                         {embed_sum, "embed_sum"}}) {
    TORCH_CHECK(t.device().is_cpu(), "vqkernels.ema_update_ (cpu backend): ", name,
                " must be a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "vqkernels.ema_update_ (cpu backend): ", name,
                " must be float32 (EMA state stays fp32), got ", t.scalar_type());
  }
  TORCH_CHECK((codebook.dim() == 2 || codebook.dim() == 3) && codebook.size(0) >= 1 &&
                  codebook.size(-2) >= 1,
              "vqkernels.ema_update_ (cpu backend): codebook must have shape [K, D] (or "
              "[H, K, D]) with K >= 1, got ", codebook.sizes());
  const int64_t H = codebook.dim() == 3 ? codebook.size(0) : 1;
  const int64_t Kh = codebook.size(-2), D = codebook.size(-1), K = H * Kh;
  TORCH_CHECK(cluster_size.sizes() == codebook.sizes().slice(0, codebook.dim() - 1),
              "vqkernels.ema_update_ (cpu backend): cluster_size must have shape ",
              codebook.sizes().slice(0, codebook.dim() - 1), ", got ", cluster_size.sizes());
  TORCH_CHECK(embed_sum.sizes() == codebook.sizes(),
              "vqkernels.ema_update_ (cpu backend): embed_sum must have shape ", codebook.sizes(),
              ", got ", embed_sum.sizes());
  TORCH_CHECK(x_in.dim() == codebook.dim() && (H == 1 || x_in.size(1) == H),
              "vqkernels.ema_update_ (cpu backend): x must be [N, D] for a [K, D] codebook and "
              "[N, H, D] for an [H, K, D] one, got x ", x_in.sizes(), " and codebook ",
              codebook.sizes());
  const FlatStats f = check_x_and_indices(x_in, indices_in, Kh, op);
  TORCH_CHECK(x_in.size(-1) == D, "vqkernels.ema_update_ (cpu backend): x has D=", x_in.size(-1),
              " but codebook has D=", D);
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0,
              "vqkernels.ema_update_ (cpu backend): decay must lie in [0, 1], got ", decay);
  TORCH_CHECK(eps > 0.0, "vqkernels.ema_update_ (cpu backend): eps must be > 0, got ", eps);

  // The state is updated in place; a non-contiguous state is updated through a contiguous copy
  // that is written back at the end.
  at::Tensor cb = codebook.contiguous(), cs = cluster_size.contiguous(),
             es = embed_sum.contiguous();

  std::vector<float> counts(static_cast<size_t>(K));
  at::Tensor sums_t = at::empty({K, D}, f.x.options().dtype(at::kFloat));
  float* sums = sums_t.data_ptr<float>();
  compute_stats(f.x, f.idx.data(), K, counts.data(), sums);

  // The blend follows the reference's fp32 operation order: mul_(decay) then
  // add_(·, alpha=1−decay), which PyTorch evaluates as one fused multiply-add; the scalars are
  // rounded to fp32 as PyTorch does for a float tensor.
  const float decay_f = static_cast<float>(decay);
  const float omd_f = static_cast<float>(1.0 - decay);
  float* csp = cs.data_ptr<float>();
  float* esp = es.data_ptr<float>();
  float* cbp = cb.data_ptr<float>();
  const Isa isa = active_isa();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(D, 1));
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t k = k0; k < k1; ++k) csp[k] = std::fma(counts[k], omd_f, csp[k] * decay_f);
      for (int64_t j = k0 * D; j < k1 * D; ++j) esp[j] = std::fma(sums[j], omd_f, esp[j] * decay_f);
    });
  });
  // Per head: n = Σ_k cluster_size: sequential fp64 sum (deterministic), rounded to fp32;
  // Laplace smoothing, same fp32 order as the reference: (cs + eps) / (n + K·eps) · n.
  const float eps_f = static_cast<float>(eps);
  for (int64_t h = 0; h < H; ++h) {
    double n64 = 0.0;
    for (int64_t k = h * Kh; k < (h + 1) * Kh; ++k) n64 += csp[k];
    const float n = static_cast<float>(n64);
    const float denom = n + static_cast<float>(static_cast<double>(Kh) * eps);
    at::parallel_for(h * Kh, (h + 1) * Kh, grain, [&](int64_t k0, int64_t k1) {
      with_isa(isa, [&]() VQK_INLINE {
        for (int64_t k = k0; k < k1; ++k) {
          const float smoothed = (csp[k] + eps_f) / denom * n;
          for (int64_t d = 0; d < D; ++d) cbp[k * D + d] = esp[k * D + d] / smoothed;
        }
      });
    });
  }
  if (!cb.is_same(codebook)) codebook.copy_(cb);
  if (!cs.is_same(cluster_size)) cluster_size.copy_(cs);
  if (!es.is_same(embed_sum)) embed_sum.copy_(es);
}

}  // namespace cpu
}  // namespace vqkernels
