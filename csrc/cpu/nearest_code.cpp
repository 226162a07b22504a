// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ nearest_code(x[N,D], codebook[K,D], metric) -> (indices[N] int64, distance[N] float32)     │
// │   x, codebook: float32 / bfloat16 / float16, same dtype, any strides; metric "l2"|"cosine" │
// │   L2:     argmin_k ‖c_k‖² − 2·x·c_k,  distance = max(best + ‖x‖², 0)                        │
// │   cosine: argmin_k −x·ĉ_k (ĉ = c / max(‖c‖, 1e-12)), distance = 1 + best / max(‖x‖, 1e-12) │
// │   ties -> lowest index; fp32 accumulation whatever the input dtype; no N x K buffer.       │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
//
// Design: the codebook is packed once per call (fp32, pre-scaled so that a plain dot product
// plus a per-code bias *is* the score, see common.h), rows are packed per thread in small
// transposed tiles, and an ISA-specific register-blocked kernel (search_avx512.cpp,
// search_avx2.cpp, or the scalar one below) computes a tile of scores in registers and folds it
// into a running (min, argmin) per row without ever storing the scores.  Work is split over row
// blocks (and over code ranges when there are too few rows to occupy the threads); all blocking
// is sized so a row block and a codebook chunk stay in L2.
#include "cpu/common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace vqkernels {
namespace cpu {

// ============================================================================== ISA selection

Isa best_isa() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return isa;
#else
  return Isa::kScalar;
#endif
}

Isa active_isa() {
  Isa isa = best_isa();
  const char* env = std::getenv("VQKERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return isa;
  std::string want(env);
  Isa cap;
  if (want == "scalar") {
    cap = Isa::kScalar;
  } else if (want == "avx2") {
    cap = Isa::kAvx2;
  } else if (want == "avx512" || want == "auto") {
    cap = Isa::kAvx512;
  } else {
    TORCH_CHECK(false, "VQKERNELS_CPU_ISA must be one of auto, scalar, avx2, avx512; got '", want,
                "'");
  }
  return static_cast<int>(cap) < static_cast<int>(isa) ? cap : isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

SearchKernel search_kernel_for(Isa isa, int64_t D) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == Isa::kAvx512) return avx512_search_kernel(D);
  if (isa == Isa::kAvx2) return avx2_search_kernel(D);
#endif
  (void)isa;
  return scalar_search_kernel(D);
}

// ============================================================================== checks

void check_cpu_float_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "vqkernels (cpu backend): ", name,
              " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, "vqkernels (cpu backend): ", name, " must be 2-D, got shape ",
              t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "vqkernels (cpu backend): ", name, " must be float32, bfloat16 or float16, got ", st);
}

void check_same_dtype_and_dim(const at::Tensor& x, const at::Tensor& codebook) {
  check_cpu_float_2d(x, "x");
  check_cpu_float_2d(codebook, "codebook");
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "vqkernels (cpu backend): x (",
              x.scalar_type(), ") and codebook (", codebook.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(x.size(1) == codebook.size(1), "vqkernels (cpu backend): x has D=", x.size(1),
              " but codebook has D=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, "vqkernels (cpu backend): codebook must have K >= 1 codes");
  TORCH_CHECK(codebook.size(0) < (int64_t{1} << 30),
              "vqkernels (cpu backend): codebook has too many codes (K=", codebook.size(0),
              "; at most 2^30)");
}

bool parse_metric(const std::string& metric) {
  if (metric == "l2") return false;
  if (metric == "cosine") return true;
  TORCH_CHECK(false, "vqkernels (cpu backend): metric must be 'l2' or 'cosine', got '", metric,
              "'");
}

void check_indices(const at::Tensor& indices, int64_t n, int64_t k, int64_t lo, const char* op) {
  TORCH_CHECK(indices.device().is_cpu(), "vqkernels.", op,
              " (cpu backend): indices must be a CPU tensor, got device ", indices.device());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "vqkernels.", op,
              " (cpu backend): indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == n, "vqkernels.", op,
              " (cpu backend): indices must have shape [", n, "] (one per row of x), got ",
              indices.sizes());
  // Range check before any use as an address: an out-of-range index is an error, never UB.
  const auto idx = indices.contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  int64_t bad = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < lo || p[i] >= k) {
      bad = i;
      break;
    }
  }
  TORCH_CHECK(bad < 0, "vqkernels.", op, " (cpu backend): indices must lie in [", lo, ", ", k,
              ")", (lo < 0 ? " (-1 = ignored row)" : ""), ", got indices[", bad,
              "] = ", (bad >= 0 ? p[bad] : 0));
}

std::vector<int64_t> global_indices(const int64_t* indices, int64_t n, int64_t heads, int64_t k) {
  std::vector<int64_t> out(static_cast<size_t>(n * heads));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t v = indices[i * heads + h];
      out[i * heads + h] = v < 0 ? v : h * k + v;
    }
  }
  return out;
}

bool parse_estimator(c10::string_view estimator) {
  if (estimator == "ste") return false;
  if (estimator == "rotation") return true;
  TORCH_CHECK(false, "vqkernels (cpu backend): estimator must be 'ste' or 'rotation', got '",
              std::string(estimator.data(), estimator.size()), "'");
}

void bucket_rows(const int64_t* indices, int64_t n, int64_t k, std::vector<int64_t>& offsets,
                 std::vector<int64_t>& order) {
  offsets.assign(static_cast<size_t>(k + 1), 0);
  for (int64_t i = 0; i < n; ++i) {
    if (indices[i] >= 0) ++offsets[static_cast<size_t>(indices[i] + 1)];
  }
  for (int64_t j = 0; j < k; ++j) offsets[j + 1] += offsets[j];
  order.resize(static_cast<size_t>(offsets[k]));
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    if (indices[i] >= 0) order[static_cast<size_t>(cursor[indices[i]]++)] = i;
  }
}

// ============================================================================== scalar kernel

namespace {

constexpr int64_t kScalarRT = 8;
constexpr int64_t kScalarCT = 4;

// Portable fallback with the same packed layout and the same lane-wise update rule as the SIMD
// kernels (the inner loops are simple enough for the compiler to vectorize for the baseline ISA).
void scalar_block(const float* xt, int64_t ntiles, const float* cb, const float* bias, int64_t D,
                  int64_t ct0, int64_t ct1, float* bval, int32_t* bidx) {
  constexpr int64_t RT = kScalarRT, CT = kScalarCT;
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* xtile = xt + t * D * RT;
    float* bv = bval + t * RT;
    int32_t* bi = bidx + t * RT;
    for (int64_t c = ct0; c < ct1; ++c) {
      const float* ctile = cb + c * D * CT;
      // Same arithmetic order as the SIMD kernels (bias first, then one fused multiply-add per
      // d in increasing d), so every ISA returns the same bits.
      float acc[CT][RT];
      for (int64_t j = 0; j < CT; ++j) {
        for (int64_t r = 0; r < RT; ++r) acc[j][r] = bias[c * CT + j];
      }
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < CT; ++j) {
          const float b = ctile[d * CT + j];
          for (int64_t r = 0; r < RT; ++r) acc[j][r] = std::fma(xtile[d * RT + r], b, acc[j][r]);
        }
      }
      for (int64_t j = 0; j < CT; ++j) {
        const int32_t kj = static_cast<int32_t>(c * CT + j);
        for (int64_t r = 0; r < RT; ++r) {
          const float s = acc[j][r];
          if (s < bv[r]) {  // strict: an equal later code never replaces an earlier one
            bv[r] = s;
            bi[r] = kj;
          }
        }
      }
    }
  }
}

}  // namespace

SearchKernel scalar_search_kernel(int64_t /*D*/) {
  return {Isa::kScalar, kScalarRT, kScalarCT, &scalar_block};
}

// ============================================================================== packing

namespace {

struct AlignedBuf {
  // 64-byte aligned fp32 scratch from the torch CPU allocator (aligned loads in the kernels).
  at::Tensor t;
  float* p = nullptr;
  explicit AlignedBuf(int64_t n) {
    t = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(at::kFloat));
    p = t.data_ptr<float>();
  }
};

// Packs codes [K, D] into the tile layout of common.h.  ‖c‖² and ‖c‖ are accumulated in fp64
// from the fp32-rounded values (the same rounded codebook the product uses), then rounded once.
template <typename T>
void pack_codebook(const T* c, int64_t K, int64_t D, int64_t CT, bool cosine, float* cb,
                   float* bias) {
  const int64_t nct = (K + CT - 1) / CT;
  // Grain: ≥ 64 Ki packed values per chunk, so small codebooks are packed without waking threads.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(CT * D, 1));
  at::parallel_for(0, nct, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> row(static_cast<size_t>(D));
    for (int64_t t = t0; t < t1; ++t) {
      float* tile = cb + t * D * CT;
      for (int64_t j = 0; j < CT; ++j) {
        const int64_t k = t * CT + j;
        if (k >= K) {
          // Padding code: zero vector and +inf bias, so its score is +inf (or NaN for a
          // non-finite x), never strictly below the running best, hence never chosen.
          for (int64_t d = 0; d < D; ++d) tile[d * CT + j] = 0.f;
          bias[k] = std::numeric_limits<float>::infinity();
          continue;
        }
        double sq = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          row[d] = to_f32(c[k * D + d]);
          sq += static_cast<double>(row[d]) * row[d];
        }
        if (!cosine) {
          // ×(−2) is exact in binary floating point (barring overflow), so the kernels' dot with
          // −2c is exactly −2·(their dot with c): score = ‖c‖² − 2·x·c as in the reference.
          for (int64_t d = 0; d < D; ++d) tile[d * CT + j] = -2.f * row[d];
          bias[k] = static_cast<float>(sq);
        } else {
          // F.normalize semantics: c / max(‖c‖, eps) (a division, as the reference does).
          const float nrm = std::max(static_cast<float>(std::sqrt(sq)), 1e-12f);
          for (int64_t d = 0; d < D; ++d) tile[d * CT + j] = -(row[d] / nrm);
          bias[k] = 0.f;
        }
      }
    }
  });
}

// Packs rows [r0, r0 + nrows) of x [N, D] into ntiles transposed tiles xt[t][d][RT], fp32, with
// zero padding rows (their results are discarded).  When row_sq is given, also writes ‖x_i‖²
// (fp64 sum in a fixed order, see sum_sq8) for these rows while they are in cache: x is read
// from memory once per call.
template <typename T>
VQK_INLINE inline void pack_rows(const T* x, int64_t ld, int64_t r0, int64_t nrows, int64_t ntiles,
                                 int64_t D, int64_t RT, float* xt, float* row_sq) {
  for (int64_t t = 0; t < ntiles; ++t) {
    float* tile = xt + t * D * RT;
    for (int64_t r = 0; r < RT; ++r) {
      const int64_t i = t * RT + r;
      if (i < nrows) {
        const T* src = x + (r0 + i) * ld;
        for (int64_t d = 0; d < D; ++d) tile[d * RT + r] = to_f32(src[d]);
        if (row_sq != nullptr) {
          row_sq[r0 + i] = static_cast<float>(
              sum_sq8(D, [&](int64_t d) VQK_INLINE { return to_f32(src[d]); }));
        }
      } else {
        for (int64_t d = 0; d < D; ++d) tile[d * RT + r] = 0.f;
      }
    }
  }
}

}  // namespace

// ============================================================================== driver

void search(const at::Tensor& x, const at::Tensor& codebook, bool cosine, int64_t* indices,
            float* best_score, float* row_sq) {
  const int64_t N = x.size(0), D = x.size(1), K = codebook.size(0);
  if (N == 0) return;
  // Rows may be strided (one head of an [N, H, D] input); elements within a row are not.
  TORCH_CHECK(D <= 1 || x.stride(1) == 1, "vqkernels (cpu backend): search needs unit-stride rows");
  const int64_t ld = x.stride(0);
  const SearchKernel ker = search_kernel_for(active_isa(), D);
  const int64_t RT = ker.rt, CT = ker.ct;
  const int64_t nct = (K + CT - 1) / CT;
  const int64_t nrt = (N + RT - 1) / RT;

  AlignedBuf cb(nct * CT * D), bias(nct * CT);
  dispatch_float(codebook.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    pack_codebook(reinterpret_cast<const T*>(codebook.data_ptr()), K, D, CT, cosine, cb.p, bias.p);
  });

  // Cache blocking: a packed row block of ~128 KiB and a codebook chunk of ~256 KiB stay in L2
  // (the kernels stream code tiles through L1 against one row tile at a time).
  const int64_t Dp = std::max<int64_t>(D, 1);
  const int64_t block_rows = std::clamp<int64_t>(32768 / Dp, RT, 1024);
  int64_t rb_tiles = std::max<int64_t>(block_rows / RT, 1);
  const int64_t chunk_tiles = std::max<int64_t>((65536 / Dp) / CT, 1);

  // Parallelism: row blocks first; shrink them, then split the code range, when rows are too
  // few to give every thread a few work items.  Splits are merged in code order below.
  const int64_t nthreads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t want_items = 4 * nthreads;
  int64_t ngroups = (nrt + rb_tiles - 1) / rb_tiles;
  if (ngroups < want_items) {
    rb_tiles = std::max<int64_t>(nrt / want_items, 1);
    ngroups = (nrt + rb_tiles - 1) / rb_tiles;
  }
  int64_t splits = 1;
  if (ngroups < want_items && nthreads > 1) {
    // Only split when each split keeps a reasonable run of code tiles (≥ 8).
    splits = std::clamp<int64_t>((want_items + ngroups - 1) / ngroups, 1,
                                 std::max<int64_t>(nct / 8, 1));
  }
  std::vector<float> pval;
  std::vector<int32_t> pidx;
  if (splits > 1) {
    pval.resize(static_cast<size_t>(splits * N));
    pidx.resize(static_cast<size_t>(splits * N));
  }

  const auto st = x.scalar_type();
  const void* xraw = x.data_ptr();
  const Isa isa = active_isa();
  const int64_t nitems = ngroups * splits;
  // Small problems run on the calling thread: waking a pool thread costs microseconds on a
  // quiet machine and can cost a scheduler time slice (milliseconds) on a busy one, so each
  // extra worker must bring ≥ 2^22 multiply-adds (~40 µs of one core) of its own.
  const int64_t macs = N * nct * CT * std::max<int64_t>(D, 1);
  const int64_t by_work = std::max<int64_t>(macs >> 22, 1);
  const int64_t nworkers =
      at::in_parallel_region() ? 1 : std::min({nthreads, nitems, by_work});
  // Per-worker scratch, allocated up front (nothing inside the parallel region may throw).
  const int64_t xt_stride = rb_tiles * RT * std::max<int64_t>(D, 1);  // multiple of 16 floats
  AlignedBuf xt_all(nworkers * xt_stride);
  std::vector<float> bval_all(static_cast<size_t>(nworkers * rb_tiles * RT));
  std::vector<int32_t> bidx_all(static_cast<size_t>(nworkers * rb_tiles * RT));
  std::vector<int64_t> packed_group(static_cast<size_t>(nworkers), -1);

  auto work_item = [&](int64_t worker, int64_t w) {
    float* xt = xt_all.p + worker * xt_stride;
    float* bval = bval_all.data() + worker * rb_tiles * RT;
    int32_t* bidx = bidx_all.data() + worker * rb_tiles * RT;
    const int64_t g = w / splits, s = w % splits;
    const int64_t t_begin = g * rb_tiles;
    const int64_t ntiles = std::min(rb_tiles, nrt - t_begin);
    const int64_t r0 = t_begin * RT;
    const int64_t nrows = std::min(ntiles * RT, N - r0);
    if (packed_group[worker] != g) {  // consecutive splits of one group reuse the packed rows
      // Only split 0 writes the norms.  Items are handed out in increasing order, so the worker
      // that takes split 0 of a group always packs it (with the norms) itself.
      float* sq = s == 0 ? row_sq : nullptr;
      dispatch_float(st, [&](auto tag) {
        using T = decltype(tag);
        with_isa(isa, [&]() VQK_INLINE {
          pack_rows(reinterpret_cast<const T*>(xraw), ld, r0, nrows, ntiles, D, RT, xt, sq);
        });
      });
      packed_group[worker] = g;
    }
    // Running best starts at +inf with index 0: a row whose scores are all NaN (NaN in x)
    // keeps index 0, a valid index (documented unchecked behaviour).
    std::fill(bval, bval + rb_tiles * RT, std::numeric_limits<float>::infinity());
    std::fill(bidx, bidx + rb_tiles * RT, 0);
    const int64_t c_begin = s * nct / splits, c_end = (s + 1) * nct / splits;
    for (int64_t c = c_begin; c < c_end; c += chunk_tiles) {
      ker.fn(xt, ntiles, cb.p, bias.p, D, c, std::min(c + chunk_tiles, c_end), bval, bidx);
    }
    float* out_v = splits == 1 ? best_score : pval.data() + s * N;
    for (int64_t i = 0; i < nrows; ++i) {
      out_v[r0 + i] = bval[i];
      if (splits == 1) {
        indices[r0 + i] = bidx[i];
      } else {
        pidx[s * N + r0 + i] = bidx[i];
      }
    }
  };

  // Dynamic scheduling: torch's pool runs one worker per thread and the workers take items from
  // a shared counter, so on a shared machine a descheduled thread does not hold the others up
  // at the end of a static partition.  Items are handed out in increasing order; which worker
  // runs which item does not change any result.
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, nworkers, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t worker = b0; worker < b1; ++worker) {
      for (int64_t w = next_item.fetch_add(1); w < nitems; w = next_item.fetch_add(1)) {
        work_item(worker, w);
      }
    }
  });

  if (splits > 1) {
    // Merge in code order with a strict comparison: on equal scores the earlier split (lower
    // indices) wins, so the result is the lexicographic (score, index) minimum.
    at::parallel_for(0, N, 65536, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        float v = pval[i];
        int32_t k = pidx[i];
        for (int64_t s = 1; s < splits; ++s) {
          if (pval[s * N + i] < v) {
            v = pval[s * N + i];
            k = pidx[s * N + i];
          }
        }
        best_score[i] = v;
        indices[i] = k;
      }
    });
  }
}

// ============================================================================== sampling

namespace {

constexpr int64_t kSampleCT = 16;  // codes per packed tile of the sampling kernel
// An upper bound of every Gumbel value the hash can produce: u <= 1 − 2^-24 gives
// g = −log(−log(u)) <= 16.64 (fp32).  A code whose noiseless perturbed score a = −logit/τ
// satisfies a − kGumbelMax >= best cannot win (fp32 rounding is monotonic, so fl(a − g) >= best
// too, and only a strictly lower score replaces the best): its noise is never computed.  This
// skips the two logs for most codes at low temperature without changing any result.
constexpr float kGumbelMax = 16.7f;

// The counter-based hash of vqkernels/reference/sampling.py, on 32-bit words.
inline uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x21F0AAADu;
  v ^= v >> 15;
  v *= 0x735A2D97u;
  v ^= v >> 15;
  return v;
}

inline uint32_t row_key(uint64_t seed, uint64_t row) {
  uint32_t h = mix32(static_cast<uint32_t>(seed >> 32) ^ 0x9E3779B9u);
  h = mix32(h ^ static_cast<uint32_t>(seed));
  h = mix32(h ^ static_cast<uint32_t>(row >> 32));
  return mix32(h ^ static_cast<uint32_t>(row));
}

inline float gumbel(uint32_t key, uint32_t code) {
  const uint32_t bits = mix32(key ^ mix32(code));
  // (2·(bits >> 9) + 1)·2^-24: an odd multiple of 2^-24 in (0, 1), exact in fp32.
  const float u = static_cast<float>((bits >> 9) * 2u + 1u) * 0x1p-24f;
  return -std::log(-std::log(u));
}

// Gumbel-max over all K codes for rows [0, N) of x (row stride ld): indices[i] = argmin_k
// (−logit_k·inv_temp − g(seed, row_base + i·row_step, k)) with the reference's logits, and
// best_score[i] = the (unperturbed) search score of the chosen code, row_sq[i] = ‖x_i‖².
// The scores come from the same packed codebook and the same operation order (bias, then one
// fma per d in increasing d) as the search kernels, so they are bit-identical to nearest_code's.
template <typename T>
void sample_rows(const T* x, int64_t ld, int64_t N, int64_t D, int64_t K, const float* cb,
                 const float* bias, bool cosine, float inv_temp, uint64_t seed, int64_t row_base,
                 int64_t row_step, int64_t* indices, float* best_score, float* row_sq) {
  constexpr int64_t CT = kSampleCT;
  const int64_t nct = (K + CT - 1) / CT;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K * D, 1));
  const Isa isa = active_isa();
  at::parallel_for(0, N, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> xr(static_cast<size_t>(std::max<int64_t>(D, 1)));
    with_isa(isa, [&]() VQK_INLINE {
      for (int64_t i = i0; i < i1; ++i) {
        const T* src = x + i * ld;
        for (int64_t d = 0; d < D; ++d) xr[d] = to_f32(src[d]);
        const float xsq =
            static_cast<float>(sum_sq8(D, [&](int64_t d) VQK_INLINE { return xr[d]; }));
        const float nrm = std::max(static_cast<float>(std::sqrt(static_cast<double>(xsq))), 1e-12f);
        const uint32_t key = row_key(seed, static_cast<uint64_t>(row_base + i * row_step));
        float best = std::numeric_limits<float>::infinity(), best_s = 0.f;
        int64_t best_k = 0;
        for (int64_t t = 0; t < nct; ++t) {
          const float* tile = cb + t * D * CT;
          float acc[CT];
          for (int64_t j = 0; j < CT; ++j) acc[j] = bias[t * CT + j];
          for (int64_t d = 0; d < D; ++d) {
            const float xd = xr[d];
            for (int64_t j = 0; j < CT; ++j) acc[j] = std::fma(xd, tile[d * CT + j], acc[j]);
          }
          const int64_t jn = std::min(CT, K - t * CT);
          for (int64_t j = 0; j < jn; ++j) {
            const float s = acc[j];
            // LR's logits: −sqrt(max(d², 1e-8)) (l2), the cosine similarity −s/‖x‖ (cosine).
            const float logit = cosine ? -s / nrm : -std::sqrt(std::max(s + xsq, 1e-8f));
            const float a = -(logit * inv_temp);
            if (a - kGumbelMax >= best) continue;  // cannot win (see kGumbelMax)
            const float z = a - gumbel(key, static_cast<uint32_t>(t * CT + j));
            if (z < best) {  // strict: ties keep the lowest index
              best = z;
              best_k = t * CT + j;
              best_s = s;
            }
          }
        }
        indices[i] = best_k;
        best_score[i] = best_s;
        row_sq[i] = xsq;
      }
    });
  });
}

}  // namespace

void sample_search(const at::Tensor& x, const at::Tensor& codebook, bool cosine, double temperature,
                   int64_t seed, int64_t row_base, int64_t row_step, int64_t* indices,
                   float* best_score, float* row_sq) {
  const int64_t N = x.size(0), D = x.size(1), K = codebook.size(0);
  if (N == 0) return;
  TORCH_CHECK(D <= 1 || x.stride(1) == 1, "vqkernels (cpu backend): search needs unit-stride rows");
  constexpr int64_t CT = kSampleCT;
  const int64_t nct = (K + CT - 1) / CT;
  AlignedBuf cb(nct * CT * D), bias(nct * CT);
  // 1/τ rounded once to fp32 (the reference multiplies the fp32 logits by the same value).
  const float inv_temp = static_cast<float>(1.0 / temperature);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    pack_codebook(reinterpret_cast<const T*>(codebook.data_ptr()), K, D, CT, cosine, cb.p, bias.p);
    sample_rows(reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), N, D, K, cb.p, bias.p,
                cosine, inv_temp, static_cast<uint64_t>(seed), row_base, row_step, indices,
                best_score, row_sq);
  });
}

void search_heads(const at::Tensor& x, const at::Tensor& codebook, bool cosine, double temperature,
                  int64_t seed, int64_t* indices, float* best_score, float* row_sq) {
  if (codebook.dim() == 2) {
    if (temperature > 0.0) {
      sample_search(x, codebook, cosine, temperature, seed, 0, 1, indices, best_score, row_sq);
    } else {
      search(x, codebook, cosine, indices, best_score, row_sq);
    }
    return;
  }
  // One codebook per head: a loop over heads inside the op (each head's search is parallel over
  // its rows); results are interleaved into [N, H] order.
  const int64_t N = x.size(0), H = x.size(1);
  if (N == 0) return;
  std::vector<int64_t> idx(static_cast<size_t>(N));
  std::vector<float> best(static_cast<size_t>(N)), sq(static_cast<size_t>(N));
  for (int64_t h = 0; h < H; ++h) {
    const at::Tensor xh = x.select(1, h), ch = codebook.select(0, h);
    if (temperature > 0.0) {
      sample_search(xh, ch, cosine, temperature, seed, h, H, idx.data(), best.data(), sq.data());
    } else {
      search(xh, ch, cosine, idx.data(), best.data(), sq.data());
    }
    for (int64_t n = 0; n < N; ++n) {
      indices[n * H + h] = idx[n];
      best_score[n * H + h] = best[n];
      if (row_sq != nullptr) row_sq[n * H + h] = sq[n];
    }
  }
}

void check_search_args(const at::Tensor& x, const at::Tensor& codebook) {
  if (codebook.dim() == 3) {
    TORCH_CHECK(x.dim() == 3 && x.size(1) == codebook.size(0) && codebook.size(0) >= 1,
                "vqkernels (cpu backend): a multi-head codebook [H, K, D] ", codebook.sizes(),
                " needs x of shape [N, H, D], got ", x.sizes());
    check_same_dtype_and_dim(x.select(1, 0), codebook.select(0, 0));
  } else {
    check_same_dtype_and_dim(x, codebook);
  }
}

void check_sampling(double temperature, int64_t seed) {
  TORCH_CHECK(temperature >= 0.0 && std::isfinite(temperature),
              "vqkernels (cpu backend): sample_temperature must be a finite float >= 0, got ",
              temperature);
  TORCH_CHECK(seed >= 0, "vqkernels (cpu backend): seed must be >= 0, got ", seed);
}

// ============================================================================== the op

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& x_in, const at::Tensor& cb_in,
                                                c10::string_view metric,
                                                double sample_temperature, int64_t seed) {
  check_search_args(x_in, cb_in);
  check_sampling(sample_temperature, seed);
  const bool cosine = parse_metric(std::string(metric.data(), metric.size()));
  // Rows with unit-stride elements are read in place whatever their row stride (one group's
  // slice of a wider feature dim, e.g. GroupedResidualVQ's chunks): the kernels pack row tiles
  // themselves, so a contiguous copy of x would be one more pass and one more [N, D] buffer.
  const bool strided_rows_ok =
      x_in.dim() == 2 && (x_in.size(1) <= 1 || x_in.stride(1) == 1) && x_in.stride(0) >= 0;
  const at::Tensor x = strided_rows_ok ? x_in : x_in.contiguous();
  const at::Tensor codebook = cb_in.contiguous();
  const int64_t N = x.size(0);
  const int64_t R = x.dim() == 3 ? N * x.size(1) : N;  // (row, head) pairs
  auto lead = x.sizes().slice(0, x.dim() - 1);
  auto indices = at::empty(lead, x.options().dtype(at::kLong));
  auto distance = at::empty(lead, x.options().dtype(at::kFloat));
  if (N == 0) return {indices, distance};
  float* dist = distance.data_ptr<float>();
  std::vector<float> xsq(static_cast<size_t>(R));
  search_heads(x, codebook, cosine, sample_temperature, seed, indices.data_ptr<int64_t>(), dist,
               xsq.data());

  // Best score -> distance.  ‖x‖² is added back only here (it does not change the argmin);
  // cancellation can leave a tiny negative L2 value, clamped at 0 like the reference.
  at::parallel_for(0, R, 65536, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (!cosine) {
        dist[i] = std::max(dist[i] + xsq[i], 0.f);
      } else {
        const float nrm = std::max(static_cast<float>(std::sqrt(static_cast<double>(xsq[i]))),
                                   1e-12f);
        dist[i] = 1.f + dist[i] / nrm;  // best = −x·ĉ, so 1 + best/‖x‖ = 1 − x̂·ĉ
      }
    }
  });
  return {indices, distance};
}

}  // namespace cpu
}  // namespace vqkernels
