"""Data-parallel training of models built on pyseqk layers (_tables.MODELS): 2 processes on the
127.0.0.1 loopback, gloo backend, each holding half of the batch, under DistributedDataParallel
and under FSDP2 (torch.distributed.fsdp.fully_shard); their gradients (and the parameters after
one SGD step) equal those of one process on the full batch.

All models and modes run in one spawn of the two workers (starting a process that imports torch
costs seconds); a deadline kills the workers so a hang can never stall CI. To add a wrapper, add
it to MODES; to add a model, add it to _tables.MODELS."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _tables import MODELS

WORLD = 2
BATCH = 6  # split evenly: DDP/FSDP average per-rank mean losses, which is then the full mean
DEADLINE_S = 300
LR = 0.1


def _ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for child in model.children():  # each layer its own unit, then the root, as FSDP2 advises
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    # a wrapper that silently did nothing would pass the comparison: the parameters must now be
    # shards (DTensors), each rank holding part of every tensor
    assert all(hasattr(p, "full_tensor") for p in model.parameters()), "fully_shard left plain tensors"
    return model


MODES = {"ddp": _ddp, "fsdp2": _fsdp2}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _data(model):
    args = model.make_input(BATCH, gen=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(0)
        out = model.make()(*args)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return args, target


def _shard(model, args, target, rank):
    per = BATCH // WORLD
    take = lambda t, d: t if d is None else t.narrow(d, rank * per, per)  # noqa: E731
    return tuple(take(a, d) for a, d in zip(args, model.batch_dims)), take(target, 0)


def train_step(model_case, wrap, rank):
    """One forward/backward/SGD step; returns {name: grad} and {name: param after the step}."""
    torch.manual_seed(0)
    model = model_case.make()
    args, target = _data(model_case)
    if wrap is not None:
        args, target = _shard(model_case, args, target, rank)
        wrapped = wrap(model)
    else:
        wrapped = model
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
    loss = ((wrapped(*args) - target) ** 2).mean()
    loss.backward()
    grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
    opt.step()
    params = {n: _full(p).detach().clone() for n, p in model.named_parameters()}
    return grads, params


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for model_case in MODELS:
            for mode, wrap in MODES.items():
                try:
                    results[(model_case.id, mode)] = ("ok", train_step(model_case, wrap, rank))
                except Exception as e:  # noqa: BLE001 - reported by the test in the parent
                    results[(model_case.id, mode)] = ("error", f"{type(e).__name__}: {e}")
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    old = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only; inherited by the workers
    try:
        ctx = mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False)
    finally:
        if old is None:
            del os.environ["GLOO_SOCKET_IFNAME"]
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = old
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish in {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _assert_dicts_close(ours, expected, what):
    assert list(ours) == list(expected), what
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what}: {name}: {m}")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.id)
def test_data_parallel_matches_one_process(distributed_results, model, mode):
    grads, params = train_step(model, None, 0)
    for rank, results in enumerate(distributed_results):
        status, value = results[(model.id, mode)]
        assert status == "ok", f"{mode} on rank {rank}: {value}"
        _assert_dicts_close(value[0], grads, f"{model.id} {mode} rank {rank} gradients")
        _assert_dicts_close(value[1], params, f"{model.id} {mode} rank {rank} parameters after SGD")
