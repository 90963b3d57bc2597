// Spreading a kernel's work items over XLA's intra-op thread pool (shared by the C++ CPU kernels,
// pallas_kernels/*/cpu_kernel.cc; cpu_build.py puts this folder on the include path and hashes its
// headers into the build cache key).

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxinfer_cpu {

// Items 0 .. n - 1, pulled from a shared counter by whoever drains the queue.
struct WorkQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  std::function<void(int64_t)> run;
  std::mutex mu;
  std::condition_variable cv;

  void Drain() {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      run(i);
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// Runs run(0) .. run(n - 1) on the calling thread and on up to `helpers` pool tasks (never more than
// n - 1), and returns once every item has finished. A task that starts after the last item was taken
// finds none left and touches nothing but the queue it owns a reference to, so `run` may refer to the
// caller's stack.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t helpers, std::function<void(int64_t)> run) {
  if (n <= 0) return;
  auto queue = std::make_shared<WorkQueue>();
  queue->n = n;
  queue->run = std::move(run);
  helpers = std::min<int64_t>(helpers, n - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([queue] { queue->Drain(); });
  }
  queue->Drain();
  std::unique_lock<std::mutex> lock(queue->mu);
  queue->cv.wait(lock, [&] { return queue->done.load() == queue->n; });
}

}  // namespace jaxinfer_cpu
