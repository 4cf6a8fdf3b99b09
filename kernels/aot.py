"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90 without a GPU, and the
register/spill report of Triton's bundled ptxas.

    python -m pyseqk.kernels.aot          # table: kernel, dtype, arch, registers, spills
    python -m pyseqk.kernels.aot --json   # the same rows as JSON (tests/test_build.py)

Works with TRITON_INTERPRET=1 set too (the test suite sets it globally): the interpreter
replaces every @triton.jit function, Triton's own library included, by an InterpretedFunction,
which the compiler cannot take; the compiles then run in one worker process started with the
variable unset (see _Worker), and the kernels are named to it by module and name.

Registers and spills come from `ptxas -v` run on the PTX with the flags Triton itself uses:
CompiledKernel.n_regs / n_spills are only filled in when the binary is loaded onto a GPU."""
from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Optional

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import _common, gru, lstm, rnn, sdpa
from . import layers as _layers
from . import seq2seq_attention

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")


# --------------------------------------------------------------------------------------------
# The kernels


def _sig(dtype: str, pointers: str, ints: str = "H") -> dict[str, str]:
    sig = {name: f"*{dtype}" for name in pointers.split()}
    sig.update({name: "i32" for name in ints.split()})
    return sig


def all_kernels() -> list[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """(name, kernel, signature, constexprs) for every kernel in kernels/, for each realistic
    dtype: the signature maps each runtime argument to its Triton type (`*bf16`, `i32`), the
    constexprs are the mode flags, with every optional input present (the most live values).
    The name carries the dtype (`lstm_cell_fwd[bf16]`); `kernel` is the object the module
    defines (a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1)."""
    blk = {"BLOCK": _common.BLOCK_H}
    rows = []
    for dt in DTYPES:
        rows += [
            ("lstm_cell_fwd", lstm._lstm_cell_fwd_kernel,
             _sig(dt, "ws_ptr b_ih_ptr b_hh_ptr cx_ptr hy_ptr cy_ptr"),
             dict(HAS_B_IH=True, HAS_B_HH=True, **blk)),
            ("lstm_cell_bwd", lstm._lstm_cell_bwd_kernel,
             _sig(dt, "ws_ptr cx_ptr cy_ptr dhy_ptr dcy_ptr dgates_ptr dcx_ptr"),
             dict(HAS_DHY=True, HAS_DCY=True, **blk)),
            ("gru_cell_fwd", gru._gru_cell_fwd_kernel,
             _sig(dt, "ws_ptr b_ih_ptr b_hh_ptr hx_ptr hy_ptr"),
             dict(HAS_B_IH=True, HAS_B_HH=True, **blk)),
            ("gru_cell_bwd", gru._gru_cell_bwd_kernel,
             _sig(dt, "ws_ptr hx_ptr dhy_ptr dgi_ptr dgh_ptr dh_direct_ptr"), dict(**blk)),
        ]
        for act, relu in (("tanh", False), ("relu", True)):
            rows += [
                (f"rnn_{act}_cell_fwd", rnn._rnn_cell_fwd_kernel, _sig(dt, "hy_ptr b_ih_ptr b_hh_ptr"),
                 dict(RELU=relu, HAS_B_IH=True, HAS_B_HH=True, **blk)),
                (f"rnn_{act}_cell_bwd", rnn._rnn_cell_bwd_kernel, _sig(dt, "hy_ptr dhy_ptr dpre_ptr"),
                 dict(RELU=relu, **blk)),
            ]
        rows += seq2seq_attention.aot_kernels(dt)
        rows += _layer_kernels(dt)
    return [(f"{name}[{_dtype_of(sig)}]", k, sig, c) for name, k, sig, c in rows] + sdpa_kernels()


def _layer_kernels(dt: str) -> list:
    """The whole-sequence layer kernels (kernels/layers.py), every optional input present;
    len_ptr is int64, the backward's gradient carries (dh, dc) fp32."""
    blk = {"BLOCK_H": _layers.BLOCK_H, "BLOCK_K": _layers.BLOCK_K}

    def sig(pointers, ints="T B H", acc=""):
        s = _sig(dt, pointers, ints)
        s["len_ptr"] = "*i64"
        s.update({name: "*fp32" for name in acc.split()})
        return s

    return [
        ("lstm_layer_fwd", _layers._lstm_layer_fwd_kernel,
         sig("gates_ptr whh_ptr whr_ptr hs_ptr cs_ptr ms_ptr out_ptr", "T B H P"),
         dict(REVERSE=False, HAS_LEN=True, PROJ=True, **blk)),
        ("lstm_layer_bwd", _layers._lstm_layer_bwd_kernel,
         sig("gates_ptr whh_ptr whr_ptr cs_ptr go_ptr dg_ptr dr_ptr", "T B H P", "dh_ptr dc_ptr"),
         dict(REVERSE=False, HAS_LEN=True, PROJ=True, HAS_GO=True, **blk)),
        ("gru_layer_fwd", _layers._gru_layer_fwd_kernel,
         sig("gi_ptr whh_ptr bhn_ptr hs_ptr ws_ptr out_ptr"),
         dict(REVERSE=False, HAS_LEN=True, HAS_BHN=True, **blk)),
        ("gru_layer_bwd", _layers._gru_layer_bwd_kernel,
         sig("ws_ptr whh_ptr hs_ptr go_ptr dgi_ptr dgh_ptr", acc="dh_ptr"),
         dict(REVERSE=False, HAS_LEN=True, HAS_GO=True, **blk)),
        ("rnn_layer_fwd", _layers._rnn_layer_fwd_kernel, sig("pre_ptr whh_ptr hs_ptr out_ptr"),
         dict(RELU=False, REVERSE=False, HAS_LEN=True, **blk)),
        ("rnn_layer_bwd", _layers._rnn_layer_bwd_kernel,
         sig("hs_ptr whh_ptr go_ptr dp_ptr", acc="dh_ptr"),
         dict(RELU=False, REVERSE=False, HAS_LEN=True, HAS_GO=True, **blk)),
    ]


def _dtype_of(signature: dict[str, str]) -> str:
    return next(t[1:] for t in signature.values() if t.startswith("*"))


# --------------------------------------------------------------------------------------------
# Compilation


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _kernel_id(kernel) -> tuple[str, str]:
    """(module, name) by which a separate process can import the kernel."""
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise TypeError(f"{kernel!r} is not a @triton.jit kernel")
    if fn.__module__ == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is None or not spec.name:
            raise RuntimeError(f"{fn.__name__} is defined in a script run as __main__: under "
                               "TRITON_INTERPRET=1 it must live in an importable module")
        return spec.name, fn.__name__
    return fn.__module__, fn.__name__


class _Worker:
    """A child process with TRITON_INTERPRET unset that compiles on request (JSON lines).

    Why a process: with the interpreter on, Triton wraps every @triton.jit function it imports,
    its own standard library (tl.sum, tl.cdiv, ...) included, and the code generator and gluon
    refuse those; interpreted launches also leave patches on triton.language behind. Only a
    process that imported Triton with the interpreter off compiles reliably."""

    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["_PYSEQK_AOT_WORKER"] = "1"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, text=True,
                                     bufsize=1)

    def request(self, **req) -> dict[str, int]:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError("the AOT compile worker exited unexpectedly:\n"
                               + self.log.read()[-4000:])
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"AOT compile of {req['module']}.{req['name']} for sm_{req['arch']} "
                               f"failed in the worker:\n{reply['error']}")
        return reply["report"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_WORKER_MAIN = """
import importlib, json, os, sys, traceback
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # stray prints of the compiler must not corrupt the replies
from pyseqk.kernels import aot
for line in sys.stdin:
    req = json.loads(line)
    try:
        kernel = getattr(importlib.import_module(req["module"]), req["name"])
        attrs = None if req["attrs"] is None else {tuple(k): v for k, v in req["attrs"]}
        rep = aot.compile_report(kernel, req["signature"], req["constexprs"], req["arch"],
                                 num_warps=req["num_warps"], attrs=attrs,
                                 num_stages=req.get("num_stages"))
        out.write(json.dumps({"report": rep}) + "\\n")
    except Exception:
        out.write(json.dumps({"error": traceback.format_exc()}) + "\\n")
    out.flush()
"""

_worker: Optional[_Worker] = None


def _get_worker() -> _Worker:
    global _worker
    if _worker is None or _worker.proc.poll() is not None:
        _worker = _Worker()
        atexit.register(_worker.close)
    return _worker


def _ptxas_report(ptx: str, arch: int, enable_fp_fusion: bool = True) -> dict[str, int]:
    """ptxas -v on the PTX, with the flags Triton's make_cubin passes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]),
               "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(d, "kernel.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed ({out.returncode}): {out.stderr}")
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    stack = re.search(r"(\d+) bytes stack frame", out.stderr)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{out.stderr}")
    return {"registers": int(regs.group(1)), "spill_stores": int(spill.group(1)),
            "spill_loads": int(spill.group(2)), "stack_bytes": int(stack.group(1)) if stack else 0}


def _compiles_in_process(kernel) -> bool:
    # Triton's own jit library must be JITFunctions too: it is not when triton was imported
    # with the interpreter on, even if the variable was unset since.
    return (isinstance(kernel, JITFunction) and isinstance(tl.standard.cdiv, JITFunction)
            and not _interpreting())


def compile_report(kernel, signature: dict[str, str], constexprs: dict[str, Any], arch: int,
                   num_warps: int = _common.NUM_WARPS,
                   attrs: Optional[dict] = None, num_stages: Optional[int] = None) -> dict[str, int]:
    """Compile `kernel` for sm_<arch> (no GPU needed) and return dict(registers, spill_stores,
    spill_loads, spills, stack_bytes); spills = spill_stores + spill_loads, in bytes.

    signature: runtime argument -> Triton type (`*fp32`, `i32`); constexprs: name -> value
    (they may be left out of the signature). attrs: specialization hints {(arg index,):
    [["tt.divisibility", 16]]}; by default every pointer is 16-byte aligned, as the runtime JIT
    specializes for torch's allocations. Under TRITON_INTERPRET=1 the compile runs in a worker
    process with the interpreter off (see _Worker). num_stages: Triton's default when None.
    The report also counts the tensor-core instructions in the PTX: wgmma (wgmma.mma_async,
    sm_90) and mma_sync (mma.sync, sm_80 style)."""
    if not _compiles_in_process(kernel):
        if os.environ.get("_PYSEQK_AOT_WORKER") == "1":
            raise RuntimeError("the AOT worker itself runs under the interpreter")
        module, name = _kernel_id(kernel)
        return _get_worker().request(
            module=module, name=name, signature=dict(signature), constexprs=dict(constexprs),
            arch=int(arch), num_warps=int(num_warps), num_stages=num_stages,
            attrs=None if attrs is None else [[list(k), v] for k, v in attrs.items()])
    fn = kernel
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"{fn.__name__}: signature lacks {missing}")
    sig = {a: sig[a] for a in fn.arg_names}
    if attrs is None:
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig[a].startswith("*")}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps,
                                       **({} if num_stages is None else {"num_stages": num_stages})})
    ptx = compiled.asm["ptx"]
    report = _ptxas_report(ptx, arch, getattr(compiled.metadata, "enable_fp_fusion", True))
    report["spills"] = report["spill_stores"] + report["spill_loads"]
    report["wgmma"] = len(re.findall(r"\bwgmma\.mma_async", ptx))
    report["mma_sync"] = len(re.findall(r"\bmma\.sync", ptx))
    return report


def report(archs=ARCHS, name_filter: str = "") -> list[dict[str, Any]]:
    """Rows of all_kernels() whose name contains name_filter; a row's optional fifth element
    holds compile_report options (num_warps, num_stages, attrs)."""
    rows = []
    for row in all_kernels():
        name, kernel, signature, constexprs = row[:4]
        options = row[4] if len(row) > 4 else {}
        if name_filter not in name:
            continue
        base, dtype = name[:-1].split("[")
        for arch in archs:
            r = compile_report(kernel, signature, constexprs, arch, **options)
            rows.append(dict(kernel=base, dtype=dtype, arch=arch, **r))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name_filter = argv[argv.index("--filter") + 1] if "--filter" in argv else ""
    rows = report(name_filter=name_filter)
    if "--json" in argv:
        print(json.dumps(rows))
    else:
        w = max([20] + [len(r["kernel"]) + 2 for r in rows])
        print(f"{'kernel':<{w}}{'dtype':<7}{'arch':<7}{'registers':>10}{'spills':>8}"
              f"{'wgmma':>7}{'mma.sync':>9}")
        for r in rows:
            print(f"{r['kernel']:<{w}}{r['dtype']:<7}{'sm_' + str(r['arch']):<7}"
                  f"{r['registers']:>10}{r['spills']:>8}{r['wgmma']:>7}{r['mma_sync']:>9}")
    return 1 if any(r["spills"] for r in rows) else 0


# --------------------------------------------------------------------------------------------
# Positional encoding (kernels/posenc.py), added to the list above.

from . import posenc as _posenc  # noqa: E402

_all_kernels_before_posenc = all_kernels


def all_kernels() -> list[tuple[str, Any, dict[str, str], dict[str, Any]]]:  # noqa: F811
    rows = _all_kernels_before_posenc()
    floats = {"scale_hi": "fp32", "scale_lo": "fp32"}
    blk = {"BLOCK": _posenc.BLOCK}
    for dt in DTYPES:
        rows += [
            (f"posenc_fwd[{dt}]", _posenc._posenc_fwd_kernel,
             {**_sig(dt, "x_ptr out_ptr", "N T R D seed threshold"), **floats},
             dict(HAS_DROPOUT=True, **blk)),
            (f"posenc_bwd[{dt}]", _posenc._posenc_bwd_kernel,
             {**_sig(dt, "grad_ptr grad_x_ptr", "N seed threshold"), **floats}, dict(**blk)),
        ]
    return rows


# --------------------------------------------------------------------------------------------
# Attention (kernels/sdpa.py): the forward and backward kernels at the block sizes the GPU
# launcher autotunes from (its first config per table), with every mode flag on (bool mask,
# causal, dropout: the most live values), for realistic head dims. Strides of the last dim are
# 1 and the others divisible by 16, as Triton's runtime specialization sees contiguous tensors.

_SDPA_UNIT_STRIDES = {"sqe", "ske", "sve", "sms", "soe", "sde", "sdke", "sdve", "sdqe"}
_SDPA_FLOATS = {"qk_scale", "sm_scale", "drop_scale"}
_SDPA_NOT_DIVISIBLE = {"Hq", "Hk", "group", "seed", "threshold"}
_SDPA_POINTERS = {"Q", "K", "V", "Mask", "Out", "Lse", "DO", "Delta", "DQ", "DK", "DV"}


def sdpa_signature(kernel, dtype: str, constexprs: dict[str, Any]):
    """(signature, constexprs with the unit strides, attrs) for an sdpa kernel in `dtype`."""
    fn = getattr(kernel, "fn", kernel)
    names = list(getattr(kernel, "arg_names", None) or fn.__code__.co_varnames[:fn.__code__.co_argcount])
    pointers = {"Mask": "*i1", "Lse": "*fp32", "Delta": "*fp64" if dtype == "fp64" else "*fp32"}
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, a in enumerate(names):
        if a in constexprs:
            continue
        if a in _SDPA_UNIT_STRIDES:
            consts[a] = 1
        elif a in _SDPA_FLOATS:
            sig[a] = "fp32"
        elif a in _SDPA_POINTERS:
            sig[a] = pointers.get(a, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "i32"
            if a not in _SDPA_NOT_DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _sdpa_row(name, kernel, dtype, d, table, **modes):
    m, n, warps, stages = table[d][0]
    flags = dict(HAS_MASK=True, MASK_BOOL=True, IS_CAUSAL=True, DROPOUT=True, UPCAST=dtype == "fp32",
                 FP64=False, PREC="ieee" if dtype == "fp32" else "tf32", BLOCK_M=m, BLOCK_N=n,
                 BLOCK_D=d, BLOCK_DV=d)
    flags.update(modes)
    sig, consts, attrs = sdpa_signature(kernel, dtype, flags)
    return (f"{name}_d{d}[{dtype}]", kernel, sig, consts,
            dict(num_warps=warps, num_stages=stages, attrs=attrs))


# (dtype, head dim) per kernel: bf16 at 64 and 128 (and 256 forward), fp16 at 128, fp32 at 64.
_SDPA_CASES = {
    "sdpa_fwd": [("bf16", 64), ("bf16", 128), ("fp16", 128), ("bf16", 256), ("fp32", 64)],
    "sdpa_bwd_dkdv": [("bf16", 64), ("bf16", 128), ("fp32", 64)],
    "sdpa_bwd_dq": [("bf16", 64), ("bf16", 128), ("fp32", 64)],
}


def sdpa_kernels() -> list[tuple]:
    kernels = {"sdpa_fwd": (sdpa._sdpa_fwd_kernel, "fwd"),
               "sdpa_bwd_dkdv": (sdpa._sdpa_bwd_dkdv, "dkdv"),
               "sdpa_bwd_dq": (sdpa._sdpa_bwd_dq, "dq")}
    rows = []
    for name, cases in _SDPA_CASES.items():
        kernel, kind = kernels[name]
        for dtype, d in cases:
            rows.append(_sdpa_row(name, kernel, dtype, d, sdpa.config_table(kind, dtype == "fp32")))
    sig, consts, attrs = sdpa_signature(sdpa._sdpa_bwd_preprocess, "bf16",
                                        dict(FP64=False, BLOCK_M=64, BLOCK_DV=128))
    rows.append(("sdpa_bwd_preprocess_d128[bf16]", sdpa._sdpa_bwd_preprocess, sig, consts,
                 dict(num_warps=4, attrs=attrs)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
