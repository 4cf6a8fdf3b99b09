// Loads and stores between any kernel dtype and the fp32/fp64 Vectorized registers the math runs
// in. Half types are widened to float on load and rounded once on store.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/OpMathType.h>

#include <type_traits>

#include "pyseqk/cell_math.h"

namespace pyseqk {
namespace math {

#if defined(CPU_CAPABILITY_AVX512)
// The gate activations' exp and reciprocal for 16 fp32 lanes, cheaper than at::vec's: Sleef's
// exp (u10) and vdivps were most of the gate kernels' time (the LSTM layer's at B = 32, H = 256:
// 2.0 ms of a 15 ms call; bench/NOTES.md, "Gate math: exp and reciprocal").
// exp: n = round(x log2 e), r = x - n ln 2 in two parts (Cody-Waite), e^r by its degree-7 Taylor
// polynomial (|r| <= ln2/2: truncation 5e-9 relative, below fp32's 6e-8), times 2^n by scalef.
// x is clamped to [-87, 88] first (e^x stays a normal float; with the constant as the first
// operand of min/max, NaN passes through).
inline __m512 exp_f32x16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.f), _mm512_min_ps(_mm512_set1_ps(88.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
// 2^x for the attention softmax, whose arguments are s - max <= 0 (in log2 units): n = round(x),
// f = x - n in [-1/2, 1/2] exactly (no Cody-Waite split), 2^f by a degree-5 polynomial (least
// squares on Chebyshev nodes, reweighted towards equal ripple: 7.5e-8 relative, 2.3e-7 as
// evaluated in fp32, against exp_u20's ~2.4e-6), times 2^n by scalef. 10 vector operations where
// at::vec's exp_u20 takes ~25 (bench/NOTES.md, "SDPA: a forward of our own").
// x < -125 (-inf included) gives exactly 0: never a denormal, which would cost a microcode assist
// here and in every FMA that reads it (a first version let 2^-150 round up to one: causal
// attention ran 3x slower). NaN stays NaN (the constant is max's first operand, and the compare
// is unordered-true).
inline __m512 exp2_softmax_f32x16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-126.f), x);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.32764654699713e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675540961325169e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713464617729e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}
// 1/d: the 14-bit estimate and one Newton step (~2^-28 relative), instead of a division.
inline __m512 rcp_f32x16(__m512 d) {
  const __m512 y = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.f)));
}
#endif

template <class T>
struct Act<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kFast = std::is_same_v<T, float>;
#else
  static constexpr bool kFast = false;
#endif
  static inline V sigmoid(V x) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kFast) {
      const __m512 e = math::exp_f32x16(_mm512_sub_ps(_mm512_setzero_ps(), x));
      const __m512 s = rcp_f32x16(_mm512_add_ps(_mm512_set1_ps(1.f), e));
      // Below -88 (e clamped at e^88) 0, as torch's sigmoid(-inf): a 6e-39 there would turn
      // torch's 0 * inf = NaN downstream (GRU: r * hn, z * h) into an infinity.
      return _mm512_maskz_mov_ps(
          ~_mm512_cmp_ps_mask(x, _mm512_set1_ps(-88.f), _CMP_LT_OQ), s);
    }
#endif
    return V(T(1)) / (V(T(1)) + x.neg().exp());
  }
  // tanh(x) = 1 - 2 / (exp(2x) + 1): one exp and one division, about half the cost of Sleef's
  // tanh; the absolute error stays at the fp32 rounding of 1 (~6e-8). Saturates without NaN.
  static inline V tanh(V x) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kFast) {
      // (e - 1) / (e + 1), e = exp(2x): absolute error ~6e-8 near 0 too (e - 1 is exact there).
      // |x| <= 10 first: tanh(10) rounds to 1, and e + 1 stays far from overflow.
      const __m512 xc =
          _mm512_max_ps(_mm512_set1_ps(-10.f), _mm512_min_ps(_mm512_set1_ps(10.f), x));
      const __m512 e = math::exp_f32x16(_mm512_add_ps(xc, xc));
      const __m512 one = _mm512_set1_ps(1.f);
      return _mm512_mul_ps(_mm512_sub_ps(e, one), rcp_f32x16(_mm512_add_ps(e, one)));
    }
#endif
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
