// Row-parallel loops for the decode kernels on the calling thread's OpenMP team.
//
// Raw OpenMP rather than at::parallel_for: that template's inline thread-count set-up runs once
// per thread in each library that inlines it, and in this one it resets the calling thread's
// intra-op thread count to the process-wide last one set (a worker's engine thread with 2 threads
// fell to the main thread's 1, and every prefill after the first kernel call ran on one core).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace speechchat {

// f(begin, end) over [0, n) in chunks of at least `grain`, one per thread of the calling
// thread's team size (its omp_get_max_threads, which torch.set_num_threads sets)
template <typename F>
void parallel_rows(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
#ifdef _OPENMP
  if (n > grain && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel
    {
      const int64_t threads = omp_get_num_threads();
      const int64_t chunk = std::max(grain, (n + threads - 1) / threads);
      const int64_t begin = omp_get_thread_num() * chunk;
      if (begin < n) f(begin, std::min(n, begin + chunk));
    }
    return;
  }
#endif
  f(0, n);
}

}  // namespace speechchat
