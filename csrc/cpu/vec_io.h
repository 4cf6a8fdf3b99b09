// Loads and stores between any kernel dtype and the fp32/fp64 Vectorized registers the math runs
// in. Half types are widened to float on load and rounded once on store.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/OpMathType.h>

#include "pyseqk/cell_math.h"

namespace pyseqk {
namespace math {

template <class T>
struct Act<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static inline V sigmoid(V x) { return V(T(1)) / (V(T(1)) + x.neg().exp()); }
  // tanh(x) = 1 - 2 / (exp(2x) + 1): one exp and one division, about half the cost of Sleef's
  // tanh; the absolute error stays at the fp32 rounding of 1 (~6e-8). Saturates without NaN.
  static inline V tanh(V x) {
    return V(T(1)) - V(T(2)) / ((x + x).exp() + V(T(1)));
  }
  static inline V relu(V x) { return at::vec::clamp_min(x, V(T(0))); }
  static inline V relu_grad(V y, V g) { return V::blendv(V(T(0)), g, y > V(T(0))); }
};

}  // namespace math

namespace cpu {

template <class T>
using OpVec = at::vec::Vectorized<at::opmath_type<T>>;

template <class T>
constexpr int64_t kLanes = OpVec<T>::size();

// Load n <= kLanes<T> elements (the rest zero) widened to the math type.
template <class T>
inline OpVec<T> vload(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    return OpVec<T>::loadu(p, n);
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n));
    (void)hi;
    return lo;
  }
}

template <class T>
inline void vstore(T* p, OpVec<T> v, int64_t n) {
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

// Sum of the two optional bias vectors at [k, k+n), or zero.
template <class T>
inline OpVec<T> vbias(const T* b_ih, const T* b_hh, int64_t k, int64_t n) {
  OpVec<T> s(0);
  if (b_ih) s = s + vload(b_ih + k, n);
  if (b_hh) s = s + vload(b_hh + k, n);
  return s;
}

// Runs fn(b, j, n) over every row b < B and lane group [j, j+n) of the elements [u0, u1) of a row
// (default: all H), the two cores splitting the rows (or, for small batches, the lane groups).
// u0 must be a multiple of the lane count (the layers' thread team passes multiples of 16).
template <class T, class Fn>
inline void for_each_lane_group(int64_t B, int64_t H, const Fn& fn, int64_t u0 = 0,
                                int64_t u1 = -1) {
  const int64_t L = kLanes<T>;
  const int64_t end = u1 < 0 ? H : u1;
  const int64_t groups = (end - u0 + L - 1) / L;
  const int64_t total = B * groups;
  // ~256 lane groups (2k elements, ~10 us of gate math) per task: smaller cells stay on one
  // thread, where the fork (a few microseconds) would cost more than it saves.
  at::parallel_for(0, total, 256, [&](int64_t begin, int64_t stop) {
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t b = t / groups;
      const int64_t j = u0 + (t - b * groups) * L;
      fn(b, j, std::min(L, end - j));
    }
  });
}

}  // namespace cpu
}  // namespace pyseqk
