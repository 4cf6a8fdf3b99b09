// The tile-unit GEMM of amx.h: the CPU check, the bf16x3 split and its two layouts, the kernel.
#include "cpu/amx.h"

#if defined(CPU_CAPABILITY_AVX512)

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace pyseqk {
namespace cpu {
namespace amx {

namespace {

// Linux's arch_prctl request for an XSAVE feature's state, and the tile data's feature number.
constexpr int kReqXcompPerm = 0x1023;
constexpr int kXfeatureTileData = 18;

bool usable() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d >> 24 & 1, tile_bf16 = d >> 22 & 1;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    const bool avx512_bf16 = a >> 5 & 1;
    return tile && tile_bf16 && avx512_bf16 &&
           syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
  }();
  return ok;
}

// Largest finite bf16: a finite value beyond it rounds to inf.
constexpr float kBf16Max = 3.38953139e38f;

// Lanes that the split cannot take: |v| > kBf16Max, inf and NaN.
PYSEQK_AMX_TARGET inline __mmask16 unsplittable(__m512 v) {
  return _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(kBf16Max), _CMP_NLE_UQ);
}

PYSEQK_AMX_TARGET inline __m512 widen(__m256bh v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)v), 16));
}

// v = p[0] + p[1] + p[2], each a bf16 rounded to nearest: 8 significant bits each, 24 in all
// (fp32's), so the sum is exact for normal values (each difference is exact in fp32).
PYSEQK_AMX_TARGET inline void split(__m512 v, __m256i p[kPieces]) {
  const __m256bh p0 = _mm512_cvtneps_pbh(v);
  const __m512 r1 = _mm512_sub_ps(v, widen(p0));
  const __m256bh p1 = _mm512_cvtneps_pbh(r1);
  const __m256bh p2 = _mm512_cvtneps_pbh(_mm512_sub_ps(r1, widen(p1)));
  p[0] = (__m256i)p0;
  p[1] = (__m256i)p1;
  p[2] = (__m256i)p2;
}

// split of a and b at once, as 16 pairs (a[i], b[i]) per piece: one two-vector conversion per
// piece, then the pairs' two halves widened back with a shift and a mask.
PYSEQK_AMX_TARGET inline void split_pairs(__m512 a, __m512 b, __m512i p[kPieces]) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                       8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int q = 0; q < kPieces; ++q) {
    // cvtne2ps_pbh(b, a): a's 16 bf16, then b's.
    p[q] = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    if (q + 1 < kPieces) {
      a = _mm512_sub_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(p[q], 16)));
      b = _mm512_sub_ps(b, _mm512_castsi512_ps(_mm512_and_si512(p[q], high)));
    }
  }
}

template <bool kTwo>
PYSEQK_AMX_TARGET void gemm_blocks(const uint16_t* W, int64_t block_stride, int64_t kb0,
                                   int64_t kbn, const uint16_t* X, int64_t piece_stride,
                                   float* C, bool accumulate) {
  constexpr int kLdc = kLanes * sizeof(float), kLdx = kPairRow * sizeof(uint16_t);
  float* const C2 = C + kTileRows * kLanes;
  if (accumulate) {
    _tile_loadd(0, C, kLdc);
    _tile_loadd(1, C + 16, kLdc);
    if (kTwo) {
      _tile_loadd(2, C2, kLdc);
      _tile_loadd(3, C2 + 16, kLdc);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    if (kTwo) {
      _tile_zero(2);
      _tile_zero(3);
    }
  }
  for (int64_t kb = 0; kb < kbn; ++kb) {
    const uint16_t* w = W + (kb0 + kb) * kPieces * kTileElems;
    const uint16_t* x = X + kb * kTileRows * kPairRow;
    // w's piece p against x's pieces q <= 2 - p: each w tile loaded once a k-block (they come
    // from L2: a thread's slice is 384 KB-1.5 MB), x's again per piece of w (6 KB a k-block,
    // in L1). x-stationary, w's tiles loaded twice as often: RNN 2.42 -> 2.26 ms, GRU 5.28 ->
    // 5.05 (T = 100, B = 32, H = 256, one process alternating the two).
    for (int p = 0; p < kPieces; ++p) {
      _tile_loadd(4, w + p * kTileElems, kTileK * 2);
      if (kTwo) _tile_loadd(5, w + p * kTileElems + block_stride, kTileK * 2);
      for (int q = 0; q + p < kPieces; ++q) {
        _tile_loadd(6, x + q * piece_stride, kLdx);
        _tile_loadd(7, x + q * piece_stride + kLanes, kLdx);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (kTwo) {
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
    }
  }
  _tile_stored(0, C, kLdc);
  _tile_stored(1, C + 16, kLdc);
  if (kTwo) {
    _tile_stored(2, C2, kLdc);
    _tile_stored(3, C2 + 16, kLdc);
  }
}

struct alignas(64) Palette1 {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

PYSEQK_AMX_TARGET void load_config() {
  Palette1 cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // Not _tile_loadconfig: GCC 12's declares a read of 8 bytes only, and the stores to colsb and
  // rows were dropped as dead (the first tile instruction then raised SIGILL).
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

PYSEQK_AMX_TARGET void release() { _tile_release(); }

}  // namespace

bool enabled() {
  const char* env = std::getenv("PYSEQK_CPU_AMX");
  return usable() && !(env && std::strcmp(env, "0") == 0);
}

PYSEQK_AMX_TARGET bool pack_rows(const float* const src[kTileRows], int64_t kn, uint16_t* dst) {
  __mmask16 bad = 0;
  for (int64_t kb = 0; kb * kTileK < kn; ++kb) {
    uint16_t* tiles = dst + kb * kPieces * kTileElems;
    for (int r = 0; r < kTileRows; ++r) {
      for (int h = 0; h < 2; ++h) {
        const int64_t k = kb * kTileK + h * 16, n = std::min<int64_t>(16, kn - k);
        const __m512 v = src[r] && n > 0
            ? _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), src[r] + k)
            : _mm512_setzero_ps();
        bad |= unsplittable(v);
        __m256i p[kPieces];
        split(v, p);
        for (int q = 0; q < kPieces; ++q) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(tiles + q * kTileElems + r * kTileK +
                                                         h * 16), p[q]);
        }
      }
    }
  }
  return bad == 0;
}

PYSEQK_AMX_TARGET bool to_pairs(const float* src, int64_t ld, int64_t r0, int64_t r1,
                                uint16_t* dst, int64_t piece_stride) {
  __mmask16 bad = 0;
  for (int64_t r = r0; r < r1; r += 2) {
    for (int h = 0; h < 2; ++h) {
      const __m512 a = _mm512_loadu_ps(src + r * ld + h * 16);
      const __m512 b = r + 1 < r1 ? _mm512_loadu_ps(src + (r + 1) * ld + h * 16)
                                  : _mm512_setzero_ps();
      bad |= unsplittable(a) | unsplittable(b);
      __m512i p[kPieces];
      split_pairs(a, b, p);
      uint16_t* row = dst + r / 2 * kPairRow + h * kLanes;
      for (int q = 0; q < kPieces; ++q) _mm512_storeu_si512(row + q * piece_stride, p[q]);
    }
  }
  return bad == 0;
}

void gemm(const uint16_t* W, int64_t blocks, int64_t block_stride, int64_t kb0, int64_t kbn,
          const uint16_t* X, int64_t piece_stride, float* C, bool accumulate) {
  int64_t m = 0;
  for (; m + 2 <= blocks; m += 2) {
    gemm_blocks<true>(W + m * block_stride, block_stride, kb0, kbn, X, piece_stride,
                      C + m * kTileRows * kLanes, accumulate);
  }
  if (m < blocks) {
    gemm_blocks<false>(W + m * block_stride, block_stride, kb0, kbn, X, piece_stride,
                       C + m * kTileRows * kLanes, accumulate);
  }
}

TileConfig::TileConfig() { load_config(); }
TileConfig::~TileConfig() { release(); }

}  // namespace amx
}  // namespace cpu
}  // namespace pyseqk

#endif
