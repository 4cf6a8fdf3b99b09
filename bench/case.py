"""What a benchmark case is. Each module in bench/cases/ defines ``cases(preset, device)``
returning a list of :class:`Case`; the runner (bench/runner.py) discovers, times and reports them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

Fn = Callable[[], Any]


@dataclass
class Case:
    name: str                     # unique, e.g. "lstm_cell.fwd.T100.B32.H256"
    group: str                    # e.g. "cells"; --filter matches name or group
    params: dict                  # shapes and mode, copied into the JSON
    flops: float                  # useful floating-point operations of one call (GEMM flops)
    bytes: float                  # approximate bytes one call must move at least
    # Either give the two callables directly, or a setup() that builds and returns
    # (torch_fn, pyseqk_fn). setup runs outside the timed region, once per backend timed, and
    # lazily, so that `--list` and filtered-out cases allocate nothing.
    torch_fn: Optional[Fn] = None
    pyseqk_fn: Optional[Fn] = None
    setup: Optional[Callable[[], tuple[Fn, Fn]]] = None
    # The callables return tensors (or tuples of tensors) that the runner compares once before
    # timing, so that a case can never time two different computations.
    atol: float = 1e-3
    rtol: float = 1e-3
    extra: dict = field(default_factory=dict)

    def build(self) -> tuple[Fn, Fn]:
        if self.setup is not None:
            return self.setup()
        if self.torch_fn is None or self.pyseqk_fn is None:
            raise ValueError(f"case {self.name}: give torch_fn and pyseqk_fn, or setup")
        return self.torch_fn, self.pyseqk_fn
