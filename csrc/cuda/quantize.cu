// ================================================================================================
// quantize (straight-through VQ with the VQ-VAE losses): fused forward and backward.
//
//   x            [N, D]  float32/bfloat16/float16, codebook [K, D] same dtype
//   quantized    [N, D]  out, dtype of x: exactly q = codebook[idx] (straight-through value)
//   indices      [N]     int64 out (search of search.cu; ties -> lowest index)
//   loss         []      float32 out: beta * S/numel [+ S/numel when codebook_loss],
//                        S = sum (x - q)^2 in fp32 per element; 0 when N = 0
// backward:
//   grad_x       [N, D]  dtype of x: E(grad_q) + ((2 beta/numel) * g) * (x - q), fp32 math, with
//                        E = identity (straight-through) or, for vq_quantize_backward_rotation,
//                        the rotation trick (LR 1.32's rotate_to): s (g' - 2 w (w.g') + 2 u (q^.g'))
//                        with u = x/max(|x|, 1e-6), q^ = q/max(|q|, 1e-6),
//                        w = (u + q^)/max(|u + q^|, 1e-6), s = |q|/max(|x|, 1e-6); one warp per
//                        row, O(D): three passes over the row, never a D x D matrix
//   grad_codebook[K, D]  dtype of the codebook (codebook_loss only):
//                        sum_{i: idx_i = k} ((-2/numel) * g) * (x_i - q_i), deterministic
//                        (segment_sum.cu), accumulated in float64
// g = grad_loss is read on the device (no host sync).  The loss is reduced deterministically:
// per-row fp32 sums (fixed warp butterfly), then one block adds the rows in float64 in a fixed
// order, so it is bitwise reproducible run to run.
// ================================================================================================
#include <climits>

#include "common.cuh"

namespace vqk {
namespace {

constexpr int kReduceThreads = 1024;

// One warp per row: merge the split partials, gather the code, write the straight-through value
// and the row's squared error.
template <typename T>
__global__ void quantize_finalize_kernel(const T* __restrict__ x, int64_t x_rs,
                                         const T* __restrict__ cb, int64_t cb_rs, int n, int d,
                                         int splits, const float* __restrict__ part_score,
                                         const int* __restrict__ part_index,
                                         T* __restrict__ quantized, int64_t* __restrict__ indices,
                                         float* __restrict__ row_err) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // uniform per warp
  // Every lane merges (same loads, broadcast) so all know the code without a shuffle.
  float best = part_score[row];
  int idx = part_index[row];
  for (int s = 1; s < splits; ++s) {
    const float os = part_score[static_cast<int64_t>(s) * n + row];
    const int oi = part_index[static_cast<int64_t>(s) * n + row];
    if (better(os, oi, best, idx)) {
      best = os;
      idx = oi;
    }
  }
  const T* xr = x + row * x_rs;
  const T* qr = cb + static_cast<int64_t>(idx) * cb_rs;
  T* out = quantized + row * d;
  float err = 0.f;
  for (int j = lane; j < d; j += 32) {
    const T xv = xr[j];
    const T qv = qr[j];
    const float xf = to_f(xv), qf = to_f(qv);
    // The straight-through value is exactly the chosen code (the reference's
    // q.detach() + (x - x.detach())); the gradient to x is applied by the backward.
    out[j] = qv;
    const float diff = __fsub_rn(xf, qf);
    err = __fadd_rn(err, __fmul_rn(diff, diff));
  }
  err = warp_sum(err);
  if (lane == 0) {
    indices[row] = idx;
    row_err[row] = err;
  }
}

// One block: S = sum of row errors in float64 (fixed order), then the loss in fp32 steps.
__global__ void __launch_bounds__(kReduceThreads)
    loss_kernel(const float* __restrict__ row_err, int n, float numel_f,
                float beta, bool codebook_loss, float* __restrict__ loss) {
  __shared__ double red[kReduceThreads];
  double local = 0.0;
  for (int i = threadIdx.x; i < n; i += kReduceThreads) local += static_cast<double>(row_err[i]);
  red[threadIdx.x] = local;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    // Reference: commit = S / numel; loss = beta * commit (+ S / numel).
    const float commit = __fdiv_rn(static_cast<float>(red[0]), numel_f);
    float l = __fmul_rn(beta, commit);
    if (codebook_loss) l = __fadd_rn(l, commit);
    *loss = l;
  }
}

template <typename T>
__global__ void grad_x_kernel(const T* __restrict__ grad_q, int64_t gq_rs,
                              const float* __restrict__ grad_loss, const T* __restrict__ x,
                              int64_t x_rs, const T* __restrict__ cb, int64_t cb_rs,
                              const int64_t* __restrict__ indices, int64_t n, int64_t k, int64_t d,
                              float coef, T* __restrict__ grad_x) {
  // Reference: grad_q.float() + ((2 beta / numel) * g) * (x - q), each op rounded to fp32.
  const float cg = __fmul_rn(coef, *grad_loss);
  const int64_t numel = n * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / d;
    const int64_t j = e - row * d;
    const int64_t code = indices[row];
    const float xf = to_f(x[row * x_rs + j]);
    const float qf = (code >= 0 && code < k) ? to_f(cb[code * cb_rs + j]) : 0.f;
    const float g = __fadd_rn(to_f(grad_q[row * gq_rs + j]), __fmul_rn(cg, __fsub_rn(xf, qf)));
    grad_x[e] = from_f<T>(g);
  }
}

// Rotation trick backward, one warp per row.  Written as s·g' − a·(u + q̂) + b·u with
// a = 2s((u + q̂)·g')/max(|u + q̂|, ε)² and b = 2s(q̂·g'); the row sums use the fixed warp
// butterfly (deterministic).
template <typename T>
__global__ void grad_x_rotation_kernel(const T* __restrict__ grad_q, int64_t gq_rs,
                                       const float* __restrict__ grad_loss,
                                       const T* __restrict__ x, int64_t x_rs,
                                       const T* __restrict__ cb, int64_t cb_rs,
                                       const int64_t* __restrict__ indices, int64_t n, int64_t k,
                                       int64_t d, float coef, T* __restrict__ grad_x) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // uniform per warp
  const float kEps = 1e-6f;
  const float cg = __fmul_rn(coef, *grad_loss);
  const int64_t code = indices[row];
  const bool valid = code >= 0 && code < k;
  const T* xr = x + row * x_rs;
  const T* qr = cb + (valid ? code : 0) * cb_rs;
  const T* gr = grad_q + row * gq_rs;
  float xx = 0.f, qq = 0.f;
  for (int64_t j = lane; j < d; j += 32) {
    const float xf = to_f(xr[j]);
    const float qf = valid ? to_f(qr[j]) : 0.f;
    xx = __fmaf_rn(xf, xf, xx);
    qq = __fmaf_rn(qf, qf, qq);
  }
  xx = warp_sum(xx);
  qq = warp_sum(qq);
  const float xn = __fsqrt_rn(xx), qn = __fsqrt_rn(qq);
  const float cu = __frcp_rn(fmaxf(xn, kEps)), cq = __frcp_rn(fmaxf(qn, kEps));
  float vv = 0.f, vg = 0.f, qg = 0.f;  // v = u + q^
  for (int64_t j = lane; j < d; j += 32) {
    const float xf = to_f(xr[j]);
    const float qf = valid ? to_f(qr[j]) : 0.f;
    const float gf = to_f(gr[j]);
    const float v = __fadd_rn(__fmul_rn(cu, xf), __fmul_rn(cq, qf));
    vv = __fmaf_rn(v, v, vv);
    vg = __fmaf_rn(v, gf, vg);
    qg = __fmaf_rn(__fmul_rn(cq, qf), gf, qg);
  }
  vv = warp_sum(vv);
  vg = warp_sum(vg);
  qg = warp_sum(qg);
  const float vn = fmaxf(__fsqrt_rn(vv), kEps);
  const float sc = __fmul_rn(qn, cu);
  const float a = __fdiv_rn(__fmul_rn(__fmul_rn(2.f, sc), vg), __fmul_rn(vn, vn));
  const float b = __fmul_rn(__fmul_rn(2.f, sc), qg);
  T* out = grad_x + row * d;
  for (int64_t j = lane; j < d; j += 32) {
    const float xf = to_f(xr[j]);
    const float qf = valid ? to_f(qr[j]) : 0.f;
    const float u = __fmul_rn(cu, xf);
    const float v = __fadd_rn(u, __fmul_rn(cq, qf));
    float r = __fsub_rn(__fmul_rn(sc, to_f(gr[j])), __fmul_rn(a, v));
    r = __fadd_rn(r, __fmul_rn(b, u));
    out[j] = from_f<T>(__fadd_rn(r, __fmul_rn(cg, __fsub_rn(xf, qf))));
  }
}

struct QuantizeBuffers {
  SearchBuffers search;
  float* row_err = nullptr;  // [N]
};

QuantizeBuffers carve_quantize(Carver& c, int64_t n, int64_t k, int num_sms) {
  QuantizeBuffers b;
  b.search = carve_search(c, n, k, num_sms);
  b.row_err = c.take<float>(n);
  return b;
}

template <typename T>
cudaError_t quantize_finalize_t(const T* x, int64_t x_rs, const T* cb, int64_t cb_rs, int n,
                                int d, int splits, const QuantizeBuffers& b, T* quantized,
                                int64_t* indices, cudaStream_t stream) {
  const int threads = 256;  // 8 rows per block
  const int64_t blocks = ceil_div(static_cast<int64_t>(n) * 32, threads);
  quantize_finalize_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      x, x_rs, cb, cb_rs, n, d, splits, b.search.part_score, b.search.part_index, quantized,
      indices, b.row_err);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_x_t(const T* grad_q, int64_t gq_rs, const float* grad_loss, const T* x,
                     int64_t x_rs, const T* cb, int64_t cb_rs, const int64_t* indices, int64_t n,
                     int64_t k, int64_t d, float coef, T* grad_x, bool rotation,
                     cudaStream_t stream) {
  const int64_t numel = n * d;
  if (numel == 0) return cudaSuccess;
  if (rotation) {
    const int rthreads = 256;  // 8 rows (warps) per block
    const int64_t rblocks = ceil_div(n * 32, static_cast<int64_t>(rthreads));
    grad_x_rotation_kernel<T><<<static_cast<unsigned>(rblocks), rthreads, 0, stream>>>(
        grad_q, gq_rs, grad_loss, x, x_rs, cb, cb_rs, indices, n, k, d, coef, grad_x);
    return cudaGetLastError();
  }
  const int threads = 256;
  const int64_t want = ceil_div(numel, threads);
  const unsigned blocks = static_cast<unsigned>(want < 65536 ? want : 65536);
  grad_x_kernel<T><<<blocks, threads, 0, stream>>>(grad_q, gq_rs, grad_loss, x, x_rs, cb, cb_rs,
                                                   indices, n, k, d, coef, grad_x);
  return cudaGetLastError();
}

}  // namespace
}  // namespace vqk

extern "C" size_t vq_quantize_workspace_bytes(int64_t n, int64_t k, int num_sms) {
  vqk::Carver c(nullptr);
  vqk::carve_quantize(c, n, k, num_sms);
  return c.size();
}

extern "C" cudaError_t vq_quantize(const void* x, int64_t x_row_stride, const void* codebook,
                                   int64_t codebook_row_stride, int64_t n, int64_t k, int64_t d,
                                   vq_dtype dtype, vq_metric metric, double beta,
                                   bool codebook_loss, int num_sms, void* workspace,
                                   void* quantized, int64_t* indices, float* loss,
                                   cudaStream_t stream) {
  if (n < 0 || k <= 0 || d < 0 || n > INT_MAX || k > INT_MAX || d > INT_MAX)
    return cudaErrorInvalidValue;
  vqk::Carver c(workspace);
  const vqk::QuantizeBuffers b = vqk::carve_quantize(c, n, k, num_sms);
  const vqk::SearchPlan plan = vqk::plan_search(n, k, num_sms);
  cudaError_t err = cudaSuccess;
  if (n > 0) {
    err = vqk::launch_search(x, x_row_stride, codebook, codebook_row_stride, n, k, d, dtype,
                             metric, plan, b.search, stream);
    if (err != cudaSuccess) return err;
    const int ni = static_cast<int>(n), di = static_cast<int>(d);
    switch (dtype) {
      case VQ_FLOAT32:
        err = vqk::quantize_finalize_t(static_cast<const float*>(x), x_row_stride,
                                       static_cast<const float*>(codebook), codebook_row_stride,
                                       ni, di, plan.splits, b, static_cast<float*>(quantized),
                                       indices, stream);
        break;
      case VQ_BFLOAT16:
        err = vqk::quantize_finalize_t(
            static_cast<const __nv_bfloat16*>(x), x_row_stride,
            static_cast<const __nv_bfloat16*>(codebook), codebook_row_stride, ni, di, plan.splits,
            b, static_cast<__nv_bfloat16*>(quantized), indices, stream);
        break;
      case VQ_FLOAT16:
        err = vqk::quantize_finalize_t(static_cast<const __half*>(x), x_row_stride,
                                       static_cast<const __half*>(codebook), codebook_row_stride,
                                       ni, di, plan.splits, b, static_cast<__half*>(quantized),
                                       indices, stream);
        break;
      default:
        return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  // numel = max(N * D, 1), as a Python int divided into an fp32 tensor: rounded to fp32.
  const int64_t numel = n * d > 0 ? n * d : 1;
  vqk::loss_kernel<<<1, vqk::kReduceThreads, 0, stream>>>(
      b.row_err, static_cast<int>(n), static_cast<float>(numel), static_cast<float>(beta),
      codebook_loss, loss);
  return cudaGetLastError();
}

extern "C" size_t vq_quantize_backward_workspace_bytes(int64_t n, int64_t k, int64_t d,
                                                       bool codebook_loss) {
  if (!codebook_loss) return 0;
  vqk::Carver c(nullptr);
  vqk::carve_segments(c, n, k, d);
  return c.size();
}

static cudaError_t quantize_backward_impl(
    const void* grad_quantized, int64_t grad_quantized_row_stride, const float* grad_loss,
    const void* x, int64_t x_row_stride, const void* codebook, int64_t codebook_row_stride,
    const int64_t* indices, int64_t n, int64_t k, int64_t d, vq_dtype dtype, double beta,
    bool codebook_loss, void* workspace, void* grad_x, void* grad_codebook, bool rotation,
    cudaStream_t stream) {
  if (n < 0 || k <= 0 || d < 0 || n > INT_MAX || k >= INT_MAX || d > INT_MAX)
    return cudaErrorInvalidValue;
  const int64_t numel = n * d > 0 ? n * d : 1;
  // Python evaluates (2.0 * beta / numel) and (-2.0 / numel) in double; multiplying an fp32
  // tensor rounds them to fp32.
  const float coef_x = static_cast<float>(2.0 * beta / static_cast<double>(numel));
  const float coef_cb = static_cast<float>(-2.0 / static_cast<double>(numel));
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case VQ_FLOAT32:
      err = vqk::grad_x_t(static_cast<const float*>(grad_quantized), grad_quantized_row_stride,
                          grad_loss, static_cast<const float*>(x), x_row_stride,
                          static_cast<const float*>(codebook), codebook_row_stride, indices, n, k,
                          d, coef_x, static_cast<float*>(grad_x), rotation, stream);
      break;
    case VQ_BFLOAT16:
      err = vqk::grad_x_t(static_cast<const __nv_bfloat16*>(grad_quantized),
                          grad_quantized_row_stride, grad_loss,
                          static_cast<const __nv_bfloat16*>(x), x_row_stride,
                          static_cast<const __nv_bfloat16*>(codebook), codebook_row_stride,
                          indices, n, k, d, coef_x, static_cast<__nv_bfloat16*>(grad_x), rotation,
                          stream);
      break;
    case VQ_FLOAT16:
      err = vqk::grad_x_t(static_cast<const __half*>(grad_quantized), grad_quantized_row_stride,
                          grad_loss, static_cast<const __half*>(x), x_row_stride,
                          static_cast<const __half*>(codebook), codebook_row_stride, indices, n,
                          k, d, coef_x, static_cast<__half*>(grad_x), rotation, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || !codebook_loss) return err;
  vqk::Carver c(workspace);
  const vqk::SegmentBuffers seg = vqk::carve_segments(c, n, k, d);
  err = vqk::launch_sort_by_code(indices, n, k, seg, /*counts=*/nullptr, stream);
  if (err != cudaSuccess) return err;
  return vqk::launch_segment_sum(x, x_row_stride, codebook, codebook_row_stride, dtype,
                                 /*out_is_f32=*/false, n, k, d, grad_loss, coef_cb, seg,
                                 grad_codebook, stream);
}

extern "C" cudaError_t vq_quantize_backward(
    const void* grad_quantized, int64_t grad_quantized_row_stride, const float* grad_loss,
    const void* x, int64_t x_row_stride, const void* codebook, int64_t codebook_row_stride,
    const int64_t* indices, int64_t n, int64_t k, int64_t d, vq_dtype dtype, double beta,
    bool codebook_loss, void* workspace, void* grad_x, void* grad_codebook, cudaStream_t stream) {
  return quantize_backward_impl(grad_quantized, grad_quantized_row_stride, grad_loss, x,
                                x_row_stride, codebook, codebook_row_stride, indices, n, k, d,
                                dtype, beta, codebook_loss, workspace, grad_x, grad_codebook,
                                /*rotation=*/false, stream);
}

extern "C" cudaError_t vq_quantize_backward_rotation(
    const void* grad_quantized, int64_t grad_quantized_row_stride, const float* grad_loss,
    const void* x, int64_t x_row_stride, const void* codebook, int64_t codebook_row_stride,
    const int64_t* indices, int64_t n, int64_t k, int64_t d, vq_dtype dtype, double beta,
    bool codebook_loss, void* workspace, void* grad_x, void* grad_codebook, cudaStream_t stream) {
  return quantize_backward_impl(grad_quantized, grad_quantized_row_stride, grad_loss, x,
                                x_row_stride, codebook, codebook_row_stride, indices, n, k, d,
                                dtype, beta, codebook_loss, workspace, grad_x, grad_codebook,
                                /*rotation=*/true, stream);
}
