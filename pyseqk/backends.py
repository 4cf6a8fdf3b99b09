"""Which implementation of an op runs.

Backends: ``cpu`` (C++ kernels, CPU tensors), ``cuda`` (CUDA C++ kernels, CUDA tensors),
``triton`` (kernels/, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and ``reference``
(plain PyTorch, anything). The default is ``cpu`` for CPU tensors and ``cuda`` for CUDA tensors
when compiled in, else ``triton``; ``reference`` when nothing else is built.

Override with the environment variable ``PYSEQK_BACKEND=<name>`` (read when pyseqk is imported,
and again by :func:`reload_environment`) or, innermost first, ``with pyseqk.use_backend(name):``.
A backend that is asked for and cannot run the given tensors raises :class:`BackendError`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import os

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")


class BackendError(RuntimeError):
    """A backend was asked for that is not built or cannot run on the tensors' device."""


# The override stack. A plain module global (not a ContextVar) so that torch.compile can read it
# and guard on it without a graph break.
_stack: list[str] = []
_env_choice: str | None = None


def _validate_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def reload_environment() -> None:
    """Re-read PYSEQK_BACKEND."""
    global _env_choice
    value = os.environ.get("PYSEQK_BACKEND", "").strip()
    _env_choice = _validate_name(value, "PYSEQK_BACKEND") if value else None
    _precompute()


@contextlib.contextmanager
def use_backend(name: str):
    """Run every pyseqk op inside the block on backend ``name``."""
    _stack.append(_validate_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _stack.pop()


@functools.lru_cache(maxsize=None)
def native_status() -> tuple[bool, str, dict]:
    """(loaded, reason if not, build info) of the compiled extension pyseqk._C."""
    try:
        importlib.import_module("pyseqk._C")
    except ImportError as e:  # not built, or built for another torch
        return False, f"pyseqk._C could not be loaded ({e})", {}
    return True, "", json.loads(torch.ops.pyseqk.build_info())


def triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, ""


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run tensors on ``device_type``, or None when it can."""
    if name == "reference":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' runs CPU tensors, got {device_type} tensors"
        ok, why, _ = native_status()
        return None if ok else f"backend 'cpu' is not built: {why}"
    if name == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs CUDA tensors, got {device_type} tensors"
        ok, why, info = native_status()
        if not ok:
            return f"backend 'cuda' is not built: {why}"
        if not info.get("cuda"):
            return "backend 'cuda' is not built: pyseqk._C was compiled without CUDA"
        return None
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            return f"backend 'triton' is not available: {why}"
        if device_type == "cuda" or (device_type == "cpu" and triton_interpreter()):
            return None
        return (f"backend 'triton' runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                f"got {device_type} tensors")
    return f"unknown backend {name!r}"


# Precomputed by reload_environment(), so that resolve() is plain dict and list lookups that
# torch.compile traces (and guards on) without a graph break.
_DEVICE_TYPES = ("cpu", "cuda")
_reasons: dict[tuple[str, str], str | None] = {}
_defaults: dict[str, str] = {}


def _precompute() -> None:
    _reasons.clear()
    for name in BACKENDS:
        for dev in _DEVICE_TYPES:
            _reasons[(name, dev)] = unavailable_reason(name, dev)
    _defaults.clear()
    for dev, candidates in (("cpu", ("cpu",)), ("cuda", ("cuda", "triton"))):
        _defaults[dev] = next((n for n in candidates if _reasons[(n, dev)] is None), "reference")


def default_backend(device_type: str) -> str:
    return _defaults.get(device_type, "reference")


def resolve(device: torch.device) -> str:
    """The backend that runs an op whose tensors live on ``device``."""
    name = _stack[-1] if _stack else _env_choice
    if name is None:
        return _defaults.get(device.type, "reference")
    if name == "reference":
        return name
    why = _reasons.get((name, device.type), f"backend {name!r} cannot run {device.type} tensors")
    if why is not None:
        raise BackendError(why)
    return name


def info() -> dict:
    """What is built and what runs where: the data behind `python -m pyseqk info`."""
    ok, why, build = native_status()
    t_ok, t_why = triton_status()
    triton_version = None
    if t_ok:
        import triton

        triton_version = triton.__version__
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version or t_why,
        "triton_interpreter": triton_interpreter(),
        "extension": "loaded" if ok else why,
        "cpu_isa_built": build.get("cpu_isa"),
        "cpu_capability_torch": torch.backends.cpu.get_cpu_capability(),
        "cuda_compiled": bool(build.get("cuda")),
        "cuda_archs": build.get("cuda_archs") or None,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "override": _stack[-1] if _stack else _env_choice,
        "backend_per_device": {d: resolve(torch.device(d)) for d in devices},
        "backends": {
            name: {d: (unavailable_reason(name, d) or "ok") for d in ("cpu", "cuda")}
            for name in BACKENDS
        },
    }


reload_environment()
