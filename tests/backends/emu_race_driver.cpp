// Drives every CUDA launcher (csrc/cuda/vq_cuda.h) on the host emulator
// (csrc/cuda/host_emulation.h) so that a thread sanitizer can watch the emulated GPU threads:
// tests/test_cuda.py::test_emulated_kernels_have_no_data_races builds it with -fsanitize=thread
// together with the emulator-translated .cu files and fails on any report.
//
// What this finds: a block's threads touching the same __shared__ (or global) location without a
// __syncthreads / shuffle between them -- what compute-sanitizer's racecheck finds on a GPU.  The
// emulator runs blocks one after another, so races between blocks are out of its reach.
// Results are not checked here (the ctypes tests compare them with the reference); every shape
// below straddles a tile edge or takes the K-split path (num_sms = 132 with few rows).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "vq_cuda.h"

namespace {

uint32_t g_state = 12345u;

float next_uniform() {  // deterministic LCG in [-1, 1)
  g_state = g_state * 1664525u + 1013904223u;
  return static_cast<float>(g_state >> 8) / static_cast<float>(1u << 23) - 1.0f;
}

// Inputs stored as the launchers read them: fp32, or bf16 / fp16 bit patterns.
std::vector<uint8_t> make_input(int64_t rows, int64_t d, vq_dtype dtype) {
  const size_t elsize = dtype == VQ_FLOAT32 ? 4 : 2;
  std::vector<uint8_t> buf(static_cast<size_t>(rows * d) * elsize + 16);
  for (int64_t i = 0; i < rows * d; ++i) {
    const float v = next_uniform();
    if (dtype == VQ_FLOAT32) {
      std::memcpy(buf.data() + 4 * i, &v, 4);
    } else if (dtype == VQ_BFLOAT16) {
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      const uint16_t hi = static_cast<uint16_t>(bits >> 16);  // truncation: any bf16 value will do
      std::memcpy(buf.data() + 2 * i, &hi, 2);
    } else {
      const _Float16 h = static_cast<_Float16>(v);
      std::memcpy(buf.data() + 2 * i, &h, 2);
    }
  }
  return buf;
}

std::vector<uint8_t> workspace(size_t bytes) { return std::vector<uint8_t>(bytes + 256); }

void* aligned(std::vector<uint8_t>& ws) {  // the launchers expect 256-byte aligned scratch
  const auto p = reinterpret_cast<uintptr_t>(ws.data());
  return reinterpret_cast<void*>((p + 255) & ~uintptr_t(255));
}

int g_failures = 0;

void check(cudaError_t err, const char* what, int64_t n, int64_t k, int64_t d) {
  if (err != cudaSuccess) {
    std::printf("FAIL %s N=%lld K=%lld D=%lld: error %d\n", what, static_cast<long long>(n),
                static_cast<long long>(k), static_cast<long long>(d), static_cast<int>(err));
    ++g_failures;
  }
}

void run_search_and_quantize(int64_t n, int64_t k, int64_t d, vq_dtype dtype, vq_metric metric,
                             int sms) {
  auto x = make_input(n, d, dtype);
  auto cb = make_input(k, d, dtype);
  const size_t elsize = dtype == VQ_FLOAT32 ? 4 : 2;
  std::vector<int64_t> idx(static_cast<size_t>(n) + 1);
  std::vector<float> dist(static_cast<size_t>(n) + 1);
  auto ws = workspace(vq_nearest_code_workspace_bytes(n, k, sms));
  check(vq_nearest_code(x.data(), d, cb.data(), d, n, k, d, dtype, metric, sms, aligned(ws),
                        idx.data(), dist.data(), nullptr),
        "nearest_code", n, k, d);

  std::vector<uint8_t> q(static_cast<size_t>(n * d) * elsize + 16);
  float loss = 0.0f;
  auto wq = workspace(vq_quantize_workspace_bytes(n, k, sms));
  check(vq_quantize(x.data(), d, cb.data(), d, n, k, d, dtype, metric, 0.25, true, sms,
                    aligned(wq), q.data(), idx.data(), &loss, nullptr),
        "quantize", n, k, d);

  auto gq = make_input(n, d, dtype);
  const float grad_loss = 1.5f;
  std::vector<uint8_t> gx(static_cast<size_t>(n * d) * elsize + 16);
  std::vector<uint8_t> gcb(static_cast<size_t>(k * d) * elsize + 16);
  for (bool cb_loss : {true, false}) {
    auto wb = workspace(vq_quantize_backward_workspace_bytes(n, k, d, cb_loss));
    check(vq_quantize_backward(gq.data(), d, &grad_loss, x.data(), d, cb.data(), d, idx.data(), n,
                               k, d, dtype, 0.25, cb_loss, aligned(wb), gx.data(),
                               cb_loss ? gcb.data() : nullptr, nullptr),
          "quantize_backward", n, k, d);
  }
}

void run_ema(int64_t n, int64_t k, int64_t d, vq_dtype dtype) {
  auto x = make_input(n, d, dtype);
  std::vector<int64_t> idx(static_cast<size_t>(n) + 1);
  for (int64_t i = 0; i < n; ++i) {
    // skewed: half the rows on code 0 (long segments over several chunks), some padding (-1)
    idx[static_cast<size_t>(i)] = (i % 7 == 3) ? -1 : (i % 2 == 0 ? 0 : (i * 31) % k);
  }
  std::vector<float> counts(static_cast<size_t>(k));
  std::vector<float> sums(static_cast<size_t>(k * d));
  auto ws = workspace(vq_cluster_stats_workspace_bytes(n, k, d));
  check(vq_cluster_stats(x.data(), d, idx.data(), n, k, d, dtype, aligned(ws), counts.data(),
                         sums.data(), nullptr),
        "cluster_stats", n, k, d);

  std::vector<float> codebook(static_cast<size_t>(k * d), 0.5f);
  std::vector<float> cluster_size(static_cast<size_t>(k), 1.0f);
  std::vector<float> embed_sum(static_cast<size_t>(k * d), 0.5f);
  auto we = workspace(vq_ema_update_workspace_bytes(n, k, d));
  check(vq_ema_update(codebook.data(), cluster_size.data(), embed_sum.data(), x.data(), d,
                      idx.data(), n, k, d, dtype, 0.9, 1e-5, aligned(we), nullptr),
        "ema_update", n, k, d);
}

}  // namespace

int main(int argc, char** argv) {
  // Default: a few cases that cover every kernel and sync pattern once (about a minute under
  // the thread sanitizer); "--all": every shape x dtype x metric x split (about half an hour).
  const bool all = argc > 1 && std::strcmp(argv[1], "--all") == 0;
  struct Case {
    int64_t n, k, d;
    vq_dtype dtype;
    vq_metric metric;
    int sms;
  };
  std::vector<Case> cases;
  if (all) {
    // Tile edges of search.cu (row/code tiles, the D step), one row with a K split across
    // blocks, and D = 200 (several D steps, rows not a multiple of the vector width).
    const int64_t shapes[][3] = {{1, 1, 1}, {37, 16, 3}, {2, 300, 16}, {130, 129, 35}, {9, 70, 200}};
    for (const auto& s : shapes)
      for (vq_dtype dt : {VQ_FLOAT32, VQ_BFLOAT16, VQ_FLOAT16})
        for (vq_metric m : {VQ_METRIC_L2, VQ_METRIC_COSINE})
          for (int sms : {1, 132}) cases.push_back({s[0], s[1], s[2], dt, m, sms});
  } else {
    cases = {{37, 16, 3, VQ_FLOAT32, VQ_METRIC_L2, 1},
             {37, 16, 3, VQ_BFLOAT16, VQ_METRIC_COSINE, 132},
             {130, 129, 35, VQ_FLOAT16, VQ_METRIC_L2, 132},  // 2 row blocks x K split x 3 D steps
             {9, 70, 200, VQ_FLOAT32, VQ_METRIC_COSINE, 1}};
  }
  for (const Case& c : cases) {
    const auto t0 = std::chrono::steady_clock::now();
    run_search_and_quantize(c.n, c.k, c.d, c.dtype, c.metric, c.sms);
    const std::chrono::duration<double> secs = std::chrono::steady_clock::now() - t0;
    std::printf("search+quantize N=%lld K=%lld D=%lld dtype=%d metric=%d sms=%d: %.1f s\n",
                static_cast<long long>(c.n), static_cast<long long>(c.k),
                static_cast<long long>(c.d), static_cast<int>(c.dtype),
                static_cast<int>(c.metric), c.sms, secs.count());
    std::fflush(stdout);
  }
  // Segmented sums: empty input, code 0's segment spanning several chunks, D over one block.
  const int64_t ema_shapes[][3] = {{0, 3, 4}, {300, 9, 40}, {70, 5, 300}};
  for (const auto& s : ema_shapes) {
    for (vq_dtype dt : {VQ_FLOAT32, VQ_BFLOAT16, VQ_FLOAT16}) {
      if (!all && dt != VQ_FLOAT32 && s[0] != 300) continue;
      const auto t0 = std::chrono::steady_clock::now();
      run_ema(s[0], s[1], s[2], dt);
      const std::chrono::duration<double> secs = std::chrono::steady_clock::now() - t0;
      std::printf("cluster_stats+ema_update N=%lld K=%lld D=%lld dtype=%d: %.1f s\n",
                  static_cast<long long>(s[0]), static_cast<long long>(s[1]),
                  static_cast<long long>(s[2]), static_cast<int>(dt), secs.count());
      std::fflush(stdout);
    }
  }
  std::printf("emu_race_driver: done, %d failure(s)\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
