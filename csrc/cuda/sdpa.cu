// Fused scaled-dot-product attention on NVIDIA GPUs (FlashAttention-2 scheme): the forward
// streams key/value tiles through shared memory with an online softmax and writes the
// logsumexp; the backward recomputes the probabilities from it, dK/dV in one pass per key block
// (looping over queries and over the query heads of a GQA group) and dQ in a second pass per
// query block, so no gradient is accumulated atomically and the result is deterministic.
//
// Two families of kernels:
//  * tensor cores, fp16/bf16 with fp32 accumulation: mma.sync.m16n8k16 (sm_80+; also what
//    sm_90 runs, without wgmma/TMA, see bench/NOTES.md). Each warp owns 16 rows; the score tile
//    stays in the mma accumulator layout and is repacked in registers as the A operand of the
//    next product (P @ V, dS @ K, ...), as FlashAttention-2 does. Head dims are padded with
//    zeros to a bucket: 64, 128, 256 forward; 64, 128 backward. Tiles reach shared memory by
//    16-byte loads (cp.async, two K/V pairs deep, in the forward and dQ kernels: KvTiles) and
//    fragments leave it by ldmatrix. Measured on an H200: bench/NOTES.md, "First GPU run".
//  * SIMT (FMA), every dtype and head dim <= 256: fp32 and fp64 inputs, and fp16/bf16 head dims
//    above 128 in the backward (register budget). 16 x 16 tiles, fp32 (fp64) in shared memory.
// Scores live in the log2 domain (scale * log2 e folded into one multiply) so softmax is exp2.
// Torch-free; pointers and strides come from csrc/ops/sdpa_cuda.cpp (see pyseqk/sdpa_cuda.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pyseqk/dropout_hash.h"
#include "pyseqk/sdpa_cuda.h"

namespace pyseqk {
namespace cuda {
namespace {

// double so that the fp64 kernels get them exactly; float code converts at compile time.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
constexpr int kThreads = 128;  // 4 warps in every kernel below

// ------------------------------------------------------------------------------------------
// Element access

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_acc(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <class T> __device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

// The (b, h) coordinates of a flat block index over (row block, b * heads): blocks of one head
// are adjacent (they share K/V in L2); with is_causal the longest row blocks go first.
struct BlockPos {
  int64_t b, h, bh;
  int64_t blk;
};
__device__ __forceinline__ BlockPos block_pos(int64_t n_blocks, int64_t heads, bool reverse) {
  BlockPos pos;
  const int64_t flat = blockIdx.x;
  pos.bh = flat / n_blocks;
  pos.blk = flat - pos.bh * n_blocks;
  if (reverse) pos.blk = n_blocks - 1 - pos.blk;
  pos.b = pos.bh / heads;
  pos.h = pos.bh - pos.b * heads;
  return pos;
}

// What a kernel needs to turn a raw score q.k into the log2-domain logit of element (i, j),
// or -inf when (i, j) takes no part (out of range, causal, bool mask).
template <class T, class A>
struct Scorer {
  const char* mask;  // at (b, h); nullptr when there is no mask
  int64_t ms_i, ms_j;
  int64_t L, S;
  A qk_scale;  // scale * log2(e)
  MaskKind kind;
  bool causal;

  __device__ __forceinline__ Scorer(const SdpaParams& p, int64_t b, int64_t h)
      : mask(nullptr), ms_i(p.mask_stride[2]), ms_j(p.mask_stride[3]), L(p.L), S(p.S),
        qk_scale(A(p.scale * kLog2e)), kind(p.mask_kind), causal(p.is_causal) {
    if (kind != MaskKind::kNone) {
      const int64_t esize = kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
      mask = static_cast<const char*>(p.mask) + (b * p.mask_stride[0] + h * p.mask_stride[1]) * esize;
    }
  }

  __device__ __forceinline__ A operator()(A raw, int64_t i, int64_t j) const {
    if (i >= L || j >= S || (causal && j > i)) return A(-INFINITY);
    A s = raw * qk_scale;
    if (kind == MaskKind::kBool) {
      if (reinterpret_cast<const uint8_t*>(mask)[i * ms_i + j * ms_j] == 0) return A(-INFINITY);
    } else if (kind == MaskKind::kAdditive) {
      s += A(to_acc(reinterpret_cast<const T*>(mask)[i * ms_i + j * ms_j])) * A(kLog2e);
    }
    return s;
  }
};

struct Dropout {
  uint32_t seed, threshold;
  float scale;     // 1 / (1 - p); 0 when p = 1 (nothing is kept)
  double scale64;  // the same for the fp64 kernels
  bool on;
  template <class A>
  __device__ __forceinline__ A factor() const;
  __device__ __forceinline__ uint32_t row(int64_t bh, int64_t i) const {
    return dropout::row_key(seed, uint32_t(bh), uint32_t(i));
  }
  __device__ __forceinline__ bool keep(uint32_t row_key, int64_t j) const {
    return dropout::keep(row_key, uint32_t(j), threshold);
  }
};

template <> __device__ __forceinline__ float Dropout::factor<float>() const { return scale; }
template <> __device__ __forceinline__ double Dropout::factor<double>() const { return scale64; }

// lse (natural log, -inf for an empty row) as the log2-domain subtrahend of the backward:
// +inf for an empty row so that exp2(-inf - inf) = 0 rather than NaN.
template <class A>
__device__ __forceinline__ A lse2_of(float lse) {
  return lse == -INFINITY ? A(INFINITY) : A(lse) * A(kLog2e);
}

// 2^x on the SFU (ex2.approx.ftz: 2 ulp, 2^-inf = +0), as FlashAttention's exp2f under fast math.
// The build has no --use_fast_math (it made the cells' and Bahdanau's expf/tanhf 50 ulp off torch
// on an H200), so the one place that wants the approximation asks for it here.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <class A>
__device__ __forceinline__ A exp2_(A x) { return exp2(x); }
template <>
__device__ __forceinline__ float exp2_<float>(float x) { return fast_exp2(x); }

// Copy a [rows, cols] tile of a strided tensor into shared memory (row stride ld), zero outside
// [n_rows, n_cols): the zero padding of head dims and of the last tile makes every product safe.
template <class T, class S>
__device__ __forceinline__ void load_tile(S* dst, int ld, const T* src, int64_t s_row,
                                          int64_t s_col, int64_t row0, int64_t n_rows,
                                          int64_t n_cols, int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx - r * cols;
    const int64_t gr = row0 + r;
    S x = S(0.0f);
    if (gr < n_rows && c < n_cols) x = static_cast<S>(to_acc(src[gr * s_row + c * s_col]));
    dst[r * ld + c] = x;
  }
}
// Same for a [ROWS, COLS] tile of 16-bit T into T-typed shared memory (no conversion), all 128
// threads. Where the rows are contiguous and 16-byte aligned, each thread first issues its
// 16-byte loads, 4 at a time (unrolled: all 4 in flight at once), then stores them; the
// element-wise loop it replaces kept one 2-byte load in flight per thread and made the H200's
// forward 15x slower than torch's (9 TFLOP/s). Other strides take the element-wise loop.
template <int ROWS, int COLS, int MAX_IN_FLIGHT = 4, class T>
__device__ __forceinline__ void load_tile_raw(T* dst, int ld, const T* src, int64_t s_row,
                                              int64_t s_col, int64_t row0, int64_t n_rows,
                                              int64_t n_cols) {
  static_assert(sizeof(T) == 2 && COLS % 8 == 0, "16-bit types, whole 16-byte chunks");
  constexpr int kChunkCols = COLS / 8, kChunks = ROWS * kChunkCols;
  constexpr int kPer = (kChunks + kThreads - 1) / kThreads;
  const bool vec = s_col == 1 && s_row % 8 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (!vec) {
    for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
      const int r = idx / COLS, c = idx - r * COLS;
      const int64_t gr = row0 + r;
      dst[r * ld + c] =
          (gr < n_rows && c < n_cols) ? src[gr * s_row + c * s_col] : from_acc<T>(0.0f);
    }
    return;
  }
  // In batches of MAX_IN_FLIGHT chunks (64 bytes in flight per thread at 4): all kPer at once
  // spilled at D=256; kernels near the 255-register cap ask for 1.
  // The batches stay a loop there (unroll 1): unrolled, the compiler hoists every load anyway.
  constexpr int kBatch = kPer < MAX_IN_FLIGHT ? kPer : MAX_IN_FLIGHT;
  constexpr int kUnroll = MAX_IN_FLIGHT >= 4 ? 16 : 1;
#pragma unroll kUnroll
  for (int k0 = 0; k0 < kPer; k0 += kBatch) {
    uint4 v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int idx = threadIdx.x + (k0 + k) * kThreads;
      const int r = idx / kChunkCols, c = (idx % kChunkCols) * 8;
      const int64_t gr = row0 + r;
      v[k] = make_uint4(0u, 0u, 0u, 0u);
      if ((kChunks % kThreads == 0 || idx < kChunks) && gr < n_rows && c < n_cols) {
        const T* g = src + gr * s_row + c;
        if (c + 8 <= n_cols) {
          v[k] = *reinterpret_cast<const uint4*>(g);
        } else {  // the head dim ends inside this chunk: zero the rest
          uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (c + e < n_cols) {
              w[e / 2] |= uint32_t(reinterpret_cast<const uint16_t*>(g)[e]) << (16 * (e % 2));
            }
          }
          v[k] = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int idx = threadIdx.x + (k0 + k) * kThreads;
      if ((kChunks % kThreads == 0 || idx < kChunks) && k0 + k < kPer) {
        const int r = idx / kChunkCols, c = (idx % kChunkCols) * 8;
        *reinterpret_cast<uint4*>(dst + r * ld + c) = v[k];
      }
    }
  }
}

// Asynchronous copy (cp.async, sm_80+) of a [ROWS, COLS] tile of 16-bit T into shared memory,
// 16 bytes per instruction, rows at or past n_rows and columns past n_cols zero-filled (a source
// size of 0 reads nothing). Only where async_tile_ok(): rows contiguous and 16-byte aligned,
// n_cols a multiple of 8 (a chunk is wholly inside the head dim or wholly outside).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
template <class T>
__device__ __forceinline__ bool async_tile_ok(const T* src, const int64_t* stride, int64_t n_cols) {
  return stride[3] == 1 && stride[2] % 8 == 0 && n_cols % 8 == 0 &&
         reinterpret_cast<uintptr_t>(src) % 16 == 0;
}
template <int ROWS, int COLS, class T>
__device__ __forceinline__ void load_tile_async(T* dst, int ld, const T* src, int64_t s_row,
                                                int64_t row0, int64_t n_rows, int64_t n_cols) {
  static_assert(sizeof(T) == 2 && COLS % 8 == 0, "16-bit types, whole 16-byte chunks");
  constexpr int kChunkCols = COLS / 8, kChunks = ROWS * kChunkCols;
#pragma unroll
  for (int k = 0; k < (kChunks + kThreads - 1) / kThreads; ++k) {
    const int idx = threadIdx.x + k * kThreads;
    if (kChunks % kThreads == 0 || idx < kChunks) {
      const int r = idx / kChunkCols, c = (idx % kChunkCols) * 8;
      const int64_t gr = row0 + r;
      const bool in = gr < n_rows && c < n_cols;
      const T* g = in ? src + gr * s_row + c : src;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                   :: "r"(smem_u32(dst + r * ld + c)), "l"(g), "r"(in ? 16 : 0));
    }
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

__device__ __forceinline__ const char* at_bh(const void* base, const int64_t* st, int64_t b,
                                             int64_t h, int64_t esize) {
  return static_cast<const char*>(base) + (b * st[0] + h * st[1]) * esize;
}

// ------------------------------------------------------------------------------------------
// Tensor-core building blocks: mma.sync.m16n8k16 with fp32 accumulation. Fragment layouts
// (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 g + t:
//   A 16x16 row-major: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B 16x8:            b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C 16x8:            c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// Two 16-bit values share a register, the lower column (or k) in the low half.

template <class T> struct Packed;
template <> struct Packed<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <> struct Packed<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <class T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4],
                                                        const uint32_t b[2]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Fragments come from shared memory through ldmatrix (sm_75+): one instruction per 8x8 16-bit
// matrix quad/pair, each lane giving one 16-byte row address (the tiles' rows are D + kPad
// elements, 16-byte aligned, and 8 consecutive rows fall in 8 different bank groups). The
// element-wise loads they replace cost 4 (A), 2 (B^T) and 4 16-bit loads plus packing (B) per
// fragment. asm volatile, as CUTLASS's, keeps them after the __syncthreads that publish a tile.
// A fragment of rows [r0, r0 + 16) and k columns [k0, k0 + 16) of a row-major smem tile:
// matrices (rows +0, k0), (rows +8, k0), (rows +0, k0 + 8), (rows +8, k0 + 8) = a0..a3.
template <class T>
__device__ __forceinline__ void frag_a(uint32_t a[4], const T* s, int ld, int r0, int k0) {
  const int lane = threadIdx.x & 31;
  const T* p = s + (r0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(smem_u32(p)));
}
// B fragment with B[k][n] = s[n0 + n][k0 + k] (s holds B transposed: K for Q K^T):
// matrices (rows n0.., k0) and (rows n0.., k0 + 8) = b0, b1.
template <class T>
__device__ __forceinline__ void frag_b_t(uint32_t b[2], const T* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  const T* p = s + (n0 + (lane & 7)) * ld + k0 + ((lane >> 3) & 1) * 8;
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b[0]), "=r"(b[1])
               : "r"(smem_u32(p)));
}
// B fragment with B[k][n] = s[k0 + k][n0 + n] (s holds B as is: V for P V): the transposed
// matrices (rows k0.., n0) and (rows k0 + 8.., n0) = b0, b1.
template <class T>
__device__ __forceinline__ void frag_b(uint32_t b[2], const T* s, int ld, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  const T* p = s + (k0 + (lane & 15)) * ld + n0;
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b[0]), "=r"(b[1])
               : "r"(smem_u32(p)));
}
// Two adjacent 16x8 accumulator tiles (k columns [0, 8) and [8, 16)) as one 16x16 A fragment.
template <class T>
__device__ __forceinline__ void acc_to_a(uint32_t a[4], const float lo[4], const float hi[4]) {
  a[0] = Packed<T>::pack(lo[0], lo[1]);
  a[1] = Packed<T>::pack(lo[2], lo[3]);
  a[2] = Packed<T>::pack(hi[0], hi[1]);
  a[3] = Packed<T>::pack(hi[2], hi[3]);
}

// acc[M16 x N] += A[M16 x K] (smem rows r0.., row-major) @ B where B[k][n] = bt[n][k].
template <class T, int N, int K>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const T* a_s, int lda, int r0,
                                        const T* bt_s, int ldb) {
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
    uint32_t a[4];
    frag_a(a, a_s, lda, r0, ks * 16);
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      uint32_t b[2];
      frag_b_t(b, bt_s, ldb, nt * 8, ks * 16);
      mma16816<T>(acc[nt], a, b);
    }
  }
}

// acc[M16 x N] += P[M16 x K] (accumulator layout, K / 8 tiles) @ B[K x N] (smem, row-major).
template <class T, int N, int K>
__device__ __forceinline__ void mma_pb(float (&acc)[N / 8][4], const float (&p)[K / 8][4],
                                       const T* b_s, int ldb) {
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
    uint32_t a[4];
    acc_to_a<T>(a, p[2 * ks], p[2 * ks + 1]);
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      uint32_t b[2];
      frag_b(b, b_s, ldb, ks * 16, nt * 8);
      mma16816<T>(acc[nt], a, b);
    }
  }
}

// Transposed variant: acc[M16 x N] += P^T... is not needed: the dK/dV kernel computes S^T
// directly (keys as rows), so every product above has its A operand in registers or smem rows.

template <int D> struct TcFwdCfg { static constexpr int BM = 64, BN = 64; };
template <> struct TcFwdCfg<256> { static constexpr int BM = 64, BN = 32; };
constexpr int kPad = 8;  // 16 bytes of row padding: fragment loads of 8 rows hit 8 banks

// The (K, V) tiles of a loop over key blocks (forward, dQ), in shared memory at `base` as two
// (K, V) pairs. Where the rows allow cp.async (async_tile_ok), the next pair loads while this one
// is multiplied (FlashAttention-2's pipelining); otherwise pair 0 is loaded synchronously.
//   KvTiles<T, BN, D> kv(base, kg, vg, p, hi);
//   for (n0 = 0; n0 < hi; n0 += BN, kv.next()) { const T* ks = kv.acquire(n0); ... }
// acquire() has the barriers: the previous pair is consumed, this one has landed.
template <class T, int BN, int D>
struct KvTiles {
  static constexpr int LD = D + kPad;
  T* base;
  const T* kg;
  const T* vg;
  const SdpaParams& p;
  int64_t hi;
  bool pipelined;
  int buf = 0;

  __device__ __forceinline__ KvTiles(T* base_, const T* kg_, const T* vg_, const SdpaParams& p_,
                                     int64_t hi_)
      : base(base_), kg(kg_), vg(vg_), p(p_), hi(hi_),
        pipelined(async_tile_ok(kg_, p_.k_stride, p_.E) && async_tile_ok(vg_, p_.v_stride, p_.Ev)) {
    if (pipelined && hi > 0) issue(0, 0);
  }
  __device__ __forceinline__ void issue(int64_t n0, int b) {
    T* kb = base + b * 2 * BN * LD;
    load_tile_async<BN, D>(kb, LD, kg, p.k_stride[2], n0, p.S, p.E);
    load_tile_async<BN, D>(kb + BN * LD, LD, vg, p.v_stride[2], n0, p.S, p.Ev);
    cp_async_commit();
  }
  // K tile at key n0 (the V tile follows it, BN * LD elements on).
  __device__ __forceinline__ T* acquire(int64_t n0) {
    T* ks = base + buf * 2 * BN * LD;
    __syncthreads();  // the previous pair (and, the first time, anything else) is consumed
    if (pipelined) {
      if (n0 + BN < hi) {
        issue(n0 + BN, buf ^ 1);
        cp_async_wait<1>();  // this pair has landed, the next one is in flight
      } else {
        cp_async_wait<0>();
      }
    } else {
      constexpr int kInFlight = D >= 256 ? 1 : 4;  // the forward's o[] holds 128 registers at 256
      load_tile_raw<BN, D, kInFlight>(ks, LD, kg, p.k_stride[2], p.k_stride[3], n0, p.S, p.E);
      load_tile_raw<BN, D, kInFlight>(ks + BN * LD, LD, vg, p.v_stride[2], p.v_stride[3], n0,
                                      p.S, p.Ev);
    }
    __syncthreads();
    return ks;
  }
  __device__ __forceinline__ void next() { buf ^= pipelined ? 1 : 0; }
};

// ------------------------------------------------------------------------------------------
// Tensor-core forward. Block: 64 query rows (16 per warp) of one (b, h); loops over key tiles.

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 1) sdpa_fwd_tc(SdpaParams p, Dropout drop, T* out,
                                                        float* lse) {
  constexpr int BM = TcFwdCfg<D>::BM, BN = TcFwdCfg<D>::BN, LD = D + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* kv0 = qs + BM * LD;  // two (K, V) pairs: KvTiles

  const int64_t n_m = (p.L + BM - 1) / BM;
  const BlockPos pos = block_pos(n_m, p.Hq, p.is_causal);
  const int64_t hk = pos.h / (p.Hq / p.Hk);
  const int64_t m0 = pos.blk * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const Scorer<T, float> score(p, pos.b, pos.h);
  const int64_t i0 = m0 + warp * 16 + g, i1 = i0 + 8;
  uint32_t rk0 = 0, rk1 = 0;
  if (drop.on) {
    rk0 = drop.row(pos.bh, i0);
    rk1 = drop.row(pos.bh, i1);
  }

  load_tile_raw<BM, D>(qs, LD, reinterpret_cast<const T*>(at_bh(p.q, p.q_stride, pos.b, pos.h, sizeof(T))),
                p.q_stride[2], p.q_stride[3], m0, p.L, p.E);
  const T* kg = reinterpret_cast<const T*>(at_bh(p.k, p.k_stride, pos.b, hk, sizeof(T)));
  const T* vg = reinterpret_cast<const T*>(at_bh(p.v, p.v_stride, pos.b, hk, sizeof(T)));

  float o[D / 8][4];
#pragma unroll
  for (int d = 0; d < D / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m_0 = -INFINITY, m_1 = -INFINITY, l_0 = 0.0f, l_1 = 0.0f;

  const int64_t hi = p.is_causal ? (p.S < m0 + BM ? p.S : m0 + BM) : p.S;
  KvTiles<T, BN, D> kv(kv0, kg, vg, p, hi);
  for (int64_t n0 = 0; n0 < hi; n0 += BN, kv.next()) {
    const T* ks = kv.acquire(n0);
    const T* vs = ks + BN * LD;

    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    mma_abt<T, BN, D>(s, qs, LD, warp * 16, ks, LD);

    float mx0 = m_0, mx1 = m_1;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      const int64_t j = n0 + nt * 8 + 2 * t;
      s[nt][0] = score(s[nt][0], i0, j);
      s[nt][1] = score(s[nt][1], i0, j + 1);
      s[nt][2] = score(s[nt][2], i1, j);
      s[nt][3] = score(s[nt][3], i1, j + 1);
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    // The 4 lanes of a quad hold one row's columns.
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // A row with nothing unmasked so far keeps m = -inf: subtract 0 instead (no inf - inf).
    const float safe0 = mx0 == -INFINITY ? 0.0f : mx0, safe1 = mx1 == -INFINITY ? 0.0f : mx1;
    const float alpha0 = fast_exp2(m_0 - safe0), alpha1 = fast_exp2(m_1 - safe1);
    m_0 = mx0;
    m_1 = mx1;
    float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      const int64_t j = n0 + nt * 8 + 2 * t;
      s[nt][0] = fast_exp2(s[nt][0] - safe0);
      s[nt][1] = fast_exp2(s[nt][1] - safe0);
      s[nt][2] = fast_exp2(s[nt][2] - safe1);
      s[nt][3] = fast_exp2(s[nt][3] - safe1);
      sum0 += s[nt][0] + s[nt][1];
      sum1 += s[nt][2] + s[nt][3];
      if (drop.on) {  // after the row sum: the normaliser counts dropped elements too
        s[nt][0] = drop.keep(rk0, j) ? s[nt][0] * drop.scale : 0.0f;
        s[nt][1] = drop.keep(rk0, j + 1) ? s[nt][1] * drop.scale : 0.0f;
        s[nt][2] = drop.keep(rk1, j) ? s[nt][2] * drop.scale : 0.0f;
        s[nt][3] = drop.keep(rk1, j + 1) ? s[nt][3] * drop.scale : 0.0f;
      }
    }
    l_0 = l_0 * alpha0 + sum0;  // per-lane partial sums; the quad is summed at the end
    l_1 = l_1 * alpha1 + sum1;
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
      o[d][0] *= alpha0;
      o[d][1] *= alpha0;
      o[d][2] *= alpha1;
      o[d][3] *= alpha1;
    }
    mma_pb<T, D, BN>(o, s, vs, LD);
  }

  l_0 += __shfl_xor_sync(0xffffffffu, l_0, 1);
  l_0 += __shfl_xor_sync(0xffffffffu, l_0, 2);
  l_1 += __shfl_xor_sync(0xffffffffu, l_1, 1);
  l_1 += __shfl_xor_sync(0xffffffffu, l_1, 2);
  const float inv0 = l_0 > 0.0f ? 1.0f / l_0 : 0.0f, inv1 = l_1 > 0.0f ? 1.0f / l_1 : 0.0f;
  T* og = out + pos.bh * p.L * p.Ev;
#pragma unroll
  for (int d = 0; d < D / 8; ++d) {
    const int64_t c = d * 8 + 2 * t;
    if (i0 < p.L) {
      if (c < p.Ev) og[i0 * p.Ev + c] = from_acc<T>(o[d][0] * inv0);
      if (c + 1 < p.Ev) og[i0 * p.Ev + c + 1] = from_acc<T>(o[d][1] * inv0);
    }
    if (i1 < p.L) {
      if (c < p.Ev) og[i1 * p.Ev + c] = from_acc<T>(o[d][2] * inv1);
      if (c + 1 < p.Ev) og[i1 * p.Ev + c + 1] = from_acc<T>(o[d][3] * inv1);
    }
  }
  if (t == 0) {
    float* lg = lse + pos.bh * p.L;
    if (i0 < p.L) lg[i0] = l_0 > 0.0f ? (m_0 + log2f(l_0)) * float(kLn2) : -INFINITY;
    if (i1 < p.L) lg[i1] = l_1 > 0.0f ? (m_1 + log2f(l_1)) * float(kLn2) : -INFINITY;
  }
}

// ------------------------------------------------------------------------------------------
// Tensor-core backward, dQ: 64 query rows (16 per warp) of one (b, h), looping over key tiles.
//   P = exp2(S - lse2), dP = dO V^T (dropout-masked), dS = P (dP - delta), dQ += dS K.

template <int D> struct TcBwdCfg { static constexpr int BM = 64, BN = 64, BMI = 64; };
template <> struct TcBwdCfg<128> { static constexpr int BM = 64, BN = 32, BMI = 16; };

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 1) sdpa_bwd_dq_tc(SdpaParams p, Dropout drop,
                                                           const T* dout, int64_t go_s0, int64_t go_s1,
                                                           int64_t go_s2, int64_t go_s3,
                                                           const float* lse, const float* delta,
                                                           T* dq) {
  constexpr int BM = TcBwdCfg<D>::BM, BN = TcBwdCfg<D>::BN, LD = D + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* dos = qs + BM * LD;
  T* kv0 = dos + BM * LD;  // two (K, V) pairs: KvTiles

  const int64_t n_m = (p.L + BM - 1) / BM;
  const BlockPos pos = block_pos(n_m, p.Hq, p.is_causal);
  const int64_t hk = pos.h / (p.Hq / p.Hk);
  const int64_t m0 = pos.blk * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const Scorer<T, float> score(p, pos.b, pos.h);
  const int64_t i0 = m0 + warp * 16 + g, i1 = i0 + 8;
  const float* lse_bh = lse + pos.bh * p.L;
  const float* delta_bh = delta + pos.bh * p.L;
  const float l2_0 = i0 < p.L ? lse2_of<float>(lse_bh[i0]) : INFINITY;
  const float l2_1 = i1 < p.L ? lse2_of<float>(lse_bh[i1]) : INFINITY;
  const float dl_0 = i0 < p.L ? delta_bh[i0] : 0.0f, dl_1 = i1 < p.L ? delta_bh[i1] : 0.0f;
  uint32_t rk0 = 0, rk1 = 0;
  if (drop.on) {
    rk0 = drop.row(pos.bh, i0);
    rk1 = drop.row(pos.bh, i1);
  }

  load_tile_raw<BM, D>(qs, LD, reinterpret_cast<const T*>(at_bh(p.q, p.q_stride, pos.b, pos.h, sizeof(T))),
                p.q_stride[2], p.q_stride[3], m0, p.L, p.E);
  const int64_t go_st[4] = {go_s0, go_s1, go_s2, go_s3};
  load_tile_raw<BM, D>(dos, LD, reinterpret_cast<const T*>(at_bh(dout, go_st, pos.b, pos.h, sizeof(T))),
                go_s2, go_s3, m0, p.L, p.Ev);
  const T* kg = reinterpret_cast<const T*>(at_bh(p.k, p.k_stride, pos.b, hk, sizeof(T)));
  const T* vg = reinterpret_cast<const T*>(at_bh(p.v, p.v_stride, pos.b, hk, sizeof(T)));

  float acc[D / 8][4];
#pragma unroll
  for (int d = 0; d < D / 8; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.0f;

  const int64_t hi = p.is_causal ? (p.S < m0 + BM ? p.S : m0 + BM) : p.S;
  KvTiles<T, BN, D> kv(kv0, kg, vg, p, hi);
  for (int64_t n0 = 0; n0 < hi; n0 += BN, kv.next()) {
    const T* ks = kv.acquire(n0);
    const T* vs = ks + BN * LD;

    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
    mma_abt<T, BN, D>(s, qs, LD, warp * 16, ks, LD);
    mma_abt<T, BN, D>(dp, dos, LD, warp * 16, vs, LD);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      const int64_t j = n0 + nt * 8 + 2 * t;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = e < 2 ? i0 : i1;
        const int64_t jj = j + (e & 1);
        const float pr = fast_exp2(score(s[nt][e], i, jj) - (e < 2 ? l2_0 : l2_1));
        float d = dp[nt][e];
        if (drop.on) d = drop.keep(e < 2 ? rk0 : rk1, jj) ? d * drop.scale : 0.0f;
        s[nt][e] = pr * (d - (e < 2 ? dl_0 : dl_1));  // dS
      }
    }
    mma_pb<T, D, BN>(acc, s, ks, LD);
  }

  T* dqg = dq + pos.bh * p.L * p.E;
  const float sc = float(p.scale);
#pragma unroll
  for (int d = 0; d < D / 8; ++d) {
    const int64_t c = d * 8 + 2 * t;
    if (i0 < p.L) {
      if (c < p.E) dqg[i0 * p.E + c] = from_acc<T>(acc[d][0] * sc);
      if (c + 1 < p.E) dqg[i0 * p.E + c + 1] = from_acc<T>(acc[d][1] * sc);
    }
    if (i1 < p.L) {
      if (c < p.E) dqg[i1 * p.E + c] = from_acc<T>(acc[d][2] * sc);
      if (c + 1 < p.E) dqg[i1 * p.E + c + 1] = from_acc<T>(acc[d][3] * sc);
    }
  }
}

// Tensor-core backward, dK and dV: 64 keys (16 per warp) of one (b, kv head), looping over the
// query tiles of every query head of the GQA group. Computed transposed (keys as rows) so that
// S^T = K Q^T, dP^T = V dO^T, dV += P^T dO and dK += dS^T Q all take A from registers or smem.
// kDK / kDV: which gradients this launch accumulates. Both at D = 64; at D = 128 the two
// [16, 128] fp32 accumulators of a warp (128 registers) leave too few for the rest, so dV and
// dK are two launches (S^T is computed twice: 5 products instead of 4, and no spills).
template <class T, int D, bool kDK, bool kDV>
__global__ void __launch_bounds__(kThreads, 1) sdpa_bwd_dkdv_tc(SdpaParams p, Dropout drop,
                                                             const T* dout, int64_t go_s0,
                                                             int64_t go_s1, int64_t go_s2,
                                                             int64_t go_s3, const float* lse,
                                                             const float* delta, T* dk, T* dv) {
  constexpr int BN = 64, BMI = TcBwdCfg<D>::BMI, LD = D + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + BN * LD;
  T* qs = vs + BN * LD;
  T* dos = qs + BMI * LD;
  float* l2s = reinterpret_cast<float*>(dos + BMI * LD);
  float* dls = l2s + BMI;

  const int64_t group = p.Hq / p.Hk;
  const int64_t n_n = (p.S + BN - 1) / BN;
  const BlockPos pos = block_pos(n_n, p.Hk, false);  // pos.h is the kv head
  const int64_t n0 = pos.blk * BN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t j0 = n0 + warp * 16 + g, j1 = j0 + 8;  // this lane's key rows

  load_tile_raw<BN, D>(ks, LD, reinterpret_cast<const T*>(at_bh(p.k, p.k_stride, pos.b, pos.h, sizeof(T))),
                p.k_stride[2], p.k_stride[3], n0, p.S, p.E);
  load_tile_raw<BN, D>(vs, LD, reinterpret_cast<const T*>(at_bh(p.v, p.v_stride, pos.b, pos.h, sizeof(T))),
                p.v_stride[2], p.v_stride[3], n0, p.S, p.Ev);

  float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
  for (int d = 0; d < D / 8; ++d)
    dka[d][0] = dka[d][1] = dka[d][2] = dka[d][3] = dva[d][0] = dva[d][1] = dva[d][2] = dva[d][3] = 0.0f;

  const int64_t go_st[4] = {go_s0, go_s1, go_s2, go_s3};
  const int64_t lo = p.is_causal ? (n0 / BMI) * BMI : 0;  // earlier queries see none of these
  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t h = pos.h * group + gi, bh = pos.b * p.Hq + h;
    const Scorer<T, float> score(p, pos.b, h);
    const T* qg = reinterpret_cast<const T*>(at_bh(p.q, p.q_stride, pos.b, h, sizeof(T)));
    const T* dog = reinterpret_cast<const T*>(at_bh(dout, go_st, pos.b, h, sizeof(T)));
    for (int64_t m0 = lo; m0 < p.L; m0 += BMI) {
      __syncthreads();
      // 1 in flight: the dK and dV accumulators hold the registers here
      load_tile_raw<BMI, D, 1>(qs, LD, qg, p.q_stride[2], p.q_stride[3], m0, p.L, p.E);
      load_tile_raw<BMI, D, 1>(dos, LD, dog, go_s2, go_s3, m0, p.L, p.Ev);
      for (int r = threadIdx.x; r < BMI; r += blockDim.x) {
        const int64_t i = m0 + r;
        l2s[r] = i < p.L ? lse2_of<float>(lse[bh * p.L + i]) : INFINITY;
        dls[r] = i < p.L ? delta[bh * p.L + i] : 0.0f;
      }
      __syncthreads();

      float st[BMI / 8][4], dpt[BMI / 8][4];
#pragma unroll
      for (int nt = 0; nt < BMI / 8; ++nt)
        st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
      mma_abt<T, BMI, D>(st, ks, LD, warp * 16, qs, LD);  // S^T [keys, queries]
      if (kDK) mma_abt<T, BMI, D>(dpt, vs, LD, warp * 16, dos, LD);  // dP^T
#pragma unroll
      for (int nt = 0; nt < BMI / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = nt * 8 + 2 * t + (e & 1);  // query within the tile
          const int64_t i = m0 + c, j = e < 2 ? j0 : j1;
          const float pr = fast_exp2(score(st[nt][e], i, j) - l2s[c]);
          float d = dpt[nt][e];
          float pd = pr;
          if (drop.on) {
            const bool kept = drop.keep(drop.row(bh, i), j);
            d = kept ? d * drop.scale : 0.0f;
            pd = kept ? pr * drop.scale : 0.0f;
          }
          st[nt][e] = pd;                   // dropped P^T for dV
          dpt[nt][e] = pr * (d - dls[c]);   // dS^T for dK
        }
      }
      if (kDV) mma_pb<T, D, BMI>(dva, st, dos, LD);
      if (kDK) mma_pb<T, D, BMI>(dka, dpt, qs, LD);
    }
  }

  T* dkg = dk + (pos.b * p.Hk + pos.h) * p.S * p.E;
  T* dvg = dv + (pos.b * p.Hk + pos.h) * p.S * p.Ev;
#pragma unroll
  for (int d = 0; d < D / 8; ++d) {
    const int64_t c = d * 8 + 2 * t;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = e < 2 ? j0 : j1, cc = c + (e & 1);
      if (j < p.S) {
        if (kDK && cc < p.E) dkg[j * p.E + cc] = from_acc<T>(dka[d][e] * float(p.scale));
        if (kDV && cc < p.Ev) dvg[j * p.Ev + cc] = from_acc<T>(dva[d][e]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// SIMT kernels: every dtype (A = fp32, fp64 for double) and head dims up to DB (a bucket of
// 64 / 128 / 256 >= max(E, Ev)). Block: 16 rows x 16 columns of the score tile, 128 threads;
// thread t owns row r = t / 8 of the tile and score columns t % 8 and t % 8 + 8, and output
// columns t % 8 + 8 u. The 8 lanes of a row are adjacent in one warp: row reductions are
// 3 shuffles, and a row's probabilities are written and read by the same lanes (__syncwarp).
constexpr int kSimtB = 16;

template <class A>
__device__ __forceinline__ A row_reduce_max(A x) {
  x = fmax(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmax(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmax(x, __shfl_xor_sync(0xffffffffu, x, 4));
}
template <class A>
__device__ __forceinline__ A row_reduce_sum(A x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x + __shfl_xor_sync(0xffffffffu, x, 4);
}

template <class A>
__device__ __forceinline__ A dot_rows(const A* x, const A* y, int n) {
  A s = A(0);
  for (int e = 0; e < n; ++e) s += x[e] * y[e];
  return s;
}

template <class T, int DB>
__global__ void __launch_bounds__(kThreads, 1) sdpa_fwd_simt(SdpaParams p, Dropout drop, T* out,
                                                          float* lse) {
  using A = typename AccOf<T>::type;
  constexpr int B = kSimtB, U = DB / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ldq = int(p.E) + 1, ldv = int(p.Ev) + 1;  // +1: rows of one column hit other banks
  A* qs = reinterpret_cast<A*>(smem_raw);
  A* ks = qs + B * ldq;
  A* vs = ks + B * ldq;
  A* ps = vs + B * ldv;

  const int64_t n_m = (p.L + B - 1) / B;
  const BlockPos pos = block_pos(n_m, p.Hq, p.is_causal);
  const int64_t hk = pos.h / (p.Hq / p.Hk);
  const int64_t m0 = pos.blk * B;
  const int r = threadIdx.x >> 3, c0 = threadIdx.x & 7;
  const int64_t i = m0 + r;
  const Scorer<T, A> score(p, pos.b, pos.h);
  const uint32_t rk = drop.on ? drop.row(pos.bh, i) : 0u;

  load_tile(qs, ldq, reinterpret_cast<const T*>(at_bh(p.q, p.q_stride, pos.b, pos.h, sizeof(T))),
            p.q_stride[2], p.q_stride[3], m0, p.L, p.E, B, int(p.E));
  const T* kg = reinterpret_cast<const T*>(at_bh(p.k, p.k_stride, pos.b, hk, sizeof(T)));
  const T* vg = reinterpret_cast<const T*>(at_bh(p.v, p.v_stride, pos.b, hk, sizeof(T)));

  A o[U];
#pragma unroll
  for (int u = 0; u < U; ++u) o[u] = A(0);
  A m = A(-INFINITY), l = A(0);
  const int64_t hi = p.is_causal ? (p.S < m0 + B ? p.S : m0 + B) : p.S;
  for (int64_t n0 = 0; n0 < hi; n0 += B) {
    __syncthreads();
    load_tile(ks, ldq, kg, p.k_stride[2], p.k_stride[3], n0, p.S, p.E, B, int(p.E));
    load_tile(vs, ldv, vg, p.v_stride[2], p.v_stride[3], n0, p.S, p.Ev, B, int(p.Ev));
    __syncthreads();
    A s0 = score(dot_rows(qs + r * ldq, ks + c0 * ldq, int(p.E)), i, n0 + c0);
    A s1 = score(dot_rows(qs + r * ldq, ks + (c0 + 8) * ldq, int(p.E)), i, n0 + c0 + 8);
    const A mx = row_reduce_max(fmax(m, fmax(s0, s1)));
    const A safe = mx == A(-INFINITY) ? A(0) : mx;
    const A alpha = exp2_(m - safe);
    m = mx;
    s0 = exp2_(s0 - safe);
    s1 = exp2_(s1 - safe);
    l = l * alpha + row_reduce_sum(s0 + s1);
    if (drop.on) {
      s0 = drop.keep(rk, n0 + c0) ? s0 * drop.factor<A>() : A(0);
      s1 = drop.keep(rk, n0 + c0 + 8) ? s1 * drop.factor<A>() : A(0);
    }
    ps[r * B + c0] = s0;
    ps[r * B + c0 + 8] = s1;
    __syncwarp();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 8 * u;
      A acc = o[u] * alpha;
      if (c < p.Ev) {
        for (int jj = 0; jj < B; ++jj) acc += ps[r * B + jj] * vs[jj * ldv + c];
      }
      o[u] = acc;
    }
  }
  if (i < p.L) {
    const A inv = l > A(0) ? A(1) / l : A(0);
    T* og = out + (pos.bh * p.L + i) * p.Ev;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 8 * u;
      if (c < p.Ev) og[c] = from_acc<T>(o[u] * inv);
    }
    if (c0 == 0)
      lse[pos.bh * p.L + i] = l > A(0) ? float((m + log2(l)) * A(kLn2)) : -INFINITY;
  }
}

// delta[bh, i] = sum_c dO[i, c] * O[i, c] (= sum_j P_ij dP_ij, dropout included): one warp
// per row, lanes over the columns.
template <class T>
__global__ void __launch_bounds__(kThreads, 1) sdpa_bwd_delta(const T* out, int64_t o_s0,
                                                           int64_t o_s1, int64_t o_s2,
                                                           int64_t o_s3, const T* dout,
                                                           int64_t d_s0, int64_t d_s1,
                                                           int64_t d_s2, int64_t d_s3,
                                                           int64_t Hq, int64_t L, int64_t Ev,
                                                           int64_t rows, float* delta) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  // Grid-stride over rows (B * Hq * L can pass the grid limit); a warp's lanes share the row,
  // so the loop bound and the shuffles below stay warp-uniform.
  for (int64_t row = blockIdx.x * int64_t(kThreads / 32) + (threadIdx.x >> 5); row < rows;
       row += int64_t(gridDim.x) * (kThreads / 32)) {
    const int64_t bh = row / L, i = row - bh * L;
    const int64_t b = bh / Hq, h = bh - b * Hq;
    const T* orow = out + b * o_s0 + h * o_s1 + i * o_s2;
    const T* drow = dout + b * d_s0 + h * d_s1 + i * d_s2;
    A s = A(0);
    for (int64_t c = lane; c < Ev; c += 32)
      s += A(to_acc(orow[c * o_s3])) * A(to_acc(drow[c * d_s3]));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) delta[row] = float(s);
  }
}

template <class T, int DB>
__global__ void __launch_bounds__(kThreads, 1) sdpa_bwd_dq_simt(SdpaParams p, Dropout drop,
                                                             const T* dout, int64_t go_s0,
                                                             int64_t go_s1, int64_t go_s2,
                                                             int64_t go_s3, const float* lse,
                                                             const float* delta, T* dq) {
  using A = typename AccOf<T>::type;
  constexpr int B = kSimtB, U = DB / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ldq = int(p.E) + 1, ldv = int(p.Ev) + 1;
  A* qs = reinterpret_cast<A*>(smem_raw);
  A* dos = qs + B * ldq;
  A* ks = dos + B * ldv;
  A* vs = ks + B * ldq;
  A* dss = vs + B * ldv;

  const int64_t n_m = (p.L + B - 1) / B;
  const BlockPos pos = block_pos(n_m, p.Hq, p.is_causal);
  const int64_t hk = pos.h / (p.Hq / p.Hk);
  const int64_t m0 = pos.blk * B;
  const int r = threadIdx.x >> 3, c0 = threadIdx.x & 7;
  const int64_t i = m0 + r;
  const Scorer<T, A> score(p, pos.b, pos.h);
  const uint32_t rk = drop.on ? drop.row(pos.bh, i) : 0u;
  const A l2 = i < p.L ? lse2_of<A>(lse[pos.bh * p.L + i]) : A(INFINITY);
  const A dl = i < p.L ? A(delta[pos.bh * p.L + i]) : A(0);
  const int64_t go_st[4] = {go_s0, go_s1, go_s2, go_s3};

  load_tile(qs, ldq, reinterpret_cast<const T*>(at_bh(p.q, p.q_stride, pos.b, pos.h, sizeof(T))),
            p.q_stride[2], p.q_stride[3], m0, p.L, p.E, B, int(p.E));
  load_tile(dos, ldv, reinterpret_cast<const T*>(at_bh(dout, go_st, pos.b, pos.h, sizeof(T))),
            go_s2, go_s3, m0, p.L, p.Ev, B, int(p.Ev));
  const T* kg = reinterpret_cast<const T*>(at_bh(p.k, p.k_stride, pos.b, hk, sizeof(T)));
  const T* vg = reinterpret_cast<const T*>(at_bh(p.v, p.v_stride, pos.b, hk, sizeof(T)));

  A acc[U];
#pragma unroll
  for (int u = 0; u < U; ++u) acc[u] = A(0);
  const int64_t hi = p.is_causal ? (p.S < m0 + B ? p.S : m0 + B) : p.S;
  for (int64_t n0 = 0; n0 < hi; n0 += B) {
    __syncthreads();
    load_tile(ks, ldq, kg, p.k_stride[2], p.k_stride[3], n0, p.S, p.E, B, int(p.E));
    load_tile(vs, ldv, vg, p.v_stride[2], p.v_stride[3], n0, p.S, p.Ev, B, int(p.Ev));
    __syncthreads();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c = c0 + 8 * half;
      const int64_t j = n0 + c;
      const A pr = exp2_(score(dot_rows(qs + r * ldq, ks + c * ldq, int(p.E)), i, j) - l2);
      A d = dot_rows(dos + r * ldv, vs + c * ldv, int(p.Ev));
      if (drop.on) d = drop.keep(rk, j) ? d * drop.factor<A>() : A(0);
      dss[r * B + c] = pr * (d - dl);
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 8 * u;
      if (c < p.E) {
        A a = acc[u];
        for (int jj = 0; jj < B; ++jj) a += dss[r * B + jj] * ks[jj * ldq + c];
        acc[u] = a;
      }
    }
  }
  if (i < p.L) {
    T* g = dq + (pos.bh * p.L + i) * p.E;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 8 * u;
      if (c < p.E) g[c] = from_acc<T>(acc[u] * A(p.scale));
    }
  }
}

// kDK / kDV as in sdpa_bwd_dkdv_tc: fp64 at 256 holds 2 x 32 doubles of accumulators per thread
// (128 registers) and spills on sm_90 unless dK and dV are separate launches.
template <class T, int DB, bool kDK, bool kDV>
__global__ void __launch_bounds__(kThreads, 1) sdpa_bwd_dkdv_simt(SdpaParams p, Dropout drop,
                                                               const T* dout, int64_t go_s0,
                                                               int64_t go_s1, int64_t go_s2,
                                                               int64_t go_s3, const float* lse,
                                                               const float* delta, T* dk, T* dv) {
  using A = typename AccOf<T>::type;
  constexpr int B = kSimtB, U = DB / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ldq = int(p.E) + 1, ldv = int(p.Ev) + 1;
  A* ks = reinterpret_cast<A*>(smem_raw);
  A* vs = ks + B * ldq;
  A* qs = vs + B * ldv;
  A* dos = qs + B * ldq;
  A* pts = dos + B * ldv;  // dropped P^T [key][query]
  A* dsts = pts + B * B;   // dS^T
  A* l2s = dsts + B * B;
  A* dls = l2s + B;

  const int64_t group = p.Hq / p.Hk;
  const int64_t n_n = (p.S + B - 1) / B;
  const BlockPos pos = block_pos(n_n, p.Hk, false);
  const int64_t n0 = pos.blk * B;
  const int r = threadIdx.x >> 3, c0 = threadIdx.x & 7;  // r: key within the tile
  const int64_t j = n0 + r;
  const int64_t go_st[4] = {go_s0, go_s1, go_s2, go_s3};

  load_tile(ks, ldq, reinterpret_cast<const T*>(at_bh(p.k, p.k_stride, pos.b, pos.h, sizeof(T))),
            p.k_stride[2], p.k_stride[3], n0, p.S, p.E, B, int(p.E));
  load_tile(vs, ldv, reinterpret_cast<const T*>(at_bh(p.v, p.v_stride, pos.b, pos.h, sizeof(T))),
            p.v_stride[2], p.v_stride[3], n0, p.S, p.Ev, B, int(p.Ev));
  A dka[U], dva[U];
#pragma unroll
  for (int u = 0; u < U; ++u) dka[u] = dva[u] = A(0);

  const int64_t lo = p.is_causal ? n0 : 0;  // B-aligned: queries before n0 see none of these keys
  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t h = pos.h * group + gi, bh = pos.b * p.Hq + h;
    const Scorer<T, A> score(p, pos.b, h);
    const T* qg = reinterpret_cast<const T*>(at_bh(p.q, p.q_stride, pos.b, h, sizeof(T)));
    const T* dog = reinterpret_cast<const T*>(at_bh(dout, go_st, pos.b, h, sizeof(T)));
    for (int64_t m0 = lo; m0 < p.L; m0 += B) {
      __syncthreads();
      load_tile(qs, ldq, qg, p.q_stride[2], p.q_stride[3], m0, p.L, p.E, B, int(p.E));
      load_tile(dos, ldv, dog, go_s2, go_s3, m0, p.L, p.Ev, B, int(p.Ev));
      if (threadIdx.x < B) {
        const int64_t i = m0 + threadIdx.x;
        l2s[threadIdx.x] = i < p.L ? lse2_of<A>(lse[bh * p.L + i]) : A(INFINITY);
        dls[threadIdx.x] = i < p.L ? A(delta[bh * p.L + i]) : A(0);
      }
      __syncthreads();
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = c0 + 8 * half;  // query within the tile
        const int64_t i = m0 + c;
        const A pr = exp2_(score(dot_rows(ks + r * ldq, qs + c * ldq, int(p.E)), i, j) - l2s[c]);
        A d = dot_rows(vs + r * ldv, dos + c * ldv, int(p.Ev));
        A pd = pr;
        if (drop.on) {
          const bool kept = drop.keep(drop.row(bh, i), j);
          d = kept ? d * drop.factor<A>() : A(0);
          pd = kept ? pr * drop.factor<A>() : A(0);
        }
        pts[r * B + c] = pd;
        dsts[r * B + c] = pr * (d - dls[c]);
      }
      __syncwarp();
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 8 * u;
        A a = dva[u], b = dka[u];
        for (int ii = 0; ii < B; ++ii) {
          if (kDV && c < p.Ev) a += pts[r * B + ii] * dos[ii * ldv + c];
          if (kDK && c < p.E) b += dsts[r * B + ii] * qs[ii * ldq + c];
        }
        dva[u] = a;
        dka[u] = b;
      }
    }
  }
  if (j < p.S) {
    const int64_t bhk = pos.b * p.Hk + pos.h;
    T* gk = dk + (bhk * p.S + j) * p.E;
    T* gv = dv + (bhk * p.S + j) * p.Ev;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 8 * u;
      if (kDK && c < p.E) gk[c] = from_acc<T>(dka[u] * A(p.scale));
      if (kDV && c < p.Ev) gv[c] = from_acc<T>(dva[u]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host side

Dropout make_dropout(const SdpaParams& p) {
  Dropout d;
  d.on = p.dropout_p > 0.0;
  d.seed = p.seed;
  d.threshold = dropout::threshold(p.dropout_p);
  d.scale64 = p.dropout_p >= 1.0 ? 0.0 : 1.0 / (1.0 - p.dropout_p);
  d.scale = float(d.scale64);
  return d;
}

int bucket(int64_t d) { return d <= 64 ? 64 : (d <= 128 ? 128 : 256); }

template <class K>
void set_smem(K kernel, size_t bytes) {
  // Above 48 KiB a kernel must opt in; errors surface in the caller's launch check.
  if (bytes > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
size_t simt_fwd_smem(const SdpaParams& p) {
  using A = typename AccOf<T>::type;
  return sizeof(A) * (kSimtB * (p.E + 1) * 2 + kSimtB * (p.Ev + 1) + kSimtB * kSimtB);
}
template <class T>
size_t simt_dq_smem(const SdpaParams& p) {
  using A = typename AccOf<T>::type;
  return sizeof(A) * (2 * kSimtB * (p.E + 1) + 2 * kSimtB * (p.Ev + 1) + kSimtB * kSimtB);
}
template <class T>
size_t simt_dkdv_smem(const SdpaParams& p) {
  using A = typename AccOf<T>::type;
  return sizeof(A) * (2 * kSimtB * (p.E + 1) + 2 * kSimtB * (p.Ev + 1) + 2 * kSimtB * kSimtB +
                      2 * kSimtB);
}

template <class T, int DB>
void fwd_simt(const SdpaParams& p, void* out, float* lse, cudaStream_t stream) {
  const size_t smem = simt_fwd_smem<T>(p);
  set_smem(sdpa_fwd_simt<T, DB>, smem);
  sdpa_fwd_simt<T, DB><<<dim3(unsigned(cdiv(p.L, kSimtB) * p.B * p.Hq)), kThreads, smem, stream>>>(
      p, make_dropout(p), static_cast<T*>(out), lse);
}

template <class T, int D>
void fwd_tc(const SdpaParams& p, void* out, float* lse, cudaStream_t stream) {
  constexpr int BM = TcFwdCfg<D>::BM, BN = TcFwdCfg<D>::BN;
  const size_t smem = sizeof(T) * (BM + 4 * BN) * (D + kPad);  // Q + two (K, V) pairs
  set_smem(sdpa_fwd_tc<T, D>, smem);
  sdpa_fwd_tc<T, D><<<dim3(unsigned(cdiv(p.L, BM) * p.B * p.Hq)), kThreads, smem, stream>>>(
      p, make_dropout(p), static_cast<T*>(out), lse);
}

template <class T>
void forward_simt(const SdpaParams& p, void* out, float* lse, cudaStream_t stream) {
  // fp64 is for checking, not speed: one bucket (256) keeps the build small.
  if constexpr (sizeof(T) == 8) {
    fwd_simt<T, 256>(p, out, lse, stream);
  } else {
    switch (bucket(p.E > p.Ev ? p.E : p.Ev)) {
      case 64: return fwd_simt<T, 64>(p, out, lse, stream);
      case 128: return fwd_simt<T, 128>(p, out, lse, stream);
      default: return fwd_simt<T, 256>(p, out, lse, stream);
    }
  }
}

template <class T>
void forward_tc(const SdpaParams& p, void* out, float* lse, cudaStream_t stream) {
  switch (bucket(p.E > p.Ev ? p.E : p.Ev)) {
    case 64: return fwd_tc<T, 64>(p, out, lse, stream);
    case 128: return fwd_tc<T, 128>(p, out, lse, stream);
    default: return fwd_tc<T, 256>(p, out, lse, stream);
  }
}

struct BwdArgs {
  const void* dout;
  const int64_t* go;
  const float* lse;
  const float* delta;
  void *dq, *dk, *dv;
};

template <class T, int DB>
void bwd_simt(const SdpaParams& p, const BwdArgs& a, cudaStream_t stream) {
  const Dropout drop = make_dropout(p);
  const T* dout = static_cast<const T*>(a.dout);
  size_t smem = simt_dkdv_smem<T>(p);
  const dim3 grid(unsigned(cdiv(p.S, kSimtB) * p.B * p.Hk));
  T* dk = static_cast<T*>(a.dk);
  T* dv = static_cast<T*>(a.dv);
  if constexpr (sizeof(T) == 8 && DB == 256) {
    set_smem(sdpa_bwd_dkdv_simt<T, DB, true, false>, smem);
    sdpa_bwd_dkdv_simt<T, DB, true, false><<<grid, kThreads, smem, stream>>>(
        p, drop, dout, a.go[0], a.go[1], a.go[2], a.go[3], a.lse, a.delta, dk, dv);
    set_smem(sdpa_bwd_dkdv_simt<T, DB, false, true>, smem);
    sdpa_bwd_dkdv_simt<T, DB, false, true><<<grid, kThreads, smem, stream>>>(
        p, drop, dout, a.go[0], a.go[1], a.go[2], a.go[3], a.lse, a.delta, dk, dv);
  } else {
    set_smem(sdpa_bwd_dkdv_simt<T, DB, true, true>, smem);
    sdpa_bwd_dkdv_simt<T, DB, true, true><<<grid, kThreads, smem, stream>>>(
        p, drop, dout, a.go[0], a.go[1], a.go[2], a.go[3], a.lse, a.delta, dk, dv);
  }
  smem = simt_dq_smem<T>(p);
  set_smem(sdpa_bwd_dq_simt<T, DB>, smem);
  sdpa_bwd_dq_simt<T, DB><<<dim3(unsigned(cdiv(p.L, kSimtB) * p.B * p.Hq)), kThreads, smem,
                            stream>>>(p, drop, dout, a.go[0], a.go[1], a.go[2], a.go[3], a.lse,
                                      a.delta, static_cast<T*>(a.dq));
}

template <class T, int D>
void bwd_tc(const SdpaParams& p, const BwdArgs& a, cudaStream_t stream) {
  const Dropout drop = make_dropout(p);
  const T* dout = static_cast<const T*>(a.dout);
  constexpr int BMI = TcBwdCfg<D>::BMI, BM = TcBwdCfg<D>::BM, BN = TcBwdCfg<D>::BN;
  size_t smem = sizeof(T) * (2 * 64 + 2 * BMI) * (D + kPad) + 2 * BMI * sizeof(float);
  const dim3 grid(unsigned(cdiv(p.S, 64) * p.B * p.Hk));
  T* dk = static_cast<T*>(a.dk);
  T* dv = static_cast<T*>(a.dv);
  if constexpr (D <= 64) {
    set_smem(sdpa_bwd_dkdv_tc<T, D, true, true>, smem);
    sdpa_bwd_dkdv_tc<T, D, true, true><<<grid, kThreads, smem, stream>>>(
        p, drop, dout, a.go[0], a.go[1], a.go[2], a.go[3], a.lse, a.delta, dk, dv);
  } else {
    set_smem(sdpa_bwd_dkdv_tc<T, D, false, true>, smem);
    sdpa_bwd_dkdv_tc<T, D, false, true><<<grid, kThreads, smem, stream>>>(
        p, drop, dout, a.go[0], a.go[1], a.go[2], a.go[3], a.lse, a.delta, dk, dv);
    set_smem(sdpa_bwd_dkdv_tc<T, D, true, false>, smem);
    sdpa_bwd_dkdv_tc<T, D, true, false><<<grid, kThreads, smem, stream>>>(
        p, drop, dout, a.go[0], a.go[1], a.go[2], a.go[3], a.lse, a.delta, dk, dv);
  }
  smem = sizeof(T) * (2 * BM + 4 * BN) * (D + kPad);  // Q, dO + two (K, V) pairs
  set_smem(sdpa_bwd_dq_tc<T, D>, smem);
  sdpa_bwd_dq_tc<T, D><<<dim3(unsigned(cdiv(p.L, BM) * p.B * p.Hq)), kThreads, smem, stream>>>(
      p, drop, dout, a.go[0], a.go[1], a.go[2], a.go[3], a.lse, a.delta,
      static_cast<T*>(a.dq));
}

template <class T>
void backward_simt(const SdpaParams& p, const BwdArgs& a, cudaStream_t stream) {
  if constexpr (sizeof(T) == 8) {
    bwd_simt<T, 256>(p, a, stream);
  } else {
    switch (bucket(p.E > p.Ev ? p.E : p.Ev)) {
      case 64: return bwd_simt<T, 64>(p, a, stream);
      case 128: return bwd_simt<T, 128>(p, a, stream);
      default: return bwd_simt<T, 256>(p, a, stream);
    }
  }
}

template <class T>
void backward_half(const SdpaParams& p, const BwdArgs& a, cudaStream_t stream) {
  switch (bucket(p.E > p.Ev ? p.E : p.Ev)) {
    case 64: return bwd_tc<T, 64>(p, a, stream);
    case 128: return bwd_tc<T, 128>(p, a, stream);
    default: return bwd_simt<T, 256>(p, a, stream);  // two D=256 accumulators exceed registers
  }
}

template <class T>
void delta_launch(const SdpaParams& p, const void* out, const int64_t* os, const void* dout,
                  const int64_t* go, float* delta, cudaStream_t stream) {
  const int64_t rows = p.B * p.Hq * p.L;
  constexpr int kRowsPerBlock = kThreads / 32;
  const int64_t blocks = cdiv(rows, kRowsPerBlock);
  sdpa_bwd_delta<T><<<dim3(unsigned(blocks < (1 << 20) ? blocks : (1 << 20))), kThreads, 0,
                      stream>>>(
      static_cast<const T*>(out), os[0], os[1], os[2], os[3], static_cast<const T*>(dout), go[0],
      go[1], go[2], go[3], p.Hq, p.L, p.Ev, rows, delta);
}

}  // namespace

void sdpa_forward(DType dtype, const SdpaParams& p, void* out, float* lse, cudaStream_t stream) {
  if (p.B * p.Hq * p.L == 0) return;
  switch (dtype) {
    case DType::kFloat16: return forward_tc<__half>(p, out, lse, stream);
    case DType::kBFloat16: return forward_tc<__nv_bfloat16>(p, out, lse, stream);
    case DType::kFloat32: return forward_simt<float>(p, out, lse, stream);
    case DType::kFloat64: return forward_simt<double>(p, out, lse, stream);
  }
}

void sdpa_backward(DType dtype, const SdpaParams& p, const void* grad_out,
                   const int64_t go_stride[4], const void* out, const int64_t out_stride[4],
                   const float* lse, float* delta, void* dq, void* dk, void* dv,
                   cudaStream_t stream) {
  const size_t esize = dtype == DType::kFloat64 ? 8 : (dtype == DType::kFloat32 ? 4 : 2);
  if (p.L == 0 || p.S == 0 || p.B * p.Hq == 0) {  // nothing attends: every gradient is 0
    cudaMemsetAsync(dq, 0, size_t(p.B * p.Hq * p.L * p.E) * esize, stream);
    cudaMemsetAsync(dk, 0, size_t(p.B * p.Hk * p.S * p.E) * esize, stream);
    cudaMemsetAsync(dv, 0, size_t(p.B * p.Hk * p.S * p.Ev) * esize, stream);
    return;
  }
  const BwdArgs a{grad_out, go_stride, lse, delta, dq, dk, dv};
  switch (dtype) {
    case DType::kFloat16:
      delta_launch<__half>(p, out, out_stride, grad_out, go_stride, delta, stream);
      return backward_half<__half>(p, a, stream);
    case DType::kBFloat16:
      delta_launch<__nv_bfloat16>(p, out, out_stride, grad_out, go_stride, delta, stream);
      return backward_half<__nv_bfloat16>(p, a, stream);
    case DType::kFloat32:
      delta_launch<float>(p, out, out_stride, grad_out, go_stride, delta, stream);
      return backward_simt<float>(p, a, stream);
    case DType::kFloat64:
      delta_launch<double>(p, out, out_stride, grad_out, go_stride, delta, stream);
      return backward_simt<double>(p, a, stream);
  }
}

}  // namespace cuda
}  // namespace pyseqk
