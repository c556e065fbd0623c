// One parallel region per kernel call (the backward with layernorm or deep gates: one per chunk of
// steps), with a barrier between the phases of every step.
//
// The region is an OpenMP team (torch's own libgomp: the extension links the same soname,
// so no second thread pool exists). The per-step barrier is ours: it spins for at most
// kSpinNs, then sleeps in the kernel (futex) until released. On a quiet machine a phase
// ends within the spin and costs no system call; on a busy one (more runnable threads
// than cores) a thread whose partner was descheduled gives its core back instead of
// spinning for a whole time slice — libgomp's `omp barrier` spins for ~300,000 rounds
// first, which made a loaded 2-core machine 8x slower with two threads than with one.
//
// The thread count comes from at::get_num_threads() at call time (a DataLoader worker sets
// 1) and is capped by the work per step; with one thread no OpenMP region is entered at all,
// so a forked child never touches the parent's thread pool.
#pragma once
#include <ATen/Parallel.h>
#include <linux/futex.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lk {

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

constexpr int64_t kSpinNs = 20000;  // spin at most 20 us at a barrier before sleeping

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void set_size(int n) { n_ = n; }
  int size() const { return n_; }

  // All n threads call wait(); none returns before the last has arrived.
  void wait() {
    if (n_ <= 1) return;
    const uint32_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == (uint32_t)n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) {
        syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
      }
      return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (uint32_t i = 1; gen_.load(std::memory_order_acquire) == gen; ++i) {
      if ((i & 63) == 0 && std::chrono::steady_clock::now() - t0 > std::chrono::nanoseconds(kSpinNs)) {
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        // FUTEX_WAIT returns at once if gen_ has already moved on: no lost wake-up.
        while (gen_.load(std::memory_order_seq_cst) == gen) {
          syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, gen, nullptr, nullptr, 0);
        }
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        return;
      }
      cpu_relax();
    }
  }

 private:
  int n_;
  alignas(64) std::atomic<uint32_t> count_{0};
  alignas(64) std::atomic<uint32_t> gen_{0};
  alignas(64) std::atomic<int> sleepers_{0};
};

// Threads for a call: torch's current setting, 1 below `min_work` FMAs per step per thread
// (a barrier then costs more than the work it splits), at most 64 per row of work (the GEMMs split
// a row's panels too).
inline int choose_threads(int64_t work_per_step, int64_t rows, int64_t min_work = int64_t(1) << 14) {
  int nt = std::max(1, at::get_num_threads());
  nt = (int)std::min<int64_t>(nt, std::max<int64_t>(1, work_per_step / min_work));
  return (int)std::max<int64_t>(1, std::min<int64_t>(nt, std::max<int64_t>(rows, 1) * 64));
}

// Whether OpenMP gives a parallel region every thread torch asks for: not under OMP_DYNAMIC (or
// omp_set_dynamic) nor an OMP_THREAD_LIMIT below torch's thread count. torch's oneDNN linear
// computes wrong products (0.99 relative, measured) when its team is smaller than it planned
// (fused.py's _use_onednn asks this); this file's regions take the team they get.
inline bool full_teams() { return !omp_get_dynamic() && omp_get_thread_limit() >= at::get_num_threads(); }

// Run body(tid, nth, barrier) on nthreads threads (fewer if OpenMP gives fewer).
template <typename F>
void parallel_region(int nthreads, F&& body) {
  Barrier bar(1);
  if (nthreads <= 1) {
    body(0, 1, bar);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp single
    bar.set_size(omp_get_num_threads());  // implicit barrier: every thread sees the size
    body(omp_get_thread_num(), bar.size(), bar);
  }
}

}  // namespace lk
