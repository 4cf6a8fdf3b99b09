// The attention-dropout mask as a pure function of (seed, batch*head, query row, key column), so
// that forward and backward (which recomputes the probabilities) drop the same elements without
// storing a mask, and so that every backend (CPU, CUDA, Triton, the reference) drops the same
// elements for the same seed. Torch-free; pyseqk/reference.py and kernels/ mirror it exactly.
//
//   a = fmix32(seed ^ bh * 0x9E3779B9), b = fmix32(a ^ i * 0x85EBCA77), r = fmix32(b ^ j * 0xC2B2AE3D)
//   keep  <=>  (r >> 8) >= threshold,  threshold = floor(p * 2^24)
// (all arithmetic modulo 2^32; fmix32 is MurmurHash3's finalizer). Kept values are scaled by 1/(1-p).
#pragma once

#include <cstdint>

#include "pyseqk/macros.h"

namespace pyseqk {
namespace dropout {

PYSEQK_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Per (batch*head, row): the part of the hash that does not depend on the key column.
PYSEQK_HD uint32_t row_key(uint32_t seed, uint32_t bh, uint32_t i) {
  return fmix32(fmix32(seed ^ (bh * 0x9E3779B9u)) ^ (i * 0x85EBCA77u));
}

PYSEQK_HD bool keep(uint32_t row, uint32_t j, uint32_t threshold) {
  return (fmix32(row ^ (j * 0xC2B2AE3Du)) >> 8) >= threshold;
}

// floor(p * 2^24), clamped to [0, 2^24].
PYSEQK_HD uint32_t threshold(double p) {
  if (p <= 0.0) return 0u;
  if (p >= 1.0) return 1u << 24;
  return static_cast<uint32_t>(p * 16777216.0);
}

}  // namespace dropout
}  // namespace pyseqk
