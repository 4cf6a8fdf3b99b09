"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90 without a GPU, and the
register/spill report of Triton's bundled ptxas: `python -m kernels.aot` (or
`python -m pyseqk.kernels.aot` when installed) prints the table; tests/test_build.py asserts it."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _common, gru, lstm, rnn

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")


def _jit_function(kernel):
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (the interpreter replaces "
                           "every @triton.jit function); run `python -m pyseqk.kernels.aot`")
    return kernel


def _signature(kernel, pointer_dtype, constexprs):
    fn = _jit_function(kernel)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{pointer_dtype}"
        else:
            sig[name] = "i32"
    return sig


def all_kernels():
    """(name, kernel, constexprs) for every kernel, with the flag combinations that matter."""
    B = {"BLOCK": _common.BLOCK_H}
    return [
        ("lstm_cell_fwd", lstm._lstm_cell_fwd_kernel, dict(HAS_B_IH=True, HAS_B_HH=True, **B)),
        ("lstm_cell_bwd", lstm._lstm_cell_bwd_kernel, dict(HAS_DHY=True, HAS_DCY=True, **B)),
        ("gru_cell_fwd", gru._gru_cell_fwd_kernel, dict(HAS_B_IH=True, HAS_B_HH=True, **B)),
        ("gru_cell_bwd", gru._gru_cell_bwd_kernel, dict(**B)),
        ("rnn_cell_fwd", rnn._rnn_cell_fwd_kernel, dict(RELU=False, HAS_B_IH=True, HAS_B_HH=True, **B)),
        ("rnn_cell_bwd", rnn._rnn_cell_bwd_kernel, dict(RELU=False, **B)),
    ]


def _ptxas():
    here = os.path.dirname(triton.__file__)
    path = os.path.join(here, "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


def compile_report(kernel, constexprs, dtype, arch, num_warps=_common.NUM_WARPS):
    """Compile for sm_<arch>; returns dict(registers, spill_stores, spill_loads)."""
    src = ASTSource(fn=_jit_function(kernel), signature=_signature(kernel, dtype, constexprs),
                    constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        ptx_path = os.path.join(d, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", ptx_path, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    return {"registers": int(regs.group(1)), "spill_stores": int(spill.group(1)),
            "spill_loads": int(spill.group(2))}


def report():
    rows = []
    for name, kernel, constexprs in all_kernels():
        for dtype in DTYPES:
            for arch in ARCHS:
                rows.append((name, dtype, arch, compile_report(kernel, constexprs, dtype, arch)))
    return rows


if __name__ == "__main__":
    import json
    import sys

    if "--json" in sys.argv:
        print(json.dumps([dict(kernel=n, dtype=d, arch=a, **r) for n, d, a, r in report()]))
        sys.exit(0)
    print(f"{'kernel':<16}{'dtype':<6}{'arch':<6}{'regs':>5}{'spills':>8}")
    for name, dtype, arch, r in report():
        print(f"{name:<16}{dtype:<6}sm_{arch:<3}{r['registers']:>5}{r['spill_stores'] + r['spill_loads']:>8}")
