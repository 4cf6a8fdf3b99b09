// Flash-style scaled-dot-product attention on the CPU: the scores are produced one
// [query tile x key tile] block at a time by a small BLAS GEMM, folded into the output with an
// online softmax (running max and sum per row, rescaling the accumulator when the max grows), and
// never stored whole: extra memory is O(tiles), not O(L x S). The backward recomputes each block
// of probabilities from the saved logsumexp.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/blas.h"
#include "pyseqk/dropout_hash.h"
#include "pyseqk/sdpa_kernels.h"

namespace pyseqk {
namespace cpu {
namespace {

// Tile sizes. Forward: a [256 x 256] fp32 score block is 256 KiB; with the query tile (64 KiB at
// D = 64), one key and one value tile (64 KiB each) and the accumulator (64 KiB) the working set
// is ~512 KiB, inside a 1-2 MiB L2. The causal waste does not grow with the tiles: the key range
// of a query tile is cut at its last row, and its diagonal block runs in strips of kDiagStrip
// rows, each against the keys up to its own last row, so only the upper halves of the 64 x 64
// blocks on the diagonal are wasted (1/16 of the causal work at N = 1024; torch's 256 x 512
// blocks waste half of a 256 x 256 block per query block, 1/4).
// Backward: four score-sized tiles (P, dP/dS, and the dropped P) live at once: 128 x 128.
constexpr int64_t kBlockQ = 256, kBlockK = 256, kDiagStrip = 64;  // forward
constexpr int64_t kBwdBlockQ = 128, kBwdBlockK = 128;  // backward: four tiles live at once

}  // namespace
}  // namespace cpu
}  // namespace pyseqk

namespace pyseqk {
namespace cpu {
namespace {

// The tile GEMMs are far too small to split: MKL must run them on the calling thread. Inside
// at::parallel_for's OpenMP region it does so by itself; when the range runs on the caller alone
// (one task), MKL would otherwise fork its own threads for every 128 x 128 tile.
struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

template <class T>
using Vec = at::vec::Vectorized<T>;

// A fast exp: float's exp_u20 (a degree-5 polynomial, 20 ulp, flushes x < ln(FLT_MIN) to 0 so
// -inf gives 0) costs about a third of Sleef's exp; the softmax error it adds (~1e-6 relative)
// is far below what the fp32 GEMMs already carry. double keeps the full-precision exp.
template <class T>
inline Vec<T> vexp(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

template <class T>
inline T row_max(const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  T m = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= W) {
    Vec<T> vm = Vec<T>::loadu(x);
    for (j = W; j + W <= n; j += W) vm = at::vec::maximum(vm, Vec<T>::loadu(x + j));
    m = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); },
                                   vm);
  }
  // NaN propagates, as in at::vec::maximum: std::max would drop it, and a row of NaN scores
  // would pass for an empty row (zeros) instead of giving NaN as torch does.
  for (; j < n; ++j) m = (x[j] != x[j] || x[j] > m) ? x[j] : m;
  return m;
}

// x[j] = exp(x[j] - m) for j < n; returns the sum.
template <class T>
inline T exp_sub_sum(T* x, int64_t n, T m) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vm(m);
  Vec<T> vs(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> e = vexp<T>(Vec<T>::loadu(x + j) - vm);
    e.store(x + j);
    vs = vs + e;
  }
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, vs);
  if (j < n) {
    // the lanes past n hold exp(0 - m): store only the n - j real ones and sum those
    vexp<T>(Vec<T>::loadu(x + j, n - j) - vm).store(x + j, n - j);
    for (; j < n; ++j) s += x[j];
  }
  return s;
}

// x[j] = exp(x[j] - lse) for j < n (the backward's recomputed probabilities).
template <class T>
inline void exp_sub(T* x, int64_t n, T lse) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vl(lse);
  int64_t j = 0;
  for (; j + W <= n; j += W) vexp<T>(Vec<T>::loadu(x + j) - vl).store(x + j);
  if (j < n) vexp<T>(Vec<T>::loadu(x + j, n - j) - vl).store(x + j, n - j);
}

template <class T>
inline void scale_row(T* x, int64_t n, T s) {
  at::vec::map([s](Vec<T> v) { return v * Vec<T>(s); }, x, x, n);
}

// Adds the mask row (i, j0 .. j0+n) and -inf on the causally hidden columns j > i.
template <class T>
inline void mask_row(const SdpaArgs& a, const T* mask_bh, int64_t i, int64_t j0, int64_t n, T* x) {
  if (mask_bh) {
    const T* m = mask_bh + i * a.mask_stride[2] + j0 * a.mask_stride[3];
    const int64_t ms = a.mask_stride[3];
    if (ms == 1) {
      at::vec::map2([](Vec<T> s, Vec<T> b) { return s + b; }, x, x, m, n);
    } else {
      for (int64_t j = 0; j < n; ++j) x[j] += m[j * ms];
    }
  }
  if (a.is_causal) {
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t j = std::max<int64_t>(0, i + 1 - j0); j < n; ++j) x[j] = ninf;
  }
}

// Zeroes the dropped probabilities of row i (kept ones keep their value: the 1/(1-p) scaling is
// applied once, to the output row in the forward and to the probabilities' gradient backward).
template <class T>
inline void drop_row(uint32_t row_key, uint32_t threshold, int64_t j0, int64_t n, T* x) {
  for (int64_t j = 0; j < n; ++j) {
    if (!dropout::keep(row_key, static_cast<uint32_t>(j0 + j), threshold)) x[j] = T(0);
  }
}

template <class T>
const T* mask_base(const SdpaArgs& a, int64_t b, int64_t h) {
  if (!a.mask) return nullptr;
  return static_cast<const T*>(a.mask) + b * a.mask_stride[0] + h * a.mask_stride[1];
}

template <class T>
void forward(const SdpaArgs& a, T* out, T* lse) {
  // 256-row query tiles stream K and V from L3 half as often as 128-row ones: 3-5 % faster
  // without causal (AMD EPYC, 512 KiB L2); causal (AVX-512 Xeon, 2 MiB L2, with 64-row diagonal
  // strips) N = 1024 1.28x -> 1.32x torch, N = 4096 1.07x -> 1.10x. 128-row tiles with 32-row
  // strips and 256-row tiles with 32- or 128-row strips measured within 3 % of that.
  const int64_t BQ = kBlockQ;
  const int64_t L = a.L, S = a.S, E = a.E, Ev = a.Ev, group = a.Hq / a.Hk;
  const int64_t nq = (L + BQ - 1) / BQ;
  const T scale = static_cast<T>(a.scale);
  const bool dropout = a.dropout_p > 0.0;
  const uint32_t threshold = dropout::threshold(a.dropout_p);
  const T keep_scale = static_cast<T>(1.0 / (1.0 - a.dropout_p));
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* q = static_cast<const T*>(a.query);
  const T* k = static_cast<const T*>(a.key);
  const T* v = static_cast<const T*>(a.value);

  at::parallel_for(0, a.B * a.Hq * nq, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    // Scratch for the whole chunk of tiles this thread runs: allocated once, not per tile.
    std::vector<T> scores(BQ * kBlockK), acc(BQ * Ev), m(BQ), l(BQ);
    for (int64_t t = begin; t < end; ++t) {
      // Causal tiles cost in proportion to their row index; zigzag them (0, nq-1, 1, nq-2, ...)
      // so that the contiguous ranges at::parallel_for hands each thread get equal work.
      const int64_t u = t % nq, qb = (u & 1) ? nq - 1 - (u >> 1) : (u >> 1);
      const int64_t bh = t / nq, b = bh / a.Hq, h = bh % a.Hq, hk = h / group;
      const int64_t i0 = qb * BQ, mq = std::min(BQ, L - i0);
      const T* Q = q + b * a.sq.b + h * a.sq.h + i0 * a.sq.row;
      const T* K = k + b * a.sk.b + hk * a.sk.h;
      const T* V = v + b * a.sv.b + hk * a.sv.h;
      const T* mask_bh = mask_base<T>(a, b, h);
      std::fill(acc.begin(), acc.begin() + mq * Ev, T(0));
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), T(0));
      // Rows [r0, r1) of the tile against keys [j0, j0 + nk): scores, online softmax, P V.
      auto block = [&](int64_t r0, int64_t r1, int64_t j0, int64_t nk) {
        T* sc = scores.data() + r0 * kBlockK;
        blas_mm<T>(false, true, r1 - r0, nk, E, scale, Q + r0 * a.sq.row, a.sq.row,
                   K + j0 * a.sk.row, a.sk.row, T(0), sc, kBlockK);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = i0 + r;
          T* x = scores.data() + r * kBlockK;
          mask_row<T>(a, mask_bh, i, j0, nk, x);
          const T rm = row_max(x, nk);
          const T m_new = rm != rm ? rm : std::max(m[r], rm);  // a NaN max stays NaN
          if (m_new == ninf) {  // nothing to attend in this row so far
            std::fill(x, x + nk, T(0));
            continue;
          }
          const T alpha = std::exp(m[r] - m_new);  // 0 when m[r] = -inf
          l[r] = l[r] * alpha + exp_sub_sum(x, nk, m_new);
          m[r] = m_new;
          if (alpha != T(1)) scale_row(acc.data() + r * Ev, Ev, alpha);
          if (dropout) {
            drop_row(dropout::row_key(a.seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i)),
                     threshold, j0, nk, x);
          }
        }
        blas_mm<T>(false, false, r1 - r0, Ev, nk, T(1), sc, kBlockK, V + j0 * a.sv.row,
                   a.sv.row, T(1), acc.data() + r0 * Ev, Ev);
      };
      // Causal: keys before the tile's first row are seen by all its rows; keys past its last
      // row by none. The diagonal block in between goes in strips of kDiagStrip rows, each
      // against the keys up to its last row.
      const int64_t kfull = a.is_causal ? std::min(S, i0) : S;
      for (int64_t j0 = 0; j0 < kfull; j0 += kBlockK) block(0, mq, j0, std::min(kBlockK, kfull - j0));
      if (a.is_causal && i0 < S) {
        for (int64_t r0 = 0; r0 < mq; r0 += kDiagStrip) {
          const int64_t r1 = std::min(mq, r0 + kDiagStrip);
          block(r0, r1, i0, std::min(S, i0 + r1) - i0);
        }
      }
      T* O = out + (bh * L + i0) * Ev;
      T* lse_row = lse + bh * L + i0;
      for (int64_t r = 0; r < mq; ++r) {
        if (l[r] != T(0)) {  // NaN too: a NaN score makes the row NaN, not empty
          const T inv = (dropout ? keep_scale : T(1)) / l[r];
          at::vec::map([inv](Vec<T> x) { return x * Vec<T>(inv); }, O + r * Ev,
                       acc.data() + r * Ev, Ev);
          lse_row[r] = m[r] + std::log(l[r]);
        } else {
          std::fill(O + r * Ev, O + (r + 1) * Ev, T(0));
          lse_row[r] = std::numeric_limits<T>::infinity();
        }
      }
    }
  });
}

// One [query tile x key tile] block of the backward: recomputes P = exp(S - lse), then
// dV += P_d^T dO, dP = dO V^T, dS = P * (dP_d - delta), and adds dS's contributions to dK (with
// dkdv) and to dQ (with dq_rows). P_d = P * keep / (1 - p) is the dropped P of the forward.
template <class T>
struct BwdBlock {
  const SdpaArgs& a;
  const T* dout;
  SdpaStrides sdo;
  const T* lse;
  const T* delta;  // [B * Hq * L]
  T* dk;
  T* dv;
  T *p, *dp, *pd;  // scratch [kBwdBlockQ x kBwdBlockK] each (pd only with dropout)

  void operator()(int64_t b, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nk, bool dkdv,
                  T* dq_rows) const {
    constexpr int64_t ld = kBwdBlockK;
    const int64_t L = a.L, E = a.E, Ev = a.Ev, hk = h / (a.Hq / a.Hk), bh = b * a.Hq + h;
    const T scale = static_cast<T>(a.scale);
    const bool dropout = a.dropout_p > 0.0;
    const T keep_scale = static_cast<T>(1.0 / (1.0 - a.dropout_p));
    const T* Q = static_cast<const T*>(a.query) + b * a.sq.b + h * a.sq.h + i0 * a.sq.row;
    const T* K = static_cast<const T*>(a.key) + b * a.sk.b + hk * a.sk.h + j0 * a.sk.row;
    const T* V = static_cast<const T*>(a.value) + b * a.sv.b + hk * a.sv.h + j0 * a.sv.row;
    const T* dO = dout + b * sdo.b + h * sdo.h + i0 * sdo.row;
    const T* mask_bh = mask_base<T>(a, b, h);
    blas_mm<T>(false, true, mq, nk, E, scale, Q, a.sq.row, K, a.sk.row, T(0), p, ld);
    for (int64_t r = 0; r < mq; ++r) {
      T* x = p + r * ld;
      mask_row<T>(a, mask_bh, i0 + r, j0, nk, x);
      exp_sub<T>(x, nk, lse[bh * L + i0 + r]);
      if (dropout) {
        T* y = pd + r * ld;
        std::copy(x, x + nk, y);
        drop_row(dropout::row_key(a.seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i0 + r)),
                 dropout::threshold(a.dropout_p), j0, nk, y);
      }
    }
    if (dkdv) {
      T* dV = dv + ((b * a.Hk + hk) * a.S + j0) * Ev;
      blas_mm<T>(true, false, nk, Ev, mq, dropout ? keep_scale : T(1), dropout ? pd : p, ld, dO,
                 sdo.row, T(1), dV, Ev);
    }
    blas_mm<T>(false, true, mq, nk, Ev, T(1), dO, sdo.row, V, a.sv.row, T(0), dp, ld);
    for (int64_t r = 0; r < mq; ++r) {
      T* d = dp + r * ld;
      const T* x = p + r * ld;
      const Vec<T> dl(delta[bh * L + i0 + r]);
      if (dropout) {
        // P * dP * keep / (1 - p) = P_d * dP: the dropped P carries the mask and the scale
        const Vec<T> ks(keep_scale);
        at::vec::map3([ks, dl](Vec<T> dpv, Vec<T> pv, Vec<T> pdv) { return pdv * dpv * ks - pv * dl; },
                      d, d, x, pd + r * ld, nk);
      } else {
        at::vec::map2([dl](Vec<T> dpv, Vec<T> pv) { return pv * (dpv - dl); }, d, d, x, nk);
      }
    }
    if (dq_rows) {
      blas_mm<T>(false, false, mq, E, nk, scale, dp, ld, K, a.sk.row, T(1), dq_rows, E);
    }
    if (dkdv) {
      T* dK = dk + ((b * a.Hk + hk) * a.S + j0) * E;
      blas_mm<T>(true, false, nk, E, mq, scale, dp, ld, Q, a.sq.row, T(1), dK, E);
    }
  }
};

// Two deterministic schedules (each gradient element is accumulated by one thread, over key
// tiles or query tiles in ascending order, whatever the thread count):
// - fused, when there are enough (batch, kv head) pairs to share out: a task owns dK and dV of
//   its kv head and dQ of the query heads that read it: 5 GEMMs per block;
// - split, when there are too few (a single sequence and head would run on one core): dK and dV
//   in parallel over (batch, kv head, key tile), then dQ in parallel over (batch, query head,
//   query tile), recomputing P and dS: 7 GEMMs per block, but every core busy.
template <class T>
void backward(const SdpaArgs& a, const T* dout, SdpaStrides sdo, const T* out, SdpaStrides so,
              const T* lse, T* dq, T* dk, T* dv) {
  constexpr int64_t BQ = kBwdBlockQ, BK = kBwdBlockK;
  const int64_t L = a.L, S = a.S, E = a.E, Ev = a.Ev, group = a.Hq / a.Hk;
  const int64_t nq = (L + BQ - 1) / BQ, nk_tiles = (S + BK - 1) / BK;
  const bool dropout = a.dropout_p > 0.0;
  // delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, the softmax backward's row term: O(L).
  std::vector<T> delta(a.B * a.Hq * L);
  at::parallel_for(0, a.B * a.Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / a.Hq, h = bh % a.Hq;
      for (int64_t i = 0; i < L; ++i) {
        delta[bh * L + i] = at::vec::map2_reduce_all<T>(
            [](Vec<T> x, Vec<T> y) { return x * y; }, [](Vec<T> x, Vec<T> y) { return x + y; },
            dout + b * sdo.b + h * sdo.h + i * sdo.row, out + b * so.b + h * so.h + i * so.row, Ev);
      }
    }
  });
  std::fill(dq, dq + a.B * a.Hq * L * E, T(0));
  std::fill(dk, dk + a.B * a.Hk * S * E, T(0));
  std::fill(dv, dv + a.B * a.Hk * S * Ev, T(0));
  auto scratch = [&](std::vector<T>& buf) {
    buf.resize((dropout ? 3 : 2) * BQ * BK);
    return BwdBlock<T>{a, dout, sdo, lse, delta.data(), dk, dv, buf.data(), buf.data() + BQ * BK,
                       dropout ? buf.data() + 2 * BQ * BK : nullptr};
  };
  // Causal: query rows i < j0 see none of key tile j0's keys.
  auto first_query_row = [&](int64_t j0) { return a.is_causal ? j0 : int64_t(0); };

  if (a.B * a.Hk >= 2 * at::get_num_threads()) {
    at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t begin, int64_t end) {
      SequentialBlas sequential;
      std::vector<T> buf;
      const BwdBlock<T> block = scratch(buf);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / a.Hk, hk = t % a.Hk;
        for (int64_t j0 = 0; j0 < S; j0 += BK) {
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = hk * group + g;
            for (int64_t i0 = first_query_row(j0); i0 < L; i0 += BQ) {
              block(b, h, i0, std::min(BQ, L - i0), j0, std::min(BK, S - j0), true,
                    dq + ((b * a.Hq + h) * L + i0) * E);
            }
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, a.B * a.Hk * nk_tiles, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<T> buf;
    const BwdBlock<T> block = scratch(buf);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j0 = (t % nk_tiles) * BK, b = t / nk_tiles / a.Hk, hk = t / nk_tiles % a.Hk;
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i0 = first_query_row(j0); i0 < L; i0 += BQ) {
          block(b, hk * group + g, i0, std::min(BQ, L - i0), j0, std::min(BK, S - j0), true,
                nullptr);
        }
      }
    }
  });
  at::parallel_for(0, a.B * a.Hq * nq, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<T> buf;
    const BwdBlock<T> block = scratch(buf);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = (t % nq) * BQ, bh = t / nq, b = bh / a.Hq, h = bh % a.Hq;
      const int64_t mq = std::min(BQ, L - i0);
      const int64_t kend = a.is_causal ? std::min(S, i0 + mq) : S;
      for (int64_t j0 = 0; j0 < kend; j0 += BK) {
        block(b, h, i0, mq, j0, std::min(BK, S - j0), false, dq + (bh * L + i0) * E);
      }
    }
  });
}

}  // namespace

void sdpa_forward(DType dtype, const SdpaArgs& a, void* out, void* lse) {
  if (dtype == DType::kFloat64) {
    forward<double>(a, static_cast<double*>(out), static_cast<double*>(lse));
  } else {
    forward<float>(a, static_cast<float*>(out), static_cast<float*>(lse));
  }
}

void sdpa_backward(DType dtype, const SdpaArgs& a, const void* grad_out, SdpaStrides sdo,
                   const void* out, SdpaStrides so, const void* lse, void* grad_query,
                   void* grad_key, void* grad_value) {
  if (dtype == DType::kFloat64) {
    backward<double>(a, static_cast<const double*>(grad_out), sdo, static_cast<const double*>(out),
                     so, static_cast<const double*>(lse), static_cast<double*>(grad_query), static_cast<double*>(grad_key),
                     static_cast<double*>(grad_value));
  } else {
    backward<float>(a, static_cast<const float*>(grad_out), sdo, static_cast<const float*>(out), so,
                    static_cast<const float*>(lse), static_cast<float*>(grad_query), static_cast<float*>(grad_key),
                    static_cast<float*>(grad_value));
  }
}

}  // namespace cpu
}  // namespace pyseqk
