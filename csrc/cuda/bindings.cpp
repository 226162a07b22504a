// ================================================================================================
// vqkernels CUDA backend: torch binding of the plain-CUDA launchers in csrc/cuda/*.cu.
//
// Schemas live in vqkernels/_ops.py (defined once, in Python); this file only attaches CUDA
// kernels to them with TORCH_LIBRARY_IMPL(vqkernels, CUDA).  Semantics: vqkernels/reference.py.
//   nearest_code(x[N,D], codebook[K,D], metric, sample_temperature=0, seed=0)
//       -> (indices[N] i64, distance[N] f32)      (sampling: sampling.cu; multi-head: not here)
//   cluster_stats(x[N,D], indices[N] i64, K)    -> (counts[K] f32, sums[K,D] f32)
//   ema_update_(codebook![K,D] f32, cluster_size![K] f32, embed_sum![K,D] f32, x, indices,
//               decay, eps) -> ()
//   quantize(x, codebook, beta, metric, codebook_loss, estimator) -> (q[N,D], indices[N] i64,
//            loss[] f32)     (estimator "ste" or "rotation": only the backward differs)
//   quantize_backward(grad_q[N,D], grad_loss[] f32, x, codebook, indices, beta, codebook_loss,
//                     estimator)
//       -> (grad_x[N,D], grad_codebook[K,D], or [0] when codebook_loss is False)
// x/codebook: float32, bfloat16 or float16 (same dtype), any row stride (a non-unit inner stride
// is copied to contiguous); the mutated EMA state must be contiguous float32.  Every launch runs
// on the current CUDA stream under a device guard; scratch memory comes from torch's caching
// allocator; launch errors raise with the CUDA error string.
// ================================================================================================
// Only c10/cuda headers (stream, guard): ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE
// headers that nothing here needs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <climits>
#include <cmath>
#include <string>
#include <tuple>

#include "cuda/vq_cuda.h"

namespace {

#define VQ_CHECK(cond, op, ...) TORCH_CHECK(cond, "vqkernels::", op, " (cuda backend): ", __VA_ARGS__)

vq_dtype float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return VQ_FLOAT32;
    case at::kBFloat16:
      return VQ_BFLOAT16;
    case at::kHalf:
      return VQ_FLOAT16;
    default:
      VQ_CHECK(false, op, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return VQ_FLOAT32;  // unreachable
}

vq_metric parse_metric(c10::string_view metric, const char* op) {
  if (metric == "l2") return VQ_METRIC_L2;
  if (metric == "cosine") return VQ_METRIC_COSINE;
  VQ_CHECK(false, op, "metric must be 'l2' or 'cosine', got '", std::string(metric), "'");
  return VQ_METRIC_L2;  // unreachable
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  VQ_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got a tensor on ", t.device());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                       const char* nb) {
  VQ_CHECK(a.device() == b.device(), op, na, " is on ", a.device(), " but ", nb, " is on ",
           b.device());
}

void check_2d(const at::Tensor& t, const char* op, const char* name) {
  VQ_CHECK(t.dim() == 2, op, name, " must be 2-D [rows, D], got shape ", t.sizes());
}

void check_int_range(int64_t v, const char* op, const char* what) {
  VQ_CHECK(v >= 0 && v < INT_MAX, op, what, " must be in [0, 2^31 - 1), got ", v);
}

// The launchers take a row stride and need a unit inner stride: copy only when that fails.
at::Tensor unit_inner_stride(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

at::Tensor indices_1d(const at::Tensor& indices, int64_t n, const char* op) {
  check_cuda(indices, op, "indices");
  VQ_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
           "indices must be int64, got ", indices.scalar_type());
  VQ_CHECK(indices.numel() == n, op, "indices must have one entry per row of x (", n,
           "), got shape ", indices.sizes());
  return indices.reshape({n}).to(at::kLong).contiguous();
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// Multiprocessor count of the current device (sizes the K-split of the search), cached per device.
int num_sms() {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < static_cast<int>(cache.size())) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  TORCH_CHECK(err == cudaSuccess && sms > 0, "vqkernels (cuda backend): cannot read the ",
              "multiprocessor count of device ", dev, ": ", cudaGetErrorString(err));
  if (dev >= 0 && dev < static_cast<int>(cache.size())) cache[dev].store(sms);
  return sms;
}

void check_launch(cudaError_t err, const char* op) {
  VQ_CHECK(err == cudaSuccess, op, "CUDA error: ", cudaGetErrorString(err));
}

// x [N, D] and codebook [K, D]: CUDA, same device, same float dtype, shared D, K >= 1.
vq_dtype check_search_inputs(const at::Tensor& x, const at::Tensor& codebook, const char* op) {
  check_cuda(x, op, "x");
  check_cuda(codebook, op, "codebook");
  check_same_device(x, codebook, op, "x", "codebook");
  check_2d(x, op, "x");
  check_2d(codebook, op, "codebook");
  VQ_CHECK(x.size(1) == codebook.size(1), op, "x has D=", x.size(1), " but codebook has D=",
           codebook.size(1));
  const vq_dtype dt = float_dtype(x, op, "x");
  VQ_CHECK(x.scalar_type() == codebook.scalar_type(), op, "x (", x.scalar_type(),
           ") and codebook (", codebook.scalar_type(), ") must have the same dtype");
  VQ_CHECK(codebook.size(0) >= 1, op, "codebook must have at least one code, got shape ",
           codebook.sizes());
  check_int_range(x.size(0), op, "N (rows of x)");
  check_int_range(codebook.size(0), op, "K (codes)");
  check_int_range(x.size(1), op, "D");
  return dt;
}

bool parse_estimator(c10::string_view estimator, const char* op) {
  if (estimator == "ste") return false;
  if (estimator == "rotation") return true;
  VQ_CHECK(false, op, "estimator must be 'ste' or 'rotation', got '", std::string(estimator), "'");
  return false;  // unreachable
}

// ---------------------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> nearest_code_2d(const at::Tensor& x_in,
                                                   const at::Tensor& codebook_in,
                                                   c10::string_view metric,
                                                   double sample_temperature, int64_t seed,
                                                   int64_t row_base, int64_t row_step) {
  const char* op = "nearest_code";
  VQ_CHECK(sample_temperature >= 0.0 && std::isfinite(sample_temperature), op,
           "sample_temperature must be a finite float >= 0, got ", sample_temperature);
  VQ_CHECK(seed >= 0, op, "seed must be >= 0, got ", seed);
  const vq_dtype dt = check_search_inputs(x_in, codebook_in, op);
  const vq_metric m = parse_metric(metric, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_inner_stride(x_in);
  const at::Tensor codebook = unit_inner_stride(codebook_in);
  const int64_t n = x.size(0), k = codebook.size(0), d = x.size(1);
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor distance = at::empty({n}, x.options().dtype(at::kFloat));
  if (n == 0) return {indices, distance};
  if (sample_temperature > 0.0) {
    check_launch(vq_nearest_code_sample(x.data_ptr(), x.stride(0), codebook.data_ptr(),
                                        codebook.stride(0), n, k, d, dt, m, sample_temperature,
                                        static_cast<uint64_t>(seed), row_base, row_step,
                                        indices.data_ptr<int64_t>(), distance.data_ptr<float>(),
                                        c10::cuda::getCurrentCUDAStream()),
                 op);
    return {indices, distance};
  }
  const int sms = num_sms();
  at::Tensor ws = workspace(vq_nearest_code_workspace_bytes(n, k, sms), x);
  check_launch(vq_nearest_code(x.data_ptr(), x.stride(0), codebook.data_ptr(), codebook.stride(0),
                               n, k, d, dt, m, sms, ws.data_ptr(), indices.data_ptr<int64_t>(),
                               distance.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               op);
  return {indices, distance};
}

std::tuple<at::Tensor, at::Tensor> cluster_stats_2d(const at::Tensor& x_in,
                                                    const at::Tensor& indices_in,
                                                    int64_t num_codes) {
  const char* op = "cluster_stats";
  check_cuda(x_in, op, "x");
  check_2d(x_in, op, "x");
  const vq_dtype dt = float_dtype(x_in, op, "x");
  check_same_device(x_in, indices_in, op, "x", "indices");
  check_int_range(num_codes, op, "num_codes");
  check_int_range(x_in.size(0), op, "N (rows of x)");
  check_int_range(x_in.size(1), op, "D");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_inner_stride(x_in);
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor indices = indices_1d(indices_in, n, op);
  at::Tensor counts = at::empty({num_codes}, x.options().dtype(at::kFloat));
  at::Tensor sums = at::empty({num_codes, d}, x.options().dtype(at::kFloat));
  if (num_codes == 0) return {counts, sums};
  at::Tensor ws = workspace(vq_cluster_stats_workspace_bytes(n, num_codes, d), x);
  check_launch(vq_cluster_stats(x.data_ptr(), x.stride(0), indices.data_ptr<int64_t>(), n,
                                num_codes, d, dt, ws.data_ptr(), counts.data_ptr<float>(),
                                sums.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               op);
  return {counts, sums};
}

void ema_update_2d(at::Tensor& codebook, at::Tensor& cluster_size, at::Tensor& embed_sum,
                   const at::Tensor& x_in, const at::Tensor& indices_in, double decay,
                   double eps) {
  const char* op = "ema_update_";
  check_cuda(codebook, op, "codebook");
  check_cuda(cluster_size, op, "cluster_size");
  check_cuda(embed_sum, op, "embed_sum");
  check_cuda(x_in, op, "x");
  check_same_device(codebook, cluster_size, op, "codebook", "cluster_size");
  check_same_device(codebook, embed_sum, op, "codebook", "embed_sum");
  check_same_device(codebook, x_in, op, "codebook", "x");
  check_same_device(codebook, indices_in, op, "codebook", "indices");
  check_2d(codebook, op, "codebook");
  check_2d(x_in, op, "x");
  // The state is written in place through raw pointers: it must be dense fp32.
  VQ_CHECK(codebook.scalar_type() == at::kFloat && cluster_size.scalar_type() == at::kFloat &&
               embed_sum.scalar_type() == at::kFloat,
           op, "codebook, cluster_size and embed_sum must be float32, got ",
           codebook.scalar_type(), ", ", cluster_size.scalar_type(), ", ",
           embed_sum.scalar_type());
  VQ_CHECK(codebook.is_contiguous() && cluster_size.is_contiguous() && embed_sum.is_contiguous(),
           op, "codebook, cluster_size and embed_sum are updated in place and must be contiguous");
  const int64_t k = codebook.size(0), d = codebook.size(1);
  VQ_CHECK(cluster_size.dim() == 1 && cluster_size.size(0) == k, op,
           "cluster_size must have shape [K] = [", k, "], got ", cluster_size.sizes());
  VQ_CHECK(embed_sum.sizes() == codebook.sizes(), op, "embed_sum must have the codebook's shape ",
           codebook.sizes(), ", got ", embed_sum.sizes());
  VQ_CHECK(x_in.size(1) == d, op, "x has D=", x_in.size(1), " but codebook has D=", d);
  const vq_dtype dt = float_dtype(x_in, op, "x");
  check_int_range(k, op, "K (codes)");
  check_int_range(d, op, "D");
  check_int_range(x_in.size(0), op, "N (rows of x)");
  const c10::cuda::CUDAGuard guard(codebook.device());
  const at::Tensor x = unit_inner_stride(x_in);
  const int64_t n = x.size(0);
  const at::Tensor indices = indices_1d(indices_in, n, op);
  if (k == 0) return;
  at::Tensor ws = workspace(vq_ema_update_workspace_bytes(n, k, d), x);
  check_launch(vq_ema_update(codebook.data_ptr<float>(), cluster_size.data_ptr<float>(),
                             embed_sum.data_ptr<float>(), x.data_ptr(), x.stride(0),
                             indices.data_ptr<int64_t>(), n, k, d, dt, decay, eps,
                             ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_2d(const at::Tensor& x_in,
                                                           const at::Tensor& codebook_in,
                                                           double beta, c10::string_view metric,
                                                           bool codebook_loss,
                                                           c10::string_view estimator) {
  const char* op = "quantize";
  parse_estimator(estimator, op);  // the forward is the same for both estimators
  const vq_dtype dt = check_search_inputs(x_in, codebook_in, op);
  const vq_metric m = parse_metric(metric, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_inner_stride(x_in);
  const at::Tensor codebook = unit_inner_stride(codebook_in);
  const int64_t n = x.size(0), k = codebook.size(0), d = x.size(1);
  at::Tensor quantized = at::empty({n, d}, x.options());
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor loss = at::empty({}, x.options().dtype(at::kFloat));
  const int sms = num_sms();
  at::Tensor ws = workspace(vq_quantize_workspace_bytes(n, k, sms), x);
  // Runs even when N = 0: the loss kernel writes the reference's 0.
  check_launch(vq_quantize(x.data_ptr(), x.stride(0), codebook.data_ptr(), codebook.stride(0), n,
                           k, d, dt, m, beta, codebook_loss, sms, ws.data_ptr(),
                           quantized.data_ptr(), indices.data_ptr<int64_t>(),
                           loss.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               op);
  return {quantized, indices, loss};
}

std::tuple<at::Tensor, at::Tensor> quantize_backward_2d(
    const at::Tensor& grad_quantized_in, const at::Tensor& grad_loss_in, const at::Tensor& x_in,
    const at::Tensor& codebook_in, const at::Tensor& indices_in, double beta,
    bool codebook_loss, c10::string_view estimator) {
  const char* op = "quantize_backward";
  const bool rotation = parse_estimator(estimator, op);
  const vq_dtype dt = check_search_inputs(x_in, codebook_in, op);
  check_cuda(grad_quantized_in, op, "grad_quantized");
  check_cuda(grad_loss_in, op, "grad_loss");
  check_same_device(x_in, grad_quantized_in, op, "x", "grad_quantized");
  check_same_device(x_in, grad_loss_in, op, "x", "grad_loss");
  check_same_device(x_in, indices_in, op, "x", "indices");
  VQ_CHECK(grad_quantized_in.sizes() == x_in.sizes(), op, "grad_quantized must have x's shape ",
           x_in.sizes(), ", got ", grad_quantized_in.sizes());
  VQ_CHECK(grad_loss_in.numel() == 1, op, "grad_loss must hold one value, got shape ",
           grad_loss_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_inner_stride(x_in);
  const at::Tensor codebook = unit_inner_stride(codebook_in);
  // The kernels read grad_quantized in x's dtype and grad_loss as fp32 (the loss is fp32).
  const at::Tensor grad_q = unit_inner_stride(grad_quantized_in.to(x.scalar_type()));
  const at::Tensor grad_loss = grad_loss_in.reshape({}).to(at::kFloat).contiguous();
  const int64_t n = x.size(0), k = codebook.size(0), d = x.size(1);
  const at::Tensor indices = indices_1d(indices_in, n, op);
  at::Tensor grad_x = at::empty({n, d}, x.options());
  at::Tensor grad_cb = codebook_loss ? at::empty({k, d}, codebook.options())
                                     : at::empty({0}, codebook.options());
  at::Tensor ws = workspace(vq_quantize_backward_workspace_bytes(n, k, d, codebook_loss), x);
  auto* launcher = rotation ? &vq_quantize_backward_rotation : &vq_quantize_backward;
  check_launch(launcher(grad_q.data_ptr(), grad_q.stride(0),
                                    grad_loss.data_ptr<float>(), x.data_ptr(), x.stride(0),
                                    codebook.data_ptr(), codebook.stride(0),
                                    indices.data_ptr<int64_t>(), n, k, d, dt, beta, codebook_loss,
                                    ws.data_ptr(), grad_x.data_ptr(),
                                    codebook_loss ? grad_cb.data_ptr() : nullptr,
                                    c10::cuda::getCurrentCUDAStream()),
               op);
  return {grad_x, grad_cb};
}

// ------------------------------------------------------------------- multi-head (H codebooks)
//
// codebook [H, K, D] with x [N, H, D] and indices [N, H].  The search runs head by head inside
// the op (a loop of launches on one stream; each head's rows are a strided view, no copy of x);
// the statistics, the EMA blend and the backward run once on the flattened problem: rows
// (n, h) -> n·H + h against codes (h, k) -> h·K + k, which has the bits of H separate calls
// (each code's rows keep their order).  The EMA blend is the reference's formula in ATen ops
// (per-head n); the forward loss is the mean of the per-head losses (= the loss over all
// N·H·D elements up to fp32 rounding).

bool multi_head(const at::Tensor& x, const at::Tensor& codebook, const char* op) {
  if (codebook.dim() != 3) return false;
  VQ_CHECK(x.dim() == 3 && x.size(1) == codebook.size(0) && x.size(2) == codebook.size(2) &&
               codebook.size(0) >= 1,
           op, "a multi-head codebook [H, K, D] ", codebook.sizes(),
           " needs x of shape [N, H, D], got ", x.sizes());
  return true;
}

// Local indices [N, H] -> global codes h·K + idx of the flattened codebook (-1 kept).
at::Tensor global_indices(const at::Tensor& indices, int64_t heads, int64_t k) {
  const at::Tensor offs = at::arange(heads, indices.options().dtype(at::kLong)) * k;
  const at::Tensor idx = indices.to(at::kLong);
  return at::where(idx >= 0, idx + offs, idx).reshape({-1}).contiguous();
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook,
                                                     c10::string_view metric,
                                                     double sample_temperature, int64_t seed) {
  if (!multi_head(x, codebook, "nearest_code")) {
    return nearest_code_2d(x, codebook, metric, sample_temperature, seed, 0, 1);
  }
  const int64_t n = x.size(0), h = x.size(1);
  at::Tensor indices = at::empty({n, h}, x.options().dtype(at::kLong));
  at::Tensor distance = at::empty({n, h}, x.options().dtype(at::kFloat));
  for (int64_t j = 0; j < h; ++j) {
    auto [ij, dj] = nearest_code_2d(x.select(1, j), codebook.select(0, j), metric,
                                    sample_temperature, seed, j, h);
    indices.select(1, j).copy_(ij);
    distance.select(1, j).copy_(dj);
  }
  return {indices, distance};
}

std::tuple<at::Tensor, at::Tensor> cluster_stats_cuda(const at::Tensor& x, const at::Tensor& indices,
                                                      int64_t num_codes) {
  if (x.dim() != 3) return cluster_stats_2d(x, indices, num_codes);
  const char* op = "cluster_stats";
  const int64_t h = x.size(1), d = x.size(2);
  VQ_CHECK(indices.dim() == 2 && indices.size(0) == x.size(0) && indices.size(1) == h, op,
           "indices must have shape [N, H] = ", x.sizes().slice(0, 2), ", got ", indices.sizes());
  check_same_device(x, indices, op, "x", "indices");
  auto [counts, sums] =
      cluster_stats_2d(x.reshape({-1, d}), global_indices(indices, h, num_codes), h * num_codes);
  return {counts.reshape({h, num_codes}), sums.reshape({h, num_codes, d})};
}

void ema_update_cuda(at::Tensor& codebook, at::Tensor& cluster_size, at::Tensor& embed_sum,
                     const at::Tensor& x, const at::Tensor& indices, double decay, double eps) {
  if (!multi_head(x, codebook, "ema_update_")) {
    return ema_update_2d(codebook, cluster_size, embed_sum, x, indices, decay, eps);
  }
  const char* op = "ema_update_";
  const int64_t h = codebook.size(0), k = codebook.size(1), d = codebook.size(2);
  VQ_CHECK(cluster_size.dim() == 2 && cluster_size.size(0) == h && cluster_size.size(1) == k, op,
           "cluster_size must have shape [H, K] = [", h, ", ", k, "], got ", cluster_size.sizes());
  VQ_CHECK(embed_sum.sizes() == codebook.sizes(), op, "embed_sum must have the codebook's shape ",
           codebook.sizes(), ", got ", embed_sum.sizes());
  VQ_CHECK(codebook.scalar_type() == at::kFloat && cluster_size.scalar_type() == at::kFloat &&
               embed_sum.scalar_type() == at::kFloat,
           op, "codebook, cluster_size and embed_sum must be float32");
  auto [counts, sums] = cluster_stats_cuda(x, indices, k);
  const c10::cuda::CUDAGuard guard(codebook.device());
  // The reference's ema_blend_, op for op (fp32): blend, per-head n, Laplace smoothing.
  cluster_size.mul_(decay).add_(counts, 1.0 - decay);
  embed_sum.mul_(decay).add_(sums, 1.0 - decay);
  const at::Tensor n = cluster_size.sum(-1, /*keepdim=*/true);
  const at::Tensor smoothed = (cluster_size + eps) / (n + static_cast<double>(k) * eps) * n;
  codebook.copy_(embed_sum / smoothed.unsqueeze(-1));
  (void)d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x,
                                                             const at::Tensor& codebook,
                                                             double beta, c10::string_view metric,
                                                             bool codebook_loss,
                                                             c10::string_view estimator) {
  if (!multi_head(x, codebook, "quantize")) {
    return quantize_2d(x, codebook, beta, metric, codebook_loss, estimator);
  }
  const int64_t n = x.size(0), h = x.size(1);
  at::Tensor quantized = at::empty(x.sizes(), x.options());
  at::Tensor indices = at::empty({n, h}, x.options().dtype(at::kLong));
  at::Tensor loss = at::zeros({}, x.options().dtype(at::kFloat));
  for (int64_t j = 0; j < h; ++j) {
    auto [qj, ij, lj] = quantize_2d(x.select(1, j), codebook.select(0, j), beta, metric,
                                    codebook_loss, estimator);
    quantized.select(1, j).copy_(qj);
    indices.select(1, j).copy_(ij);
    loss.add_(lj);
  }
  loss.div_(static_cast<double>(h));
  return {quantized, indices, loss};
}

std::tuple<at::Tensor, at::Tensor> quantize_backward_cuda(
    const at::Tensor& grad_quantized, const at::Tensor& grad_loss, const at::Tensor& x,
    const at::Tensor& codebook, const at::Tensor& indices, double beta, bool codebook_loss,
    c10::string_view estimator) {
  if (!multi_head(x, codebook, "quantize_backward")) {
    return quantize_backward_2d(grad_quantized, grad_loss, x, codebook, indices, beta,
                                codebook_loss, estimator);
  }
  const char* op = "quantize_backward";
  const int64_t h = codebook.size(0), k = codebook.size(1), d = codebook.size(2);
  VQ_CHECK(grad_quantized.sizes() == x.sizes(), op, "grad_quantized must have x's shape ",
           x.sizes(), ", got ", grad_quantized.sizes());
  VQ_CHECK(indices.dim() == 2 && indices.size(0) == x.size(0) && indices.size(1) == h, op,
           "indices must have shape [N, H] = ", x.sizes().slice(0, 2), ", got ", indices.sizes());
  auto [grad_x, grad_cb] = quantize_backward_2d(
      grad_quantized.reshape({-1, d}), grad_loss, x.reshape({-1, d}), codebook.reshape({-1, d}),
      global_indices(indices, h, k), beta, codebook_loss, estimator);
  return {grad_x.reshape(x.sizes()), codebook_loss ? grad_cb.reshape(codebook.sizes()) : grad_cb};
}

#undef VQ_CHECK

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels, CUDA, m) {
  m.impl("nearest_code", &nearest_code_cuda);
  m.impl("cluster_stats", &cluster_stats_cuda);
  m.impl("ema_update_", &ema_update_cuda);
  m.impl("quantize", &quantize_cuda);
  m.impl("quantize_backward", &quantize_backward_cuda);
}

// Importing vqkernels._C_cuda loads this library, which runs the registration above; the Python
// module itself exposes nothing else.
PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "vqkernels CUDA kernels (registered as the CUDA implementations of torch.ops.vqkernels)";
}
