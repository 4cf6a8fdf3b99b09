// The barrier of the layers' thread teams (csrc/ops/layers.cpp, csrc/cpu/fused_layer.cpp), in
// place of libgomp's `omp barrier` (T = 200, B = 1, H = 128 LSTM: the loop 427 -> 395 us, 0.16 us
// a step). Sense-reversing on a generation counter; a waiter spins with pause, then yields (an
// oversubscribed machine): spin_until, which the step flags of csrc/cpu/fused_small.cpp use too.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <atomic>
#include <thread>

namespace pyseqk {
namespace cpu {

// Returns once done() is true: pause while spinning, then yield to the OS.
template <class Done>
inline void spin_until(const Done& done) {
  constexpr int kSpins = 2000;
  for (int spins = 0; !done(); ++spins) {
    if (spins < kSpins) {
#if defined(__x86_64__) || defined(__i386__)
      _mm_pause();
#else
      std::this_thread::yield();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

class SpinBarrier {
 public:
  void wait(int n) { await(arrive(n)); }

  // The two halves of wait, for work that needs no other thread's results in between (a split
  // barrier): arrive returns a token for await, which returns once all n threads have arrived.
  // Each thread alternates arrive and await.
  unsigned arrive(int n) {
    const unsigned gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
    }
    return gen;
  }
  void await(unsigned gen) {
    spin_until([&] { return gen_.load(std::memory_order_acquire) != gen; });
  }

 private:
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<unsigned> gen_{0};
};

}  // namespace cpu
}  // namespace pyseqk
