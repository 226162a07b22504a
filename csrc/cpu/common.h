// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ vqkernels C++ CPU backend: shared declarations.                                            │
// │                                                                                            │
// │ Ops (schemas live in vqkernels/_ops.py; semantics are those of vqkernels/reference.py):    │
// │   nearest_code(x[N,D], codebook[K,D], metric, sample_temperature, seed)                    │
// │       -> (indices[N] i64, distance[N] f32)                                                 │
// │   cluster_stats(x[N,D], indices[N] i64, K)    -> (counts[K] f32, sums[K,D] f32)            │
// │   ema_update_(codebook![K,D] f32, cluster_size![K] f32, embed_sum![K,D] f32, x, indices,   │
// │               decay, eps) -> ()                                                            │
// │   quantize(x, codebook, beta, metric, codebook_loss, estimator)                            │
// │       -> (q[N,D], indices[N] i64, loss[])                                                  │
// │   quantize_backward(grad_q[N,D], grad_loss[], x, codebook, indices, beta, codebook_loss,   │
// │                     estimator) -> (grad_x[N,D], grad_codebook[K,D] or [0])                 │
// │ Multi-head: codebook [H,K,D] with x [N,H,D], indices [N,H], counts [H,K], state [H,K(,D)]. │
// │ x/codebook: float32, bfloat16 or float16 (same dtype), any strides; math in fp32 (sums of  │
// │ many terms in fp64 where the reference does so).                                           │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace vqkernels {
namespace cpu {

// ------------------------------------------------------------------------------ ISA selection

// Which hand-vectorized search kernel runs.  Chosen at run time with __builtin_cpu_supports (the
// build uses no -march flag, so one binary runs on any x86-64 and on non-x86 through kScalar).
// VQKERNELS_CPU_ISA=scalar|avx2|avx512 caps the choice (tests use it to exercise every path on
// one machine); asking for an ISA the CPU lacks falls back to the best one it has below that.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa();             // what this CPU supports
Isa active_isa();           // best_isa() capped by VQKERNELS_CPU_ISA (read on every call)
const char* isa_name(Isa isa);

// ------------------------------------------------------------------------------ search kernels
//
// Layout shared by every ISA ("rows in lanes"):
//   * x is packed per row tile of RT rows, transposed: xt[d * RT + r] (fp32, zero padded rows);
//   * the codebook is packed per code tile of CT codes: cb[tile][d][j] = scale * codebook[k][d]
//     (fp32) with scale = -2 for L2 and -1/max(‖c‖, 1e-12) for cosine, plus a bias per code:
//     ‖c‖² for L2 and 0 for cosine, +inf for padding codes (never chosen: comparisons are
//     strict and the running best starts at +inf).
// so that score(row, k) = bias[k] + Σ_d xt[d][row] · cb[k][d] is ‖c‖² − 2·x·c (L2) or −x·ĉ
// (cosine), lower is better, exactly the quantity the reference minimizes.  Every kernel
// evaluates it in the same order (acc = bias, then acc = fma(x_d, cb_d, acc) for d = 0..D−1), so
// all ISAs give the same bits.
//
// A block kernel updates, for `ntiles` consecutive row tiles (xt = ntiles · D · RT floats), the
// running (best score, best index) per row in bval/bidx ([ntiles · RT]) over the code tiles
// [ct0, ct1).  Each lane sees codes in increasing index order and replaces its best only on a
// strictly lower score, so ties keep the lowest index, as torch.argmin does.
using BlockKernelFn = void (*)(const float* xt, int64_t ntiles, const float* cb, const float* bias,
                               int64_t D, int64_t ct0, int64_t ct1, float* bval, int32_t* bidx);

struct SearchKernel {
  Isa isa;
  int64_t rt;  // rows per tile (lanes · row groups)
  int64_t ct;  // codes per tile
  BlockKernelFn fn;
};

// The tile shape may depend on D (register blocking tuned per D range).
SearchKernel scalar_search_kernel(int64_t D);
#if defined(__x86_64__) || defined(_M_X64)
SearchKernel avx2_search_kernel(int64_t D);
SearchKernel avx512_search_kernel(int64_t D);
#endif
SearchKernel search_kernel_for(Isa isa, int64_t D);

// Core of nearest_code / quantize: for x [N, D] and codebook [K, D] (both contiguous, same
// float dtype), writes indices [N] (int64) and best_score [N] (fp32, the minimized score above).
// Never allocates anything of size N x K: extra memory is the packed codebook (K·D fp32), one
// packed row block per thread and, when rows are too few to occupy the threads, per-split
// partial results ([splits, N]).
// row_sq (optional, [N]) receives ‖x_i‖² (fp64 sum, rounded), computed while packing.
// x may have strided rows (x.stride(1) must be 1): one head of an [N, H, D] input.
void search(const at::Tensor& x, const at::Tensor& codebook, bool cosine, int64_t* indices,
            float* best_score, float* row_sq = nullptr);

// Gumbel-max sampling over the same scores (see reference/sampling.py for the noise): row i of x
// uses the RNG row counter row_base + i·row_step.  best_score receives the chosen code's
// (unperturbed) score; row_sq (required) ‖x_i‖².
void sample_search(const at::Tensor& x, const at::Tensor& codebook, bool cosine,
                   double temperature, int64_t seed, int64_t row_base, int64_t row_step,
                   int64_t* indices, float* best_score, float* row_sq);

// search / sample_search (temperature > 0) for x [N, D] + codebook [K, D], or per head for
// x [N, H, D] + codebook [H, K, D] (outputs interleaved [N, H]; RNG row counter n·H + h).
// row_sq is required when sampling.
void search_heads(const at::Tensor& x, const at::Tensor& codebook, bool cosine, double temperature,
                  int64_t seed, int64_t* indices, float* best_score, float* row_sq);
void check_search_args(const at::Tensor& x, const at::Tensor& codebook);

// ------------------------------------------------------------------------------ the ops
// (registered for the CPU dispatch key in module.cpp)

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& x, const at::Tensor& codebook,
                                                c10::string_view metric,
                                                double sample_temperature, int64_t seed);
std::tuple<at::Tensor, at::Tensor> cluster_stats(const at::Tensor& x, const at::Tensor& indices,
                                                 int64_t num_codes);
void ema_update_(const at::Tensor& codebook, const at::Tensor& cluster_size,
                 const at::Tensor& embed_sum, const at::Tensor& x, const at::Tensor& indices,
                 double decay, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x,
                                                        const at::Tensor& codebook, double beta,
                                                        c10::string_view metric,
                                                        bool codebook_loss,
                                                        c10::string_view estimator);
std::tuple<at::Tensor, at::Tensor> quantize_backward(const at::Tensor& grad_quantized,
                                                     const at::Tensor& grad_loss,
                                                     const at::Tensor& x,
                                                     const at::Tensor& codebook,
                                                     const at::Tensor& indices, double beta,
                                                     bool codebook_loss,
                                                     c10::string_view estimator);

// codebook_softmax family (codebook_softmax.cpp): streamed softmax over the codebook.
std::tuple<at::Tensor, at::Tensor, at::Tensor> code_distribution(
    const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& row_weight,
    double temperature, c10::string_view metric, const std::optional<at::Tensor>& row_group,
    int64_t num_groups);
std::tuple<at::Tensor, at::Tensor> code_distribution_backward(
    const at::Tensor& grad_logsumexp, const at::Tensor& grad_entropy,
    const at::Tensor& grad_mean_probs, const at::Tensor& x, const at::Tensor& codebook,
    const at::Tensor& row_weight, const at::Tensor& logsumexp, const at::Tensor& entropy,
    double temperature, c10::string_view metric, const std::optional<at::Tensor>& row_group,
    int64_t num_groups, bool need_grad_codebook, bool need_grad_x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize(const at::Tensor& x,
                                                             const at::Tensor& keys,
                                                             const at::Tensor& values,
                                                             double temperature,
                                                             c10::string_view metric);
std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& keys,
    const at::Tensor& values, const at::Tensor& out, const at::Tensor& logsumexp,
    double temperature, c10::string_view metric);

// ------------------------------------------------------------------------------ helpers

// Elementwise / reduction loops (blend, gathers, sums) are written once as an always-inline
// lambda and instantiated for the active ISA: inlined into a function carrying a target
// attribute, the compiler vectorizes it for AVX2/AVX-512 and emits real FMA instructions
// (std::fma would otherwise be a libm call in the baseline x86-64 build).  The arithmetic is
// fixed by the source (no fast-math, -ffp-contract=off, explicit fma), so every ISA computes
// the same bits; only the speed differs.
#define VQK_INLINE __attribute__((always_inline))

// Σ_d f(d)² in fp64 over 8 interleaved lanes (lane d mod 8) combined pairwise: a fixed order, so
// deterministic, yet vectorizable (a single running sum would be a latency-bound chain).  f(d)
// returns an fp32 value whose square is formed in fp32 (as the reference squares in fp32).
template <class F>
VQK_INLINE inline double sum_sq8(int64_t D, const F& f) {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int j = 0; j < 8; ++j) {
      const float v = f(d + j);
      l[j] += static_cast<double>(v * v);
    }
  }
  for (int j = 0; d + j < D; ++j) {
    const float v = f(d + j);
    l[j] += static_cast<double>(v * v);
  }
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

#if defined(__x86_64__) || defined(_M_X64)
template <class F>
__attribute__((target("avx512f,avx2,fma"))) void run_avx512(const F& f) {
  f();
}
template <class F>
__attribute__((target("avx2,fma"))) void run_avx2(const F& f) {
  f();
}
#endif

template <class F>
void with_isa(Isa isa, const F& f) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == Isa::kAvx512) return run_avx512(f);
  if (isa == Isa::kAvx2) return run_avx2(f);
#endif
  (void)isa;
  f();
}

// Checks shared by the ops; messages name the argument.
void check_cpu_float_2d(const at::Tensor& t, const char* name);
void check_same_dtype_and_dim(const at::Tensor& x, const at::Tensor& codebook);
bool parse_metric(const std::string& metric);  // true for cosine
// Checks every index lies in [lo, K) (lo = -1 where -1 means "ignored row").
void check_indices(const at::Tensor& indices, int64_t n, int64_t k, int64_t lo, const char* op);

// Multi-head indices [N, H] (local to each head's K codes) -> global codes h·K + idx of the
// flattened codebook [H·K, D] for the flattened rows [N·H] (-1 stays -1).  2-D: a copy.
std::vector<int64_t> global_indices(const int64_t* indices, int64_t n, int64_t heads, int64_t k);
bool parse_estimator(c10::string_view estimator);  // true for "rotation"

// Counting sort of rows by index: order[offsets[k] .. offsets[k+1]) are the rows i with
// indices[i] == k, in increasing i (stable), so per-code sums run in row order on every thread
// count (determinism).  Rows with index -1 are skipped.  offsets has K + 1 entries.
void bucket_rows(const int64_t* indices, int64_t n, int64_t k, std::vector<int64_t>& offsets,
                 std::vector<int64_t>& order);

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}

// Raw pointer + element conversion, dispatched once per call on the three float dtypes.
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "vqkernels (cpu backend): unsupported dtype ", st);
  }
}

}  // namespace cpu
}  // namespace vqkernels
