// fp32 GEMMs on the AMX tile unit (Sapphire Rapids and later: AMX-TILE, AMX-BF16, AVX512-BF16),
// for the fused layer forward's step shape (csrc/cpu/fused_layer.cpp): the gate sums transposed,
//   C[m, b] (+)= sum_k W[m, k] X[k, b]       m: weight rows, b < 32: batch lanes
// with fp32 accuracy from bf16 products ("bf16x3"): every fp32 value is split into three bf16
// pieces, v = v0 + v1 + v2 (v0 = bf16(v), v1 = bf16(v - v0), v2 = bf16(v - v0 - v1), each step
// exact in fp32), and a product w x is the sum of the six piece products whose order is at most
// 2^-16 of w x: w0 x0, w0 x1, w1 x0, w0 x2, w1 x1, w2 x0. The three left out are below 2^-24 of
// w x together (fp32's own rounding is 2^-24 per operation); the tile unit accumulates the
// products in fp32. A TDPBF16PS is 16 x 16 x 32 multiply-adds in 16 cycles, 16 times a core's
// AVX-512 FMA rate: six of them per fp32 product leave 2.7x, and the step's GEMM measured
// 1.6-1.75x of gemm.h's (bench/NOTES.md, "Layers: fp32 on the tile unit").
//
// Layouts (bf16 as uint16_t):
//   weights, "tiles": per block of 16 rows, per k-block of 32, the three pieces' 16 x 32 tiles
//     one after the other (512 elements each; rows past M and columns past K zero);
//   activations, "pairs": per piece, rows of k pairs, each [32 lanes][2] (VNNI: the pair's two
//     values side by side), kPairRow elements a row; rows past K / 2 zero.
// Denormals: the tile unit reads them as zero and flushes its results (a difference below
// 1.2e-38 absolute). inf, NaN and finite values beyond bf16's range (> 3.39e38) do not split:
// pack_rows and to_pairs report them, and their caller computes that call with fp32 FMAs (an inf
// input times pieces of opposite signs, or of 0, would give NaN where fp32 gives +-inf).
#pragma once

#if defined(CPU_CAPABILITY_AVX512)

#include <immintrin.h>

#include <cstdint>

#define PYSEQK_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512bf16")))

namespace pyseqk {
namespace cpu {
namespace amx {

constexpr int kPieces = 3;
constexpr int64_t kTileRows = 16;             // rows of W per tile, k pairs per tile of X
constexpr int64_t kTileK = 32;                // k per tile
constexpr int64_t kTileElems = kTileRows * kTileK;
constexpr int64_t kLanes = 32;                // batch lanes of X and C (two 16-lane tiles)
constexpr int64_t kPairRow = 2 * kLanes;      // elements per k-pair row of X

// Whether this CPU and OS run the tile unit (CPUID, and the kernel's permission for the tile
// data, asked once per process), and PYSEQK_CPU_AMX is not "0" (read at each call: tests switch
// it).
bool enabled();

// Tile-packed weights of a block of 16 rows (row r from src[r], zero where src[r] is null) over
// columns [0, kn): kn / 32 rounded up k-blocks, written to dst (kTileElems * kPieces each).
// false: a value did not split (inf, NaN, beyond bf16's range).
bool pack_rows(const float* const src[kTileRows], int64_t kn, uint16_t* dst);

// Rows [r0, r1) of a transposed fp32 matrix (rows of kLanes floats, ld apart) into pairs: k-pair
// row r / 2 of each piece (piece p at dst + p * piece_stride). r0 even; an odd r1's last pair
// takes 0 as its second value. false: a value did not split.
bool to_pairs(const float* src, int64_t ld, int64_t r0, int64_t r1, uint16_t* dst,
              int64_t piece_stride);

// C[m, :32] (+)= sum_k W[m, k] X[k, :32] for the 16-row blocks of W given (block_stride
// elements apart, k-blocks [kb0, kb0 + kbn) of each), X in pairs from its first k-pair row
// (pieces piece_stride apart), C rows of 32 floats. The calling thread must hold the tile
// configuration (TileConfig).
void gemm(const uint16_t* W, int64_t blocks, int64_t block_stride, int64_t kb0, int64_t kbn,
          const uint16_t* X, int64_t piece_stride, float* C, bool accumulate);

// Loads the tile configuration in the calling thread (all eight tiles 16 rows x 64 bytes) and
// releases the tile state when it goes out of scope.
class TileConfig {
 public:
  TileConfig();
  ~TileConfig();
  TileConfig(const TileConfig&) = delete;
  TileConfig& operator=(const TileConfig&) = delete;
};

}  // namespace amx
}  // namespace cpu
}  // namespace pyseqk

#endif
