"""Builds pyseqk._C: CUDAExtension when torch has CUDA and nvcc is found, CppExtension otherwise.

Environment:
  PYSEQK_NO_CUDA=1         build the CPU-only extension even where CUDA is available
  TORCH_CUDA_ARCH_LIST     CUDA archs to compile for (default "8.0;9.0")
  PYSEQK_CPU_ISA           "avx512", "avx2" or "default" (default: the best of them the build
                           machine has: AVX-512 F/BW/VL/DQ, else AVX2+FMA, else scalar)
  MAX_JOBS                 parallel compile jobs (read by torch.utils.cpp_extension)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_has(*flags):
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return False
    return all(flag in words for flag in flags)


# ATen's Vectorized picks its implementation from the CPU_CAPABILITY macros (the flags torch
# builds its own AVX2 / AVX512 kernels with); without them it is scalar. AVX-512 doubles the
# lanes of every at::vec kernel (gate math, softmax, GEMV) on machines that have it.
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "default": [],
}


def _best_isa():
    if _cpu_has("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"):
        return "avx512"
    return "avx2" if _cpu_has("avx2", "fma") else "default"


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


def _cuda_pip_include():
    """Headers of the CUDA runtime pip package torch's CUDA build depends on (cuda_runtime_api.h)."""
    try:
        import nvidia  # namespace package
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        for sub in ("cu13/include", "cuda_runtime/include"):
            path = os.path.join(base, sub)
            if os.path.exists(os.path.join(path, "cuda_runtime_api.h")):
                found.append(path)
    return found


def main():
    nvcc = _nvcc()
    with_cuda = (
        torch.version.cuda is not None
        and nvcc is not None
        and os.environ.get("PYSEQK_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    isa = os.environ.get("PYSEQK_CPU_ISA") or _best_isa()
    if isa not in ISA_FLAGS:
        raise SystemExit(f"PYSEQK_CPU_ISA must be one of {sorted(ISA_FLAGS)}, got {isa!r}")

    sources = sorted(glob.glob("csrc/ops/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", f"-DPYSEQK_CPU_ISA=\"{isa}\""]
    # at::parallel_for is a header template: without -fopenmp (_OPENMP undefined) it runs the
    # whole range on the calling thread. libgomp.so.1 is the one torch already loaded.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx += openmp
    cxx += ISA_FLAGS[isa]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    define_macros = []
    if with_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _cuda_pip_include()
        define_macros.append(("PYSEQK_WITH_CUDA", None))
        cxx.append(f"-DPYSEQK_CUDA_ARCHS=\"{archs}\"")
        nvcc_flags = ["-O3", "-std=c++20", "-Xptxas=-v", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "pyseqk._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}, extra_link_args=openmp,
        )
    else:
        ext = cpp_extension.CppExtension(
            "pyseqk._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=openmp,
        )

    setup(
        name="pyseqk",
        version="0.1.0",
        packages=["pyseqk", "pyseqk.nn", "pyseqk.kernels"],
        package_dir={"pyseqk.kernels": "kernels"},
        ext_modules=[ext],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.10",
    )


if __name__ == "__main__":
    main()
