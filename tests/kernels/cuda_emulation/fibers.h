// Runs a CUDA kernel's threads on the CPU: every thread of a block is a fiber (ucontext), and
// __syncthreads switches back to a scheduler, which resumes the threads in a chosen order
// (forward, reverse, shuffled, or alternating forward and reverse) once all of them have arrived.
// A result that depends on that order is a race between a block's threads; a thread that exits
// while others wait, or threads waiting at different barriers, is barrier divergence (raised).
// Blocks run one after the other, in the order the threads do (forward or reversed, shuffled).
// Shared memory is filled with NaN bytes before each block, so a read of an unwritten value shows.
//
// The test of the test: drop_barrier(k) makes the k-th distinct __syncthreads line (in order of
// first arrival, counted per launch) return at once, as if that line were deleted.
//
// Included after nothing CUDA-specific: it defines the built-ins the kernel headers read
// (csrc/cuda/kernel_macros.h, GSPN_CUDA_EMULATION).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

struct GspnDim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The CUDA built-ins, set by the scheduler before it resumes a thread.
inline GspnDim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim, gridDim;
inline unsigned char* gspn_emulated_smem = nullptr;

namespace fibers {

enum class Order : int { forward = 0, reverse = 1, shuffled = 2, alternating = 3 };

class Scheduler {
 public:
  static Scheduler& get() {
    static Scheduler instance;
    return instance;
  }

  // Runs kernel(args...) on a grid of blocks of `block` threads with `smem_bytes` of shared memory.
  template <typename Kernel, typename... Args>
  void launch(GspnDim3 grid, GspnDim3 block, size_t smem_bytes, Order order, uint64_t seed, Kernel kernel,
              Args... args) {
    sites_.clear();
    body_ = [&]() { kernel(args...); };
    const int blocks = static_cast<int>(grid.x * grid.y * grid.z);
    std::vector<int> block_order = ordering(blocks, order, seed, 0);
    std::vector<unsigned char> smem(smem_bytes + 16);
    gridDim = grid;
    blockDim = block;
    for (int b : block_order) {
      std::fill(smem.begin(), smem.end(), 0xFF);  // NaN in float and double
      gspn_emulated_smem = smem.data();
      blockIdx = GspnDim3{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
      run_block(static_cast<int>(block.x * block.y * block.z), order, seed + 7919u * b);
    }
    gspn_emulated_smem = nullptr;
  }

  void drop_barrier(int site) { drop_site_ = site; }
  // Distinct __syncthreads call sites reached during the last launch.
  int barrier_sites() const { return static_cast<int>(sites_.size()); }

  void sync_threads(const char* file, int line) {
    const std::pair<const char*, int> site{file, line};
    int id = static_cast<int>(std::find(sites_.begin(), sites_.end(), site) - sites_.begin());
    if (id == static_cast<int>(sites_.size())) sites_.push_back(site);
    if (id == drop_site_) return;
    waiting_at_[current_] = id;
    state_[current_] = kAtBarrier;
    switch_to_scheduler(false);
  }

 private:
  enum State { kReady, kAtBarrier, kDone };
  static constexpr size_t kStackBytes = 256 * 1024;

  static std::vector<int> ordering(int n, Order order, uint64_t seed, int phase) {
    std::vector<int> v(n);
    std::iota(v.begin(), v.end(), 0);
    const bool reversed = order == Order::reverse || (order == Order::alternating && phase % 2 == 1);
    if (reversed) std::reverse(v.begin(), v.end());
    if (order == Order::shuffled) {
      std::mt19937_64 rng(seed * 1000003u + phase);
      std::shuffle(v.begin(), v.end(), rng);
    }
    return v;
  }

  static void trampoline() {
    Scheduler& s = get();
    s.finish_switch_into_fiber();
    s.body_();
    s.state_[s.current_] = kDone;
    s.switch_to_scheduler(true);
  }

  void run_block(int n, Order order, uint64_t seed) {
    if (static_cast<int>(stacks_.size()) < n) stacks_.resize(n);
    contexts_.assign(n, ucontext_t{});
    state_.assign(n, kReady);
    waiting_at_.assign(n, -1);
    for (int t = 0; t < n; ++t) {
      if (stacks_[t].empty()) stacks_[t].resize(kStackBytes);
      getcontext(&contexts_[t]);
      contexts_[t].uc_stack.ss_sp = stacks_[t].data();
      contexts_[t].uc_stack.ss_size = stacks_[t].size();
      contexts_[t].uc_link = &scheduler_;
      makecontext(&contexts_[t], &Scheduler::trampoline, 0);
    }
    for (int phase = 0;; ++phase) {
      for (int t : ordering(n, order, seed, phase)) {
        if (state_[t] != kReady) continue;
        current_ = t;
        threadIdx = GspnDim3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
#if defined(__SANITIZE_ADDRESS__)
        __sanitizer_start_switch_fiber(&fake_stack_, stacks_[t].data(), stacks_[t].size());
#endif
        swapcontext(&scheduler_, &contexts_[t]);
#if defined(__SANITIZE_ADDRESS__)
        __sanitizer_finish_switch_fiber(fake_stack_, nullptr, nullptr);
#endif
      }
      int waiting = 0, done = 0;
      int site = -1;
      bool same_site = true;
      for (int t = 0; t < n; ++t) {
        if (state_[t] == kDone) {
          ++done;
        } else {
          if (waiting++ == 0) site = waiting_at_[t];
          same_site = same_site && waiting_at_[t] == site;
        }
      }
      if (waiting == 0) return;
      if (done > 0) {
        throw std::runtime_error("barrier divergence: " + std::to_string(done) + " threads of block " +
                                 std::to_string(blockIdx.x) + " exited while " + std::to_string(waiting) +
                                 " wait at a __syncthreads");
      }
      if (!same_site) {
        throw std::runtime_error("barrier divergence: the threads of block " + std::to_string(blockIdx.x) +
                                 " wait at different __syncthreads (line " + std::to_string(sites_[site].second) +
                                 " and another)");
      }
      std::fill(state_.begin(), state_.end(), kReady);
    }
  }

  void switch_to_scheduler(bool exiting) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(exiting ? nullptr : &fiber_fake_stack_, scheduler_stack_bottom_,
                                   scheduler_stack_size_);
#endif
    if (exiting) {
      setcontext(&scheduler_);
    } else {
      swapcontext(&contexts_[current_], &scheduler_);
      finish_switch_into_fiber();
    }
  }

  void finish_switch_into_fiber() {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fiber_fake_stack_, &scheduler_stack_bottom_, &scheduler_stack_size_);
#endif
  }

  std::function<void()> body_;
  ucontext_t scheduler_{};
  std::vector<ucontext_t> contexts_;
  std::vector<std::vector<char>> stacks_;
  std::vector<State> state_;
  std::vector<int> waiting_at_;     // the barrier site each thread waits at
  std::vector<std::pair<const char*, int>> sites_;  // file and line of each barrier reached in this launch
  int current_ = 0;
  int drop_site_ = -1;
  void* fake_stack_ = nullptr;
  void* fiber_fake_stack_ = nullptr;
  const void* scheduler_stack_bottom_ = nullptr;
  size_t scheduler_stack_size_ = 0;
};

}  // namespace fibers

// A macro, so that a barrier is named by its source line even where the compiler duplicates code.
#define __syncthreads() ::fibers::Scheduler::get().sync_threads(__FILE__, __LINE__)
