// Portability macros shared by host (C++) and device (CUDA) code. Torch-free.
#pragma once

#if defined(__CUDACC__)
#define PYSEQK_HD __host__ __device__ __forceinline__
#else
#define PYSEQK_HD inline
#endif
