// Flash-style scaled-dot-product attention on the CPU: the scores are produced one
// [query tile x key tile] block at a time, folded into the output with an online softmax (running
// max and sum per row, rescaling the accumulator when the max grows), and never stored whole:
// extra memory is O(tiles), not O(L x S). The backward recomputes each block of probabilities
// from the saved logsumexp. The fp32 forward on AVX-512 builds is flash_forward (gemm.h's
// register-blocked kernel, query rows along the vector lanes); the rest (fp64, other ISAs, the
// backward) runs its blocks as small BLAS GEMMs.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/blas.h"
#include "cpu/gemm.h"
#include "cpu/vec_io.h"
#include "pyseqk/cell_kernels.h"
#include "pyseqk/dropout_hash.h"
#include "pyseqk/sdpa_kernels.h"

namespace pyseqk {
namespace cpu {
namespace {

// Tile sizes of the BLAS version. Forward: a [256 x 256] fp32 score block is 256 KiB; with the
// query tile (64 KiB at D = 64), one key and one value tile (64 KiB each) and the accumulator
// (64 KiB) the working set is ~512 KiB, inside a 1-2 MiB L2. The causal waste does not grow
// with the tiles: the key range of a query tile is cut at its last row, and its diagonal block
// runs in strips of kDiagStrip rows, each against the keys up to its own last row, so only the
// upper halves of the 64 x 64 blocks on the diagonal are wasted (1/16 of the causal work at
// N = 1024; torch's 256 x 512 blocks waste half of a 256 x 256 block per query block, 1/4).
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

// x[j] = min(exp(x[j] - lse), 1) for j < n (the backward's recomputed probabilities). The
// forward's scores come from another GEMM (flash_forward's, in log2 units), so s - lse can exceed
// 0 by the two GEMMs' rounding difference: nothing at ordinary scores, but with scores of 1e30
// it is 1e23 and exp gives inf (NaN gradients where torch's are finite: test_bad_input). A
// probability is at most 1 (NaN stays NaN: at::vec::minimum propagates it).
template <class T>
inline void exp_sub(T* x, int64_t n, T lse) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vl(lse), one(T(1));
  int64_t j = 0;
  for (; j + W <= n; j += W) at::vec::minimum(vexp<T>(Vec<T>::loadu(x + j) - vl), one).store(x + j);
  if (j < n) {
    at::vec::minimum(vexp<T>(Vec<T>::loadu(x + j, n - j) - vl), one).store(x + j, n - j);
  }
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

// The query tile that task u of a head's nq runs. Causal tiles cost in proportion to their row
// index; zigzagging them (0, nq-1, 1, nq-2, ...) gives the contiguous ranges at::parallel_for
// hands each thread equal work.
inline int64_t zigzag_tile(int64_t u, int64_t nq) { return (u & 1) ? nq - 1 - (u >> 1) : u >> 1; }

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
      const int64_t qb = zigzag_tile(t % nq, nq);
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

#if defined(CPU_CAPABILITY_AVX512)
// The fp32 forward on AVX-512 builds: the same online softmax, with the tiles
// transposed so that the query rows run along the vector lanes and both products are gemm.h's
// register-blocked kernel instead of a BLAS call each:
//   S^T[j, i] = sum_d K[j, d] Qt[d, i]      (Qt: the query tile transposed, scaled, once per tile)
//   O^T[e, i] += sum_j V[j, e] P^T[j, i]    (V read in place: A[e, j] = V[j, e])
// Each micro-tile is kGemmBatch (32) query rows, two vectors. Along the keys, the row max, the
// rescale and the row sum are then lane-wise vector operations (no horizontal reductions), and
// the causal mask is a lane mask on the 32 key rows of the diagonal, which is all the causal work
// wasted. Measured against the BLAS version: bench/NOTES.md, "SDPA: a forward of our own".
constexpr int64_t kFlashTileQ = 4 * kGemmBatch;  // query rows per task: the key block is read
                                                 // from L1/L2 by four micro-tiles
constexpr int64_t kFlashBlockK = 112;             // key rows per block: 8 gemm.h blocks of 14

// The scores are kept in log2 units (the query tile scaled by scale * log2 e, the mask by log2 e),
// so that the softmax's exponentials are powers of two (math::exp2_softmax_f32x16).
constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;

// sc[j, i] += log2 e * mask[q0 + i, j0 + j] for the nk key rows of a micro-tile's scores (lanes
// past the last query row get nothing). A mask that does not vary along the queries (a key padding
// mask) is one broadcast per key row; otherwise the tile is transposed into mt first, through
// registers when the keys are contiguous.
void add_mask_tile(const SdpaArgs& a, const float* mask_bh, int64_t q0, int64_t j0, int64_t nk,
                   float* mt, float* sc) {
  constexpr int64_t W = kGemmBatch, lanes = FVec::size();
  const int64_t rows = std::min(W, a.L - q0), si = a.mask_stride[2], sj = a.mask_stride[3];
  const float* src = mask_bh + q0 * si + j0 * sj;
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  if (si == 0) {
    for (int64_t j = 0; j < nk; ++j) {
      const __m512 mv = _mm512_set1_ps(src[j * sj]);
      for (int64_t x = 0; x < W; x += lanes) {
        float* p = sc + j * W + x;
        _mm512_storeu_ps(p, _mm512_fmadd_ps(mv, log2e, _mm512_loadu_ps(p)));
      }
    }
    return;
  }
  if (sj == 1) {
    transpose_f32(src, si, mt, W, rows, nk);
  } else {
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t i = 0; i < rows; ++i) mt[j * W + i] = src[i * si + j * sj];
  }
  for (int64_t x = 0; x < rows; x += lanes) {
    const int64_t n = std::min(lanes, rows - x);
    const __mmask16 live = static_cast<__mmask16>(n == lanes ? 0xFFFF : (1u << n) - 1);
    for (int64_t j = 0; j < nk; ++j) {
      float* p = sc + j * W + x;
      _mm512_storeu_ps(p, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, mt + j * W + x), log2e,
                                          _mm512_loadu_ps(p)));
    }
  }
}

// dropout::keep for 16 query rows at once (their row keys in rk) and one key column j.
inline __mmask16 keep_lanes(__m512i rk, uint32_t j, __m512i threshold) {
  __m512i h = _mm512_xor_si512(rk, _mm512_set1_epi32(static_cast<int>(j * 0xC2B2AE3Du)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  return _mm512_cmpge_epu32_mask(_mm512_srli_epi32(h, 8), threshold);
}

void flash_forward(const SdpaArgs& a, float* out, float* lse) {
  constexpr int64_t W = kGemmBatch, BQ = kFlashTileQ, BK = kFlashBlockK, NV = kGemmVecs;
  constexpr int64_t lanes = FVec::size();
  const int64_t L = a.L, S = a.S, E = a.E, Ev = a.Ev, group = a.Hq / a.Hk;
  const int64_t nq = (L + BQ - 1) / BQ;
  const float* q = static_cast<const float*>(a.query);
  const float* k = static_cast<const float*>(a.key);
  const float* v = static_cast<const float*>(a.value);
  const float* mask = static_cast<const float*>(a.mask);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const bool dropout = a.dropout_p > 0.0;
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(dropout::threshold(a.dropout_p)));
  const float keep_scale = static_cast<float>(1.0 / (1.0 - a.dropout_p));

  at::parallel_for(0, a.B * a.Hq * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt_buf(E * BQ), ot_buf(Ev * BQ), sc_buf(BK * W), mt_buf(mask ? BK * W : 0);
    float *qt = qt_buf.data(), *ot = ot_buf.data(), *sc = sc_buf.data(), *mt = mt_buf.data();
    __m512 m[BQ / lanes], l[BQ / lanes];
    alignas(64) uint32_t row_keys[BQ];  // dropout: dropout::row_key of each query row
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = zigzag_tile(t % nq, nq);
      const int64_t bh = t / nq, b = bh / a.Hq, h = bh % a.Hq, hk = h / group;
      const int64_t i0 = qb * BQ, mq = std::min(BQ, L - i0);
      const float* K = k + b * a.sk.b + hk * a.sk.h;
      const float* V = v + b * a.sv.b + hk * a.sv.h;
      const float* mask_bh = mask_base<float>(a, b, h);
      // Qt = scale * Q^T, the columns past the last query row zero.
      if (mq < BQ) std::fill(qt_buf.begin(), qt_buf.end(), 0.f);
      transpose_f32(q + b * a.sq.b + h * a.sq.h + i0 * a.sq.row, a.sq.row, qt, BQ, mq, E);
      scale_row(qt, E * BQ, static_cast<float>(a.scale * kLog2e));
      std::fill(ot_buf.begin(), ot_buf.end(), 0.f);
      for (int64_t g = 0; g < BQ / lanes; ++g) {
        m[g] = ninf;
        l[g] = _mm512_setzero_ps();
      }
      if (dropout) {
        for (int64_t r = 0; r < BQ; ++r) {
          row_keys[r] = dropout::row_key(a.seed, static_cast<uint32_t>(bh),
                                         static_cast<uint32_t>(i0 + r));
        }
      }
      // Causal: micro-tile w (rows q0 .. q0 + W) sees keys up to its last row.
      const int64_t kend = a.is_causal ? std::min(S, i0 + mq) : S;
      for (int64_t j0 = 0; j0 < kend; j0 += BK) {
        for (int64_t w = 0; w * W < mq; ++w) {
          const int64_t q0 = i0 + w * W;
          const int64_t nk = std::min({BK, kend - j0, a.is_causal ? q0 + W - j0 : BK});
          if (nk <= 0) continue;
          gemm_rows(K + j0 * a.sk.row, a.sk.row, qt + w * W, BQ, E, sc, W, nk, false);
          if (mask_bh) add_mask_tile(a, mask_bh, q0, j0, nk, mt, sc);
          if (a.is_causal && j0 + nk > q0 + 1) {
            // key row j hides the lanes i < j - q0 (query q0 + i sees keys up to q0 + i)
            for (int64_t j = std::max(j0, q0 + 1); j < j0 + nk; ++j) {
              for (int64_t x = 0; x < W; x += lanes) {
                const int64_t n = std::clamp<int64_t>(j - q0 - x, 0, lanes);
                const __mmask16 hide = static_cast<__mmask16>(n == lanes ? 0xFFFF : (1u << n) - 1);
                float* p = sc + (j - j0) * W + x;
                _mm512_storeu_ps(p, _mm512_mask_mov_ps(_mm512_loadu_ps(p), hide, ninf));
              }
            }
          }
          for (int64_t x = 0; x < NV; ++x) {
            const int64_t g = w * NV + x;
            float* col = sc + x * lanes;
            // four running maxima: one would wait on vmaxps's latency every row
            __m512 mx4[4] = {ninf, ninf, ninf, ninf};
            int64_t j = 0;
            for (; j + 4 <= nk; j += 4)
              for (int y = 0; y < 4; ++y)
                mx4[y] = _mm512_max_ps(mx4[y], _mm512_loadu_ps(col + (j + y) * W));
            for (; j < nk; ++j) mx4[0] = _mm512_max_ps(mx4[0], _mm512_loadu_ps(col + j * W));
            const __m512 mx = _mm512_max_ps(_mm512_max_ps(mx4[0], mx4[1]),
                                            _mm512_max_ps(mx4[2], mx4[3]));
            const __m512 m_new = _mm512_max_ps(m[g], mx);
            // a lane with nothing to attend yet: exp(s - 0) keeps its probabilities 0
            const __m512 m_safe =
                _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ),
                                   _mm512_setzero_ps());
            const __m512 alpha = math::exp2_softmax_f32x16(_mm512_sub_ps(m[g], m_safe));
            // NaN scores (and +inf - +inf) give NaN probabilities, so a NaN sum and a NaN
            // output row, as in torch
            __m512 sum = _mm512_setzero_ps();
            if (dropout) {
              // the row sums take every probability, P V only the kept ones (their 1/(1-p)
              // comes with the final 1/l)
              const __m512i rk = _mm512_load_si512(row_keys + g * lanes);
              for (int64_t j = 0; j < nk; ++j) {
                const __m512 p = math::exp2_softmax_f32x16(
                    _mm512_sub_ps(_mm512_loadu_ps(col + j * W), m_safe));
                sum = _mm512_add_ps(sum, p);
                _mm512_storeu_ps(col + j * W,
                                 _mm512_maskz_mov_ps(keep_lanes(rk, static_cast<uint32_t>(j0 + j),
                                                                threshold),
                                                     p));
              }
            } else {
              for (int64_t j = 0; j < nk; ++j) {
                const __m512 p = math::exp2_softmax_f32x16(
                    _mm512_sub_ps(_mm512_loadu_ps(col + j * W), m_safe));
                _mm512_storeu_ps(col + j * W, p);
                sum = _mm512_add_ps(sum, p);
              }
            }
            l[g] = _mm512_fmadd_ps(l[g], alpha, sum);
            m[g] = m_new;
            if (_mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.f), _CMP_NEQ_UQ)) {
              float* o = ot + w * W + x * lanes;
              for (int64_t e = 0; e < Ev; ++e)
                _mm512_storeu_ps(o + e * BQ, _mm512_mul_ps(_mm512_loadu_ps(o + e * BQ), alpha));
            }
          }
          gemm_rows(V + j0 * a.sv.row, 1, sc, W, nk, ot + w * W, BQ, Ev, true, a.sv.row);
        }
      }
      // O = O^T / l, transposed back; lse = m ln 2 + log l (+inf and a zero row where l = 0).
      alignas(64) float inv[BQ], mv[BQ], lv[BQ];
      for (int64_t g = 0; g < BQ / lanes; ++g) {
        const __m512 lg = l[g];
        _mm512_store_ps(lv + g * lanes, lg);
        _mm512_store_ps(mv + g * lanes, m[g]);
        // l = 0 (no key attended): inv = 0 gives the zero row
        const __mmask16 empty = _mm512_cmp_ps_mask(lg, _mm512_setzero_ps(), _CMP_EQ_OQ);
        _mm512_store_ps(inv + g * lanes, _mm512_maskz_div_ps(static_cast<__mmask16>(~empty),
                                                             _mm512_set1_ps(keep_scale), lg));
      }
      for (int64_t e = 0; e < Ev; ++e) {
        float* o = ot + e * BQ;
        for (int64_t x = 0; x < BQ; x += lanes)
          _mm512_storeu_ps(o + x, _mm512_mul_ps(_mm512_loadu_ps(o + x), _mm512_load_ps(inv + x)));
      }
      transpose_f32(ot, BQ, out + (bh * L + i0) * Ev, Ev, Ev, mq);
      float* lse_row = lse + bh * L + i0;
      for (int64_t r = 0; r < mq; ++r) {
        lse_row[r] = lv[r] == 0.f ? std::numeric_limits<float>::infinity()
                                  : mv[r] * kLn2 + std::log(lv[r]);
      }
    }
  });
}
#endif

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
#if defined(CPU_CAPABILITY_AVX512)
  if (dtype == DType::kFloat32) {
    flash_forward(a, static_cast<float*>(out), static_cast<float*>(lse));
    return;
  }
#endif
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
