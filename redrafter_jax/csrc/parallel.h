// What the CPU kernels share: running the tasks of one call on XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace redrafter {

// Runs fn(i, after) for every i in [0, n) on the calling thread and tasks on XLA's intra-op pool.
// Each thread claims its indices from a shared counter one ahead, so fn also learns the index it
// will run next (`after`, n if none: the matmul prefetches that tile). The caller returns once all
// are done; tasks that start late find none left.
struct Work {
  std::atomic<int64_t> next{0}, done{0};
};

template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, Fn fn) {
  auto work = std::make_shared<Work>();
  auto run = [=]() {
    for (int64_t i = work->next.fetch_add(1); i < n;) {
      const int64_t after = std::min(work->next.fetch_add(1), n);
      fn(i, after);
      work->done.fetch_add(1, std::memory_order_release);
      i = after;
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run] { run(); });
  run();
  while (work->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace redrafter
