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

// a and b as 16 pairs (a[i], b[i]) of bf16 per piece, a = a0 + a1 + a2 (and b): each piece
// rounded to nearest, 8 significant bits each, 24 in all (fp32's), so the sum is exact for normal
// values (each difference is exact in fp32). One two-vector conversion per piece, then the
// pairs' two halves widened back with a shift and a mask.
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

// Tiles 0-3 of C: (rows 0-15, block 0), (rows 0-15, block 1), (rows 16-31, block 0), (rows
// 16-31, block 1); kTwo: two blocks of W, kHalves: both 16-row halves of X.
template <bool kTwo, bool kHalves>
PYSEQK_AMX_TARGET void gemm_blocks(const uint16_t* W, int64_t block_stride, int64_t kb0,
                                   int64_t kbn, const uint16_t* X, int64_t x_kb_stride,
                                   int64_t ldx, int64_t piece_stride, int pieces, float* C,
                                   int64_t ldc, bool accumulate) {
  const int64_t c_stride = ldc * sizeof(float), x_stride = ldx * sizeof(uint16_t);
  float* const C2 = C + kTileRows * ldc;
  const uint16_t* const X2 = X + kTileRows * ldx;
  if (accumulate) {
    _tile_loadd(0, C, c_stride);
    if (kTwo) _tile_loadd(1, C + 16, c_stride);
    if (kHalves) _tile_loadd(2, C2, c_stride);
    if (kTwo && kHalves) _tile_loadd(3, C2 + 16, c_stride);
  } else {
    _tile_zero(0);
    if (kTwo) _tile_zero(1);
    if (kHalves) _tile_zero(2);
    if (kTwo && kHalves) _tile_zero(3);
  }
  for (int64_t kb = 0; kb < kbn; ++kb) {
    const uint16_t* w = W + (kb0 + kb) * kPieces * kTileElems;
    const int64_t xk = kb * x_kb_stride;
    // w's piece p against x's pieces q <= 2 - p: each w tile loaded once a k-block (they come
    // from L2: a thread's slice is 384 KB-1.5 MB), x's again per piece of w (6 KB a k-block,
    // in L1). x-stationary, w's tiles loaded twice as often: RNN 2.42 -> 2.26 ms, GRU 5.28 ->
    // 5.05 (T = 100, B = 32, H = 256, one process alternating the two).
    for (int p = 0; p < pieces; ++p) {
      _tile_loadd(4, w + p * kTileElems, kTileK * 2);
      if (kTwo) _tile_loadd(5, w + p * kTileElems + block_stride, kTileK * 2);
      for (int q = 0; q + p < pieces; ++q) {
        _tile_loadd(6, X + q * piece_stride + xk, x_stride);
        _tile_dpbf16ps(0, 6, 4);
        if (kTwo) _tile_dpbf16ps(1, 6, 5);
        if (kHalves) {
          _tile_loadd(7, X2 + q * piece_stride + xk, x_stride);
          _tile_dpbf16ps(2, 7, 4);
          if (kTwo) _tile_dpbf16ps(3, 7, 5);
        }
      }
    }
  }
  _tile_stored(0, C, c_stride);
  if (kTwo) _tile_stored(1, C + 16, c_stride);
  if (kHalves) _tile_stored(2, C2, c_stride);
  if (kTwo && kHalves) _tile_stored(3, C2 + 16, c_stride);
}

template <bool kHalves>
void gemm_halves(const uint16_t* W, int64_t blocks, int64_t block_stride, int64_t kb0,
                 int64_t kbn, const uint16_t* X, int64_t x_kb_stride, int64_t ldx,
                 int64_t piece_stride, int pieces, float* C, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + 2 <= blocks; m += 2) {
    gemm_blocks<true, kHalves>(W + m * block_stride, block_stride, kb0, kbn, X, x_kb_stride, ldx,
                               piece_stride, pieces, C + m * kTileRows, ldc, accumulate);
  }
  if (m < blocks) {
    gemm_blocks<false, kHalves>(W + m * block_stride, block_stride, kb0, kbn, X, x_kb_stride,
                                ldx, piece_stride, pieces, C + m * kTileRows, ldc, accumulate);
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

PYSEQK_AMX_TARGET bool pack_tiles(const float* wt, int64_t ld, int64_t kn, uint16_t* dst) {
  __mmask16 bad = 0;
  for (int64_t kb = 0; kb * kTileK < kn; ++kb) {
    uint16_t* tiles = dst + kb * kPieces * kTileElems;
    for (int64_t kp = 0; kp < kTileRows; ++kp) {  // tile row kp: k = kp, kp + 16 (see kOrder)
      const int64_t k = kb * kTileK + kp;
      const __m512 a = k < kn ? _mm512_loadu_ps(wt + k * ld) : _mm512_setzero_ps();
      const __m512 b = k + 16 < kn ? _mm512_loadu_ps(wt + (k + 16) * ld) : _mm512_setzero_ps();
      bad |= unsplittable(a) | unsplittable(b);
      __m512i p[kPieces];
      split_pairs(a, b, p);
      for (int q = 0; q < kPieces; ++q) {
        _mm512_storeu_si512(tiles + q * kTileElems + kp * kTileRows * 2, p[q]);
      }
    }
  }
  return bad == 0;
}

PYSEQK_AMX_TARGET bool split_row(const float* src, int64_t n, uint16_t* dst,
                                 int64_t kb_stride, int64_t piece_stride) {
  auto mask = [n](int64_t i) {
    return static_cast<__mmask16>(n - i >= 16 ? 0xffff : n - i <= 0 ? 0 : (1u << (n - i)) - 1);
  };
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += kTileK) {
    const __m512 a = _mm512_maskz_loadu_ps(mask(i), src + i);
    const __m512 b = _mm512_maskz_loadu_ps(mask(i + 16), src + i + 16);
    bad |= unsplittable(a) | unsplittable(b);
    __m512i p[kPieces];
    split_pairs(a, b, p);
    uint16_t* const block = dst + i / kTileK * kb_stride;
    for (int q = 0; q < kPieces; ++q) _mm512_storeu_si512(block + q * piece_stride, p[q]);
  }
  return bad == 0;
}

void gemm(const uint16_t* W, int64_t blocks, int64_t block_stride, int64_t kb0, int64_t kbn,
          const uint16_t* X, int64_t x_kb_stride, int64_t ldx, int64_t piece_stride, int halves,
          int pieces, float* C, int64_t ldc, bool accumulate) {
  (halves == 2 ? gemm_halves<true> : gemm_halves<false>)(W, blocks, block_stride, kb0, kbn, X,
                                                          x_kb_stride, ldx, piece_stride, pieces,
                                                          C, ldc, accumulate);
}

TileConfig::TileConfig() { load_config(); }
TileConfig::~TileConfig() { release(); }

}  // namespace amx
}  // namespace cpu
}  // namespace pyseqk

#endif
