// Positional encoding fused with its add and dropout on the CPU. Work is split by position t:
// each task computes the encoding row pe[t, :] once (Sleef sin and cos, at::vec, one of each
// per feature pair) and adds it to every row at that position (B rows for [T, B, D], one per
// batch for [B, T, D]), so the transcendentals cost D per position, not per element. The dropout
// mask is hashed per element (integer ops the compiler vectorizes) into a multiplier row:
// keep ? 1/(1-p) : 0.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu/vec_io.h"
#include "pyseqk/posenc.h"

namespace pyseqk {
namespace cpu {
namespace {

template <class F>
void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(c10::Half{});
    case DType::kBFloat16: return f(c10::BFloat16{});
  }
}

// About 32k elements per task: below that the fork costs more than the work.
constexpr int64_t kGrainElements = 1 << 15;
// Elements per hashed multiplier chunk (a stack buffer: no allocation in the loops).
constexpr int64_t kChunk = 1024;

// mult[k] = keep(idx0 + k) ? scale : 0, k < n.
template <class M>
inline void dropout_multipliers(M* mult, uint64_t idx0, int64_t n, uint32_t seed,
                                uint32_t threshold, M scale) {
  for (int64_t k = 0; k < n; ++k) {
    mult[k] = posenc::keep(seed, idx0 + static_cast<uint64_t>(k), threshold) ? scale : M(0);
  }
}

// pe[d] for d < D at position t: the pair (2i, 2i+1) shares the angle t w_i, so sin and cos
// are evaluated once per pair (D/2 angles, not D) and interleaved; an odd D ends on a sine.
// freq [ceil(D/2)]: w_i per pair.
template <class M>
void encoding_row(M* pe, const M* freq, int64_t t, int64_t D) {
  using V = at::vec::Vectorized<M>;
  constexpr int64_t L = V::size();
  const int64_t pairs = (D + 1) / 2;
  const V tv(static_cast<M>(t));
  for (int64_t i = 0; i < pairs; i += L) {
    const V angle = tv * V::loadu(freq + i, std::min(L, pairs - i));
    const auto [lo, hi] = at::vec::interleave2(angle.sin(), angle.cos());
    const int64_t d = 2 * i;  // lo covers [d, d+L), hi [d+L, d+2L)
    lo.store(pe + d, std::min(L, D - d));
    if (D - d > L) hi.store(pe + d + L, std::min(L, D - d - L));
  }
}

template <class T>
void forward(const T* x, T* out, int64_t N, int64_t T_, int64_t R, int64_t D, double p,
             uint32_t seed) {
  using M = at::opmath_type<T>;
  using V = OpVec<T>;
  constexpr int64_t L = kLanes<T>;
  std::vector<M> freq((D + 1) / 2);
  for (int64_t i = 0; i < (D + 1) / 2; ++i) freq[i] = static_cast<M>(posenc::frequency(2 * i, D));
  const int64_t outer = N / (T_ * R * D);
  const bool drop = p > 0.0;
  const uint32_t threshold = dropout::threshold(p);
  const M scale = static_cast<M>(posenc::keep_scale(p));
  const int64_t per_t = outer * R * D;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_t, 1));
  at::parallel_for(0, T_, grain, [&](int64_t t0, int64_t t1) {
    std::vector<M> pe(D);
    M mult[kChunk];
    for (int64_t t = t0; t < t1; ++t) {
      encoding_row(pe.data(), freq.data(), t, D);
      for (int64_t o = 0; o < outer; ++o) {
        for (int64_t k = 0; k < R; ++k) {
          const int64_t base = ((o * T_ + t) * R + k) * D;
          for (int64_t c = 0; c < D; c += kChunk) {
            const int64_t cn = std::min(kChunk, D - c);
            if (drop) dropout_multipliers(mult, static_cast<uint64_t>(base + c), cn, seed, threshold, scale);
            for (int64_t j = 0; j < cn; j += L) {
              const int64_t n = std::min(L, cn - j);
              V v = vload(x + base + c + j, n) + V::loadu(pe.data() + c + j, n);
              if (drop) v = v * V::loadu(mult + j, n);
              vstore(out + base + c + j, v, n);
            }
          }
        }
      }
    }
  });
}

template <class T>
void backward(const T* grad, T* grad_x, int64_t N, double p, uint32_t seed) {
  using M = at::opmath_type<T>;
  using V = OpVec<T>;
  constexpr int64_t L = kLanes<T>;
  const uint32_t threshold = dropout::threshold(p);
  const M scale = static_cast<M>(posenc::keep_scale(p));
  const bool drop = p > 0.0;
  at::parallel_for(0, N, kGrainElements, [&](int64_t i0, int64_t i1) {
    M mult[kChunk];
    for (int64_t c = i0; c < i1; c += kChunk) {
      const int64_t cn = std::min(kChunk, i1 - c);
      if (drop) dropout_multipliers(mult, static_cast<uint64_t>(c), cn, seed, threshold, scale);
      for (int64_t j = 0; j < cn; j += L) {
        const int64_t n = std::min(L, cn - j);
        V v = vload(grad + c + j, n);
        if (drop) v = v * V::loadu(mult + j, n);
        vstore(grad_x + c + j, v, n);
      }
    }
  });
}

}  // namespace

void positional_encoding_forward(DType dtype, const void* x, void* out, int64_t N, int64_t T,
                                 int64_t R, int64_t D, double p, uint32_t seed) {
  if (N == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    forward(static_cast<const S*>(x), static_cast<S*>(out), N, T, R, D, p, seed);
  });
}

void positional_encoding_backward(DType dtype, const void* grad, void* grad_x, int64_t N,
                                  double p, uint32_t seed) {
  if (N == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    backward(static_cast<const S*>(grad), static_cast<S*>(grad_x), N, p, seed);
  });
}

}  // namespace cpu
}  // namespace pyseqk
