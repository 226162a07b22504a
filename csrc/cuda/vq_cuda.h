// ================================================================================================
// vqkernels CUDA backend: C-style launchers (plain CUDA runtime API, no torch headers).
//
// Shapes (DESIGN.md §2): x [N, D], codebook [K, D], indices [N] int64.  Inputs are row-major with
// a unit inner stride and any row stride (`*_row_stride`, in elements); outputs are contiguous.
// Input dtypes: float32, bfloat16, float16 (x, codebook and grad_quantized share one dtype);
// all accumulation, EMA state, counts, sums, distances and losses are float32 (sums accumulate in
// float64 on the way).  Every launcher is stream-ordered on `stream`, never synchronizes the host,
// and returns the first CUDA error it saw (cudaSuccess otherwise).  Scratch memory is passed in as
// `workspace`, at least `*_workspace_bytes(...)` bytes, 256-byte aligned (a torch allocation is).
//
// Semantics are those of vqkernels/reference.py (the specification):
//   nearest_code   argmin_k ||c_k||^2 - 2 x.c_k (l2) or argmax_k x.c_k/max(||c_k||, 1e-12)
//                  (cosine), fp32 FMA products, ties -> lowest index; distance = best + ||x||^2
//                  clamped >= 0 (l2) or 1 + best/max(||x||, 1e-12) (cosine).
//   cluster_stats  counts[k] = #{i: idx_i = k}, sums[k] = sum_{i: idx_i = k} x_i; idx outside
//                  [0, K) (-1 = padding) is ignored.  Deterministic: rows are stably sorted by
//                  index and each code's rows are summed in row order (bitwise run to run).
//   ema_update     cluster_stats + EMA blend + Laplace smoothing, in place on fp32 state.
//   quantize       search + gather (the straight-through value is exactly q) + loss
//                  beta*S/numel [+ S/numel], S = sum (x - q)^2, deterministic reduction.
//   quantize_backward  grad_x = grad_q + (2 beta/numel) g (x - q);
//                  grad_codebook[k] = sum_{i: idx_i = k} (-2/numel) g (x_i - q_i) (deterministic).
// Limits: N, K < 2^31 (the bindings check it); D >= 0.
// ================================================================================================
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

extern "C" {

// Element types of x / codebook / grad_quantized / quantized / grad_x / grad_codebook.
typedef enum { VQ_FLOAT32 = 0, VQ_BFLOAT16 = 1, VQ_FLOAT16 = 2 } vq_dtype;
typedef enum { VQ_METRIC_L2 = 0, VQ_METRIC_COSINE = 1 } vq_metric;

// ---- nearest_code ------------------------------------------------------------------------------
// num_sms: the device's multiprocessor count (it sizes the split of K across blocks when N is
// small; the result does not depend on it).
size_t vq_nearest_code_workspace_bytes(int64_t n, int64_t k, int num_sms);
// indices: [N] int64 (written); distance: [N] float32 (written).
cudaError_t vq_nearest_code(const void* x, int64_t x_row_stride, const void* codebook,
                            int64_t codebook_row_stride, int64_t n, int64_t k, int64_t d,
                            vq_dtype dtype, vq_metric metric, int num_sms, void* workspace,
                            int64_t* indices, float* distance, cudaStream_t stream);

// ---- cluster_stats -----------------------------------------------------------------------------
size_t vq_cluster_stats_workspace_bytes(int64_t n, int64_t k, int64_t d);
// counts: [K] float32, sums: [K, D] float32 contiguous (both fully written).
cudaError_t vq_cluster_stats(const void* x, int64_t x_row_stride, const int64_t* indices,
                             int64_t n, int64_t k, int64_t d, vq_dtype dtype, void* workspace,
                             float* counts, float* sums, cudaStream_t stream);

// ---- ema_update_ -------------------------------------------------------------------------------
size_t vq_ema_update_workspace_bytes(int64_t n, int64_t k, int64_t d);
// codebook [K, D], cluster_size [K], embed_sum [K, D]: float32 contiguous, updated in place.
cudaError_t vq_ema_update(float* codebook, float* cluster_size, float* embed_sum, const void* x,
                          int64_t x_row_stride, const int64_t* indices, int64_t n, int64_t k,
                          int64_t d, vq_dtype dtype, double decay, double eps, void* workspace,
                          cudaStream_t stream);

// ---- nearest_code with Gumbel-max sampling (sampling.cu) ---------------------------------------
// temperature > 0; row i uses the RNG row counter row_base + i * row_step (vqkernels/reference/
// sampling.py); no workspace.  indices: [N] int64; distance: [N] float32.
cudaError_t vq_nearest_code_sample(const void* x, int64_t x_row_stride, const void* codebook,
                                   int64_t codebook_row_stride, int64_t n, int64_t k, int64_t d,
                                   vq_dtype dtype, vq_metric metric, double temperature,
                                   uint64_t seed, int64_t row_base, int64_t row_step,
                                   int64_t* indices, float* distance, cudaStream_t stream);

// ---- quantize (forward) ------------------------------------------------------------------------
size_t vq_quantize_workspace_bytes(int64_t n, int64_t k, int num_sms);
// quantized: [N, D] contiguous, dtype of x; indices: [N] int64; loss: [] float32.
cudaError_t vq_quantize(const void* x, int64_t x_row_stride, const void* codebook,
                        int64_t codebook_row_stride, int64_t n, int64_t k, int64_t d,
                        vq_dtype dtype, vq_metric metric, double beta, bool codebook_loss,
                        int num_sms, void* workspace, void* quantized, int64_t* indices,
                        float* loss, cudaStream_t stream);

// ---- quantize_backward -------------------------------------------------------------------------
size_t vq_quantize_backward_workspace_bytes(int64_t n, int64_t k, int64_t d, bool codebook_loss);
// grad_quantized: [N, D] dtype of x; grad_loss: [] float32 (read on the device, no host sync);
// indices: [N] int64 in [0, K) (other values: q = 0 for grad_x, row ignored for grad_codebook).
// grad_x: [N, D] contiguous, dtype of x; grad_codebook: [K, D] contiguous, dtype of the codebook,
// written only when codebook_loss (may be null otherwise).
cudaError_t vq_quantize_backward(const void* grad_quantized, int64_t grad_quantized_row_stride,
                                 const float* grad_loss, const void* x, int64_t x_row_stride,
                                 const void* codebook, int64_t codebook_row_stride,
                                 const int64_t* indices, int64_t n, int64_t k, int64_t d,
                                 vq_dtype dtype, double beta, bool codebook_loss, void* workspace,
                                 void* grad_x, void* grad_codebook, cudaStream_t stream);
// The same with the rotation-trick estimator: grad_x = s (g' - 2 w (w.g') + 2 u (q^.g')) +
// ((2 beta/numel) g) (x - q) (LR 1.32's rotate_to gradient; see quantize.cu).  Same workspace.
cudaError_t vq_quantize_backward_rotation(
    const void* grad_quantized, int64_t grad_quantized_row_stride, const float* grad_loss,
    const void* x, int64_t x_row_stride, const void* codebook, int64_t codebook_row_stride,
    const int64_t* indices, int64_t n, int64_t k, int64_t d, vq_dtype dtype, double beta,
    bool codebook_loss, void* workspace, void* grad_x, void* grad_codebook, cudaStream_t stream);

}  // extern "C"
