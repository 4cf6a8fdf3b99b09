// Fused seq2seq attention on the CPU (Luong dot, Bahdanau additive): scores, masked softmax and
// weighted sum of the values in one pass per (batch, tile of query rows), at::vec over the
// feature dimension and at::parallel_for over the tiles.
//
// Scores are computed a register tile at a time: NR query rows x NC key rows share every load of
// the other side. Decoder steps (Tq < 4) use a 1 x 4 tile (four keys per query load) instead of
// the 4 x 1 tile of whole sequences, so a single query row wastes nothing.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/vec_io.h"
#include "pyseqk/seq2seq_kernels.h"

namespace pyseqk {
namespace cpu {
namespace {

template <class F>
void dispatch(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(c10::Half{});
    case DType::kBFloat16: return f(c10::BFloat16{});
  }
}

template <class T>
using Acc = at::opmath_type<T>;

template <class T>
inline Acc<T> hsum(OpVec<T> v) {
  return at::vec::vec_reduce_all<Acc<T>>([](OpVec<T> a, OpVec<T> b) { return a + b; }, v);
}

// tanh for the Bahdanau scores, where it is nearly all the work. fp32: Eigen's rational
// approximation (odd degree-13 numerator over even degree-6 denominator, clamped where tanh
// rounds to +-1): 11 multiply-adds and one division, no exp, a few ulp from tanh. fp64: the
// exp-based tanh of vec_io.h.
template <class V>
inline V score_tanh(V x) {
  return math::Act<V>::tanh(x);
}

inline at::vec::Vectorized<float> score_tanh(at::vec::Vectorized<float> x) {
  using V = at::vec::Vectorized<float>;
  using at::vec::fmadd;
  x = at::vec::clamp(x, V(-7.90531110763549805f), V(7.90531110763549805f));
  const V x2 = x * x;
  V p = fmadd(x2, V(-2.76076847742355e-16f), V(2.00018790482477e-13f));
  p = fmadd(x2, p, V(-8.60467152213735e-11f));
  p = fmadd(x2, p, V(5.12229709037114e-08f));
  p = fmadd(x2, p, V(1.48572235717979e-05f));
  p = fmadd(x2, p, V(6.37261928875436e-04f));
  p = fmadd(x2, p, V(4.89352455891786e-03f));
  V q = fmadd(x2, V(1.19825839466702e-06f), V(1.18534705686654e-04f));
  q = fmadd(x2, q, V(2.26843463243900e-03f));
  q = fmadd(x2, q, V(4.89352518554385e-03f));
  return (x * p) / q;
}

// Runs body(d, n) over [0, D) in lane groups, the full groups first and the tail (n < L) last,
// so that the hot loop uses full-width loads.
template <class T, class Body>
inline void over_lanes(int64_t D, const Body& body) {
  constexpr int64_t L = kLanes<T>;
  int64_t d = 0;
  for (; d + L <= D; d += L) body(d, L);
  if (d < D) body(d, D - d);
}

// out[r][c] = score of a[r] against b[c] over D features: the dot product (Luong), or
// sum_u v[u] tanh(a[r][u] + b[c][u]) (Bahdanau). Zero-filled tail lanes add 0 to both.
template <class T, bool kAdditive, int NR, int NC>
inline void score_tile(const T* const (&a)[NR], const T* const (&b)[NC], const T* v, int64_t D,
                       Acc<T> (&out)[NR][NC]) {
  using V = OpVec<T>;
  V acc[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = V(0);
  over_lanes<T>(D, [&](int64_t d, int64_t n) {
    V bv[NC];
    for (int c = 0; c < NC; ++c) bv[c] = vload(b[c] + d, n);
    V w = kAdditive ? vload(v + d, n) : V(0);
    for (int r = 0; r < NR; ++r) {
      const V av = vload(a[r] + d, n);
      for (int c = 0; c < NC; ++c) {
        if constexpr (kAdditive) {
          acc[r][c] = at::vec::fmadd(w, score_tanh(av + bv[c]), acc[r][c]);
        } else {
          acc[r][c] = at::vec::fmadd(av, bv[c], acc[r][c]);
        }
      }
    }
  });
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) out[r][c] = hsum<T>(acc[r][c]);
}

// Softmax of one row of Tk scores in place, with masked keys (and rows with no key left) at 0.
template <class A>
inline void masked_softmax_row(A* s, const bool* mask, int64_t Tk) {
  using V = at::vec::Vectorized<A>;
  A mx = -std::numeric_limits<A>::infinity();
  bool any = false;
  for (int64_t j = 0; j < Tk; ++j) {
    if (mask && mask[j]) continue;
    any = true;
    if (s[j] != s[j] || s[j] > mx) mx = s[j];  // NaN sticks
  }
  // A NaN score, or keys whose scores are all -inf (from infinite inputs; not a masked row):
  // the softmax is NaN, as torch's and the reference's (masked keys keep their 0).
  if (any && (mx != mx || mx == -std::numeric_limits<A>::infinity())) {
    for (int64_t j = 0; j < Tk; ++j)
      s[j] = (mask && mask[j]) ? A(0) : std::numeric_limits<A>::quiet_NaN();
    return;
  }
  if (!any) {  // every key masked, or Tk = 0
    std::fill(s, s + Tk, A(0));
    return;
  }
  if (mask) {
    for (int64_t j = 0; j < Tk; ++j)
      if (mask[j]) s[j] = -std::numeric_limits<A>::infinity();
  }
  // exp(-inf) = 0 for masked keys; the max key gives exp(0) = 1, so the sum is >= 1.
  at::vec::map([mx](V x) { return (x - V(mx)).exp(); }, s, s, Tk);
  const A inv = A(1) / at::vec::reduce_all([](V a, V b) { return a + b; }, s, Tk);
  at::vec::map([inv](V x) { return x * V(inv); }, s, s, Tk);
}

template <class T>
inline void store_row(T* dst, const Acc<T>* src, int64_t n) {
  over_lanes<T>(n, [&](int64_t d, int64_t m) { vstore(dst + d, OpVec<T>::loadu(src + d, m), m); });
}

// context[r] = sum_j w[r][j] values[j] for NR rows, one lane group of Hv at a time, the rows'
// accumulators in registers so each values load serves NR rows.
template <class T, int NR>
inline void weighted_sum(const Acc<T>* const (&w)[NR], const T* values, int64_t Tk, int64_t Hv,
                         T* const (&ctx)[NR]) {
  using V = OpVec<T>;
  over_lanes<T>(Hv, [&](int64_t h, int64_t n) {
    V acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = V(0);
    for (int64_t j = 0; j < Tk; ++j) {
      const V x = vload(values + j * Hv + h, n);
      for (int r = 0; r < NR; ++r) acc[r] = at::vec::fmadd(V(w[r][j]), x, acc[r]);
    }
    for (int r = 0; r < NR; ++r) vstore(ctx[r] + h, acc[r], n);
  });
}

// Forward for one (batch b, query rows [i0, i0 + nr)) with the NR x NC tile; `s` holds NR rows of
// Tk scores. Rows past nr repeat the last row (computed, never stored); so do keys past Tk.
template <class T, bool kAdditive, int NR, int NC>
void forward_tile(const T* q, const T* k, const T* v, const T* values, const bool* mask, T* context,
                  T* weights, int64_t b, int64_t i0, int64_t nr, int64_t Tq, int64_t Tk, int64_t D,
                  int64_t Hv, Acc<T>* s) {
  const T* qb = q + (b * Tq + i0) * D;
  const T* kb = k + b * Tk * D;
  const bool* mb = mask ? mask + b * Tk : nullptr;
  const T* a[NR];
  Acc<T>* srow[NR];
  for (int r = 0; r < NR; ++r) {
    a[r] = qb + std::min<int64_t>(r, nr - 1) * D;
    srow[r] = s + r * Tk;
  }
  for (int64_t j0 = 0; j0 < Tk; j0 += NC) {
    const int64_t nc = std::min<int64_t>(NC, Tk - j0);
    if (mb && std::all_of(mb + j0, mb + j0 + nc, [](bool m) { return m; })) continue;
    const T* bp[NC];
    for (int c = 0; c < NC; ++c) bp[c] = kb + (j0 + std::min<int64_t>(c, nc - 1)) * D;
    Acc<T> out[NR][NC];
    score_tile<T, kAdditive, NR, NC>(a, bp, v, D, out);
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < nc; ++c) srow[r][j0 + c] = out[r][c];
  }
  T* ctx[NR];
  const Acc<T>* w[NR];
  for (int r = 0; r < NR; ++r) {
    const int64_t rr = std::min<int64_t>(r, nr - 1);
    if (r < nr) {
      masked_softmax_row(srow[r], mb, Tk);
      store_row(weights + (b * Tq + i0 + r) * Tk, srow[r], Tk);
    }
    ctx[r] = context + (b * Tq + i0 + rr) * Hv;
    w[r] = srow[rr];
  }
  // Duplicated rows write the same values to the same place as the row they copy.
  weighted_sum<T, NR>(w, values + b * Tk * Hv, Tk, Hv, ctx);
}

template <class T, bool kAdditive>
void forward(const T* q, const T* k, const T* v, const T* values, const bool* mask, T* context,
             T* weights, int64_t B, int64_t Tq, int64_t Tk, int64_t D, int64_t Hv) {
  const bool decoder_step = Tq < 4;
  const int64_t NR = decoder_step ? 1 : 4;
  const int64_t tiles = (Tq + NR - 1) / NR;
  // ~64k multiply-adds (or tanh) per task: smaller problems stay on one thread.
  const int64_t per_tile = std::max<int64_t>(1, NR * Tk * (D + Hv));
  const int64_t grain = std::max<int64_t>(1, 65536 / per_tile);
  at::parallel_for(0, B * tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc<T>> s(NR * std::max<int64_t>(Tk, 1));  // once per task, not per tile
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles, i0 = (t - b * tiles) * NR;
      const int64_t nr = std::min<int64_t>(NR, Tq - i0);
      if (decoder_step) {
        forward_tile<T, kAdditive, 1, 4>(q, k, v, values, mask, context, weights, b, i0, nr, Tq, Tk,
                                         D, Hv, s.data());
      } else {
        forward_tile<T, kAdditive, 4, 1>(q, k, v, values, mask, context, weights, b, i0, nr, Tq, Tk,
                                         D, Hv, s.data());
      }
    }
  });
}

// Backward of the Bahdanau score for batch b, rows [i0, i0 + nr), keys [j0, j0 + nc) with the NR
// x NC tile: with e = ds (1 - t^2), ga[r] += sum_c e, gb[c] += sum_r e, gv += sum ds t. The
// factor v[u] of ga and gb is applied once at the end (it does not depend on i or j).
template <class T, int NR, int NC>
inline void backward_tile(const T* const (&a)[NR], const T* const (&bk)[NC],
                          const Acc<T> (&ds)[NR][NC], Acc<T>* const (&ga)[NR],
                          Acc<T>* const (&gb)[NC], Acc<T>* gv, int64_t D) {
  using V = OpVec<T>;
  over_lanes<T>(D, [&](int64_t d, int64_t n) {
    V bv[NC], gbv[NC];
    for (int c = 0; c < NC; ++c) {
      bv[c] = vload(bk[c] + d, n);
      gbv[c] = V(0);
    }
    V gvv(0);
    for (int r = 0; r < NR; ++r) {
      const V av = vload(a[r] + d, n);
      V gav(0);
      for (int c = 0; c < NC; ++c) {
        const V t = score_tanh(av + bv[c]);
        const V g(ds[r][c]);
        const V e = g - g * t * t;
        gav = gav + e;
        gbv[c] = gbv[c] + e;
        gvv = at::vec::fmadd(g, t, gvv);
      }
      (V::loadu(ga[r] + d, n) + gav).store(ga[r] + d, n);
    }
    for (int c = 0; c < NC; ++c) (V::loadu(gb[c] + d, n) + gbv[c]).store(gb[c] + d, n);
    (V::loadu(gv + d, n) + gvv).store(gv + d, n);
  });
}

// Row/key slots past the tile's end point at a scratch row whose ds is 0: they add nothing.
template <class T, int NR, int NC>
void backward_batch(const T* wq, const T* uk, const Acc<T>* ds, Acc<T>* dwq, Acc<T>* duk,
                    Acc<T>* gv, Acc<T>* sink, int64_t b, int64_t Tq, int64_t Tk, int64_t D) {
  for (int64_t i0 = 0; i0 < Tq; i0 += NR) {
    const int64_t nr = std::min<int64_t>(NR, Tq - i0);
    const T* a[NR];
    Acc<T>* ga[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t i = i0 + std::min<int64_t>(r, nr - 1);
      a[r] = wq + (b * Tq + i) * D;
      ga[r] = r < nr ? dwq + (b * Tq + i) * D : sink;
    }
    for (int64_t j0 = 0; j0 < Tk; j0 += NC) {
      const int64_t nc = std::min<int64_t>(NC, Tk - j0);
      Acc<T> g[NR][NC];
      bool any = false;
      for (int r = 0; r < NR; ++r)
        for (int c = 0; c < NC; ++c) {
          g[r][c] = (r < nr && c < nc) ? ds[(b * Tq + i0 + r) * Tk + j0 + c] : Acc<T>(0);
          any |= g[r][c] != Acc<T>(0);
        }
      if (!any) continue;  // masked keys, fully masked rows
      const T* bk[NC];
      Acc<T>* gb[NC];
      for (int c = 0; c < NC; ++c) {
        const int64_t j = j0 + std::min<int64_t>(c, nc - 1);
        bk[c] = uk + (b * Tk + j) * D;
        gb[c] = c < nc ? duk + (b * Tk + j) * D : sink;
      }
      backward_tile<T, NR, NC>(a, bk, g, ga, gb, gv, D);
    }
  }
}

template <class T>
void bahdanau_backward(const T* wq, const T* uk, const T* v, const Acc<T>* ds, Acc<T>* dwq,
                       Acc<T>* duk, Acc<T>* dv, int64_t B, int64_t Tq, int64_t Tk, int64_t D) {
  std::fill(dwq, dwq + B * Tq * D, Acc<T>(0));
  std::fill(duk, duk + B * Tk * D, Acc<T>(0));
  // Tasks own whole batches, so the sums over i (duk) and over j (dwq) need no atomics; each
  // thread sums its own dv, reduced at the end.
  const int nthreads = at::get_num_threads();
  std::vector<Acc<T>> gv(static_cast<size_t>(nthreads) * D, Acc<T>(0));
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, Tq * Tk * D));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Acc<T>* my_gv = gv.data() + static_cast<int64_t>(at::get_thread_num()) * D;
    std::vector<Acc<T>> sink(D);
    for (int64_t b = begin; b < end; ++b) {
      if (Tq < 4) {
        backward_batch<T, 1, 4>(wq, uk, ds, dwq, duk, my_gv, sink.data(), b, Tq, Tk, D);
      } else {
        backward_batch<T, 4, 1>(wq, uk, ds, dwq, duk, my_gv, sink.data(), b, Tq, Tk, D);
      }
    }
  });
  // dwq, duk *= v; dv = sum of the threads' partial sums.
  std::vector<Acc<T>> vf(D);
  for (int64_t d = 0; d < D; ++d) vf[d] = static_cast<Acc<T>>(v[d]);
  at::parallel_for(0, B * (Tq + Tk), 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      Acc<T>* p = row < B * Tq ? dwq + row * D : duk + (row - B * Tq) * D;
      at::vec::map2([](auto x, auto y) { return x * y; }, p, p, vf.data(), D);
    }
  });
  for (int64_t d = 0; d < D; ++d) {
    Acc<T> s = 0;
    for (int th = 0; th < nthreads; ++th) s += gv[th * D + d];
    dv[d] = s;
  }
}

}  // namespace

void luong_attention_forward(DType dtype, const void* q, const void* k, const void* values,
                             const bool* mask, void* context, void* weights, void* /*scratch*/,
                             int64_t B, int64_t Tq, int64_t Tk, int64_t D, int64_t Hv) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward<T, false>(static_cast<const T*>(q), static_cast<const T*>(k), nullptr,
                      static_cast<const T*>(values), mask, static_cast<T*>(context),
                      static_cast<T*>(weights), B, Tq, Tk, D, Hv);
  });
}

void bahdanau_attention_forward(DType dtype, const void* wq, const void* uk, const void* v,
                                const void* values, const bool* mask, void* context,
                                void* weights, void* /*scratch*/, int64_t B, int64_t Tq,
                                int64_t Tk, int64_t D, int64_t Hv) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward<T, true>(static_cast<const T*>(wq), static_cast<const T*>(uk),
                     static_cast<const T*>(v), static_cast<const T*>(values), mask,
                     static_cast<T*>(context), static_cast<T*>(weights), B, Tq, Tk, D, Hv);
  });
}

void bahdanau_attention_backward(DType dtype, const void* wq, const void* uk, const void* v,
                                 const void* ds, void* dwq, void* duk, void* dv, int64_t B,
                                 int64_t Tq, int64_t Tk, int64_t D) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    bahdanau_backward<T>(static_cast<const T*>(wq), static_cast<const T*>(uk),
                         static_cast<const T*>(v), static_cast<const A*>(ds),
                         static_cast<A*>(dwq), static_cast<A*>(duk), static_cast<A*>(dv), B, Tq,
                         Tk, D);
  });
}

}  // namespace cpu
}  // namespace pyseqk
