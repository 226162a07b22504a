// ================================================================================================
// Host emulation of the CUDA subset used by csrc/cuda/*.cu -- for tests on machines without a
// GPU only; never part of the extension (setup.py compiles *.cu and *.cpp, not this header).
//
// tests/test_cuda.py (test_emulated_*) copies each .cu, rewrites `k<<<grid, block, smem,
// stream>>>(args)` into `vqk_emu::launch(grid, block, smem, stream, k, args)`, cudaGetLastError /
// cudaMemsetAsync into the functions below and drops the CUB include, prepends this header and
// compiles the result with the host C++ compiler into a shared library whose extern "C" launchers
// it drives through ctypes on CPU tensors.  So the kernels' own index arithmetic, workspace
// carving, tiling, split merging, sorting/segment logic and rounding steps run for real.
// test_emulated_kernels_have_no_data_races links the same sources with tests/emu_race_driver.cpp
// under -fsanitize=thread: a missing __syncthreads shows up as a data race between the OS threads
// that stand for one block's CUDA threads (what compute-sanitizer's racecheck reports on a GPU).
//
// Model: blocks run one after another; each block runs blockDim.x OS threads (1-D blocks, a
// multiple of 32), so __shared__ (here: function-static) storage is per block as on a GPU.  The
// threads come from a pool that lives as long as the process (creating hundreds of threads per
// block dominated the run time, tenfold so under a thread sanitizer).
// __syncthreads is a block barrier, __shfl_xor_sync exchanges through a per-warp buffer between
// two warp barriers; a thread that returns leaves both barriers (as exited GPU threads do).
// fp32 intrinsics map to correctly rounded host operations (compile with -ffp-contract=off).
// CUB's radix sort becomes a stable sort by key (a radix sort is stable; same result).
// ================================================================================================
#pragma once

// The CUDA headers first: their include guards then keep them from redefining the macros below.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace vqk_emu {

inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<std::array<uint64_t, 32>> warp_buffers;

inline cudaError_t get_last_error() { return cudaSuccess; }

inline cudaError_t memset_async(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}

// Worker threads kept for the life of the process.  run(n, body) calls body(0) ... body(n - 1),
// each on its own worker (they must all be alive at once: the block's threads meet at barriers),
// and returns when every call has returned.  The mutex/condition-variable hand-offs order each
// block's memory accesses after the previous block's, as the end of a grid does on a GPU.
class Pool {
 public:
  void run(unsigned n, const std::function<void(unsigned)>& body) {
    std::unique_lock<std::mutex> lk(mu_);
    while (workers_.size() < n) {
      const unsigned id = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, id, seen = generation_] { loop(id, seen); });
    }
    body_ = &body;
    active_ = n;
    remaining_ = n;
    ++generation_;
    wake_.notify_all();
    done_.wait(lk, [this] { return remaining_ == 0; });
    body_ = nullptr;
  }

 private:
  void loop(unsigned id, uint64_t seen) {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      wake_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;  // not needed by this block
      const auto* body = body_;
      lk.unlock();
      (*body)(id);
      lk.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* body_ = nullptr;
  uint64_t generation_ = 0;
  unsigned active_ = 0, remaining_ = 0;
};

// Never destroyed: the workers wait on the condition variable until the process exits (joining
// them from a static destructor of a dlopen()ed library can deadlock at interpreter exit).
inline Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

inline std::mutex launch_mutex;  // one emulated launch at a time (globals below are per launch)

template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/,
            void (*kernel)(KArgs...), Args&&... args) {
  const unsigned nthreads = block.x;
  if (block.y != 1 || block.z != 1 || nthreads == 0 || nthreads % 32 != 0 || nthreads > 1024)
    std::abort();  // the kernels use 1-D blocks of whole warps
  std::lock_guard<std::mutex> guard(launch_mutex);
  blockDim = block;
  gridDim = grid;
  const unsigned nwarps = nthreads / 32;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_barrier = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(nthreads));
        warp_barriers.clear();
        for (unsigned w = 0; w < nwarps; ++w)
          warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        warp_buffers.assign(nwarps, {});
        pool().run(nthreads, [&](unsigned t) {
          blockIdx = uint3{bx, by, bz};
          threadIdx = uint3{t, 0, 0};
          kernel(args...);
          warp_barriers[t / 32]->arrive_and_drop();
          block_barrier->arrive_and_drop();
        });
      }
}

}  // namespace vqk_emu

inline void __syncthreads() { vqk_emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "one 8-byte slot per lane");
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  std::memcpy(&vqk_emu::warp_buffers[w][lane], &v, sizeof(T));
  vqk_emu::warp_barriers[w]->arrive_and_wait();
  T out;
  std::memcpy(&out, &vqk_emu::warp_buffers[w][lane ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  vqk_emu::warp_barriers[w]->arrive_and_wait();
  return out;
}

inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline int min(int a, int b) { return a < b ? a : b; }

namespace cub {
struct DeviceRadixSort {
  template <typename K, typename V, typename N>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out,
                               const V* values_in, V* values_out, N num_items, int begin_bit = 0,
                               int end_bit = sizeof(K) * 8, cudaStream_t = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 16;
      return cudaSuccess;
    }
    const K mask = end_bit >= static_cast<int>(sizeof(K) * 8)
                       ? static_cast<K>(~K(0))
                       : static_cast<K>((K(1) << end_bit) - 1);
    std::vector<int64_t> order(static_cast<size_t>(num_items));
    std::iota(order.begin(), order.end(), int64_t(0));
    auto key = [&](int64_t i) { return static_cast<K>((keys_in[i] & mask) >> begin_bit); };
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return key(a) < key(b); });
    for (size_t i = 0; i < order.size(); ++i) {
      keys_out[i] = keys_in[order[i]];
      values_out[i] = values_in[order[i]];
    }
    return cudaSuccess;
  }
};
}  // namespace cub
