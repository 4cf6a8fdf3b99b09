// fp32 GEMMs on the AMX tile unit (Sapphire Rapids and later: AMX-TILE, AMX-BF16, AVX512-BF16),
// for the fused layer forward's step shape (csrc/cpu/fused_layer_tiles.cpp): the gate sums of a
// batch of up to 32 rows,
//   C[b, n] (+)= sum_k X[b, k] W[n, k]       b: batch rows, n: weight rows (gate units)
// with fp32 accuracy from bf16 products ("bf16x3"): every fp32 value is split into three bf16
// pieces, v = v0 + v1 + v2 (v0 = bf16(v), v1 = bf16(v - v0), v2 = bf16(v - v0 - v1), each step
// exact in fp32), and a product w x is the sum of the six piece products whose order is at most
// 2^-16 of w x: w0 x0, w0 x1, w1 x0, w0 x2, w1 x1, w2 x0. The three left out are below 2^-24 of
// w x together (fp32's own rounding is 2^-24 per operation); the tile unit accumulates the
// products in fp32. A TDPBF16PS is 16 x 16 x 32 multiply-adds in 16 cycles, 16 times a core's
// AVX-512 FMA rate: six of them per fp32 product leave 2.7x; a step's GEMM measured 1.6-1.75x
// of gemm.h's (bench/NOTES.md, "Layers: fp32 on the AMX tile unit").
//
// Layouts (bf16 as uint16_t), k in "pair order" within each k-block of 32: the pair (j, 16 + j)
// side by side, j < 16 (any order of k gives the same sums as long as X and W agree; this one
// lets a row's 32 values split with one two-vector conversion per piece into one full 64-byte
// store, split_pairs):
//   X, "rows": per piece, per k-block (kb_stride elements apart), rows of its 32 values ldx
//     elements apart (row-major: kb_stride 32; the fused forward's blocks: ldx 32, so that a
//     thread's columns are one contiguous region and a tile one contiguous 1 KB); columns past K
//     and rows past the batch zero;
//   W, "tiles": per block of 16 weight rows (n), per k-block of 32, the three pieces' tiles one
//     after the other, each [16 pairs][16 n][2] (VNNI: a pair's two values side by side), 512
//     elements; rows past N and columns past K zero.
// Denormals: the tile unit reads them as zero and flushes its results (a difference below
// 1.2e-38 absolute). inf, NaN and finite values beyond bf16's range (> 3.39e38) do not split:
// the functions that split report them, and their caller computes that call with fp32 FMAs (an
// inf input times pieces of opposite signs, or of 0, would give NaN where fp32 gives +-inf).
#pragma once

#if defined(CPU_CAPABILITY_AVX512)

#include <immintrin.h>

#include <cstdint>

#define PYSEQK_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512bf16")))

namespace pyseqk {
namespace cpu {
namespace amx {

constexpr int kPieces = 3;
constexpr int64_t kTileRows = 16;  // rows of X and C per tile, weight rows (n) per tile of W
constexpr int64_t kTileK = 32;     // k per tile
constexpr int64_t kTileElems = kTileRows * kTileK;

// Whether this CPU and OS run the tile unit (CPUID, and the kernel's permission for the tile
// data, asked once per process), and PYSEQK_CPU_AMX is not "0" (read at each call: tests switch
// it).
bool enabled();

// The tiles of one block of 16 weight rows from the weights transposed: wt[k * ld + n] for
// k < kn, n < 16 (wt's columns past the block's rows must be zero): kn / 32 rounded up k-blocks,
// written to dst (kPieces * kTileElems each). false: a value did not split.
bool pack_tiles(const float* wt, int64_t ld, int64_t kn, uint16_t* dst);

// n fp32 values of a row of X, from the start of a k-block (dst: the row in it), into its pieces
// (piece q at dst + q * piece_stride, k-blocks kb_stride apart), in pair order: whole k-blocks,
// zeros past n. false: a value did not split.
bool split_row(const float* src, int64_t n, uint16_t* dst, int64_t kb_stride,
               int64_t piece_stride);

// C[b, n] (+)= sum_k X[b, k] W[n, k] for b < 16 * halves (halves: 1 or 2) and the n of the
// blocks of W given (block_stride elements apart, k-blocks [kb0, kb0 + kbn) of each), X's
// k-blocks from its first (X's layout above), C rows ldc apart; pieces: kPieces (fp32), or 1
// (the products of the first pieces only: bf16 operands). The calling thread must hold the tile
// configuration (TileConfig).
void gemm(const uint16_t* W, int64_t blocks, int64_t block_stride, int64_t kb0, int64_t kbn,
          const uint16_t* X, int64_t x_kb_stride, int64_t ldx, int64_t piece_stride, int halves,
          int pieces, float* C, int64_t ldc, bool accumulate);

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
