"""Concurrency and determinism of every op in _tables.OPS and module in _tables.MODULES.

- Forward and backward from 4 Python threads at once, each with its own inputs, give bitwise
  the results of serial runs (the kernels keep no global state; at::parallel_for inside each
  call shares torch's intra-op pool with the other threads).
- CPU forward and backward are bitwise reproducible run to run.
- Under torch.use_deterministic_algorithms(True) everything still runs on the CPU and gives the
  same bits.

GPU: the cell kernels are pointwise (one thread per element, no atomics) and their GEMMs and bias
reductions are cuBLAS/ATen calls that torch itself makes deterministic under the flag, so the
GPU paths are deterministic; test_gpu_deterministic checks that where a GPU exists. An op added
later whose GPU path uses atomics must raise under the flag
(torch.utils.deterministic / at::globalContext().alertNotDeterministic) and be listed in
NONDETERMINISTIC_GPU below: the CUDA Bahdanau backward (atomicAdd into dv) is the one so far.

Backend overrides (pyseqk.use_backend) are a process-wide stack, not per thread: the threads
here run under one override taken in the main thread."""
import threading

import pytest
import torch

import pyseqk

from _tables import MODULES, OPS, outputs

# "op[backend]" of GPU paths that are not deterministic (and raise under the flag)
NONDETERMINISTIC_GPU = {"bahdanau_attention[cuda]"}
THREADS = 4
# Each op's sizes large enough that its kernels fork (at::parallel_for): op.big_sizes.
GPU_CELL_SIZES = {"B": 256, "I": 256, "H": 512}
# Backends run from several threads: the Triton interpreter is exercised single-threaded only.
THREAD_BACKENDS = ["cpu", "reference"]


def forward_backward(op, args, seed):
    """Outputs and all gradients, for a fixed output gradient."""
    args = [a.detach().clone().requires_grad_() if is_float(a) else a for a in args]
    outs = outputs(op.fn(*args))
    g = torch.Generator().manual_seed(seed)
    pairs = [(o, torch.randn(o.shape, generator=g).to(o)) for o in outs]
    torch.autograd.backward(*zip(*[p for p in pairs if p[0].requires_grad]))
    return [o.detach() for o in outs] + [a.grad for a in args if is_float(a)]


def is_float(a):
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def bits(t):
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8)


def same_bits(a, b):
    """Bitwise equality (torch.equal calls NaN unequal to itself and -0 equal to 0)."""
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(bits(x), bits(y))
                                    for x, y in zip(a, b))


def inputs(op, k, sizes=None, dtype=torch.float32):
    return op.make_args(sizes or op.big_sizes, dtype, "cpu", True, torch.Generator().manual_seed(100 + k))


def run_threads(work):
    """Runs work(k) for k < THREADS in as many threads, started together; returns the results."""
    results, errors = [None] * THREADS, []
    barrier = threading.Barrier(THREADS)

    def target(k):
        try:
            barrier.wait()
            results[k] = work(k)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=target, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("backend", THREAD_BACKENDS)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_threads_match_serial(op, backend):
    with pyseqk.use_backend(backend):
        serial = [forward_backward(op, inputs(op, k), k) for k in range(THREADS)]
        for _ in range(3):
            threaded = run_threads(lambda k: [forward_backward(op, inputs(op, k), k) for _ in range(3)])
            for k in range(THREADS):
                for rep in threaded[k]:
                    assert same_bits(rep, serial[k]), f"{op.name}[{backend}] thread {k} differs from serial"


@pytest.mark.parametrize("case", MODULES, ids=lambda c: c.id)
def test_module_threads_match_serial(case):
    """One module per thread (as in data-parallel inference servers), forward and backward."""
    def build():  # in the main thread: torch's global RNG is shared by all threads
        torch.manual_seed(0)
        return [case.pyseqk_cls(**case.kwargs) for _ in range(THREADS)]

    def run(k, modules):
        m = modules[k]
        out = outputs(m(*case.make_input(m, 33, gen=torch.Generator().manual_seed(k))))
        sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()
        return [o.detach() for o in out] + [p.grad for p in m.parameters()]

    serial_modules, thread_modules = build(), build()
    serial = [run(k, serial_modules) for k in range(THREADS)]
    threaded = run_threads(lambda k: run(k, thread_modules))
    for k in range(THREADS):
        assert same_bits(threaded[k], serial[k]), f"{case.id}: thread {k} differs from serial"


def test_shared_module_concurrent_inference():
    """One shared module, several threads calling forward under no_grad (the read-only case)."""
    for case in MODULES:
        torch.manual_seed(0)
        m = case.pyseqk_cls(**case.kwargs)
        xs = [case.make_input(m, 17, gen=torch.Generator().manual_seed(k)) for k in range(THREADS)]
        with torch.no_grad():
            serial = [list(outputs(m(*xs[k]))) for k in range(THREADS)]
            threaded = run_threads(lambda k: [list(outputs(m(*xs[k]))) for _ in range(5)])
        for k in range(THREADS):
            for rep in threaded[k]:
                assert same_bits(rep, serial[k]), case.id


def cpu_backends_all():
    from conftest import cpu_backends

    return cpu_backends()


@pytest.mark.parametrize("backend", cpu_backends_all())
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_run_to_run_bitwise(op, backend):
    sizes = op.big_sizes if backend != "triton" else op.default_sizes
    for dtype in (torch.float32, torch.bfloat16):
        args = inputs(op, 0, sizes, dtype)
        with pyseqk.use_backend(backend):
            first = forward_backward(op, args, 0)
            for _ in range(2):
                assert same_bits(forward_backward(op, args, 0), first), f"{op.name}[{backend}] {dtype}"


@pytest.mark.parametrize("backend", cpu_backends_all())
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_deterministic_algorithms_flag(op, backend):
    sizes = op.big_sizes if backend != "triton" else op.default_sizes
    args = inputs(op, 0, sizes)
    with pyseqk.use_backend(backend):
        free = forward_backward(op, args, 0)
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            strict = forward_backward(op, args, 0)
            strict2 = forward_backward(op, args, 0)
        finally:
            torch.use_deterministic_algorithms(before)
    assert same_bits(strict, strict2) and same_bits(strict, free), f"{op.name}[{backend}]"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_gpu_deterministic(op, backend):
    sizes = GPU_CELL_SIZES if set(op.dims) == set(GPU_CELL_SIZES) else op.big_sizes
    args = [a.cuda() if isinstance(a, torch.Tensor) and a.dtype != torch.int64 else a
            for a in inputs(op, 0, sizes)]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pyseqk.use_backend(backend):
            if f"{op.name}[{backend}]" in NONDETERMINISTIC_GPU:
                with pytest.raises(RuntimeError, match="deterministic"):
                    forward_backward(op, args, 0)
                return
            runs = [forward_backward(op, args, 0) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(before)
    assert same_bits(runs[1], runs[0]) and same_bits(runs[2], runs[0])
