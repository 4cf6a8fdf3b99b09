"""seq2seq attention: pyseqk.nn.BahdanauAttention / pyseqk.functional.luong_attention against the
plain-PyTorch formulations (Bahdanau: PyTorch's translation tutorial's module, extended to Tq
query steps with unsqueeze, materialising [B, Tq, Tk, U]; Luong: bmm, softmax, bmm), same
weights, forward+backward (training with teacher forcing) and a no-grad decoder step (Tq = 1).

Peak memory of the Bahdanau case is measured separately by bench/seq2seq_memory.py."""
from __future__ import annotations

import torch

from bench.case import Case

FP32 = 4

# (kind, mode, B, Tq, Tk, H) per preset; H = hidden = units = value width.
SHAPES = {
    "quick": [("bahdanau", "fwdbwd", 4, 16, 64, 64), ("luong", "fwdbwd", 4, 16, 64, 64),
              ("bahdanau", "step", 16, 1, 64, 64)],
    "default": [("bahdanau", "fwdbwd", 16, 64, 256, 256), ("luong", "fwdbwd", 16, 64, 256, 256),
                ("bahdanau", "step", 16, 1, 256, 256), ("luong", "step", 16, 1, 256, 256),
                ("bahdanau", "fwd", 16, 64, 256, 256)],
}
SHAPES["full"] = SHAPES["default"] + [("bahdanau", "fwdbwd", 64, 32, 64, 128),
                                      ("bahdanau", "step", 128, 1, 64, 512)]


def counts(kind: str, mode: str, B: int, Tq: int, Tk: int, H: int) -> tuple[float, float, float]:
    """(flops, bytes, tanh count) of one call.

    Bahdanau: N = B*Tq*Tk*U score elements, each a tanh plus 3 FLOP (the add wq + uk and the
    multiply-add with v); the tanh count is reported apart (it dominates). The projections Wa q, Ua k are GEMMs,
    2*B*(Tq+Tk)*H*U; softmax ~5 FLOP per score; context 2*B*Tq*Tk*H. Backward: the tanh again,
    ds*(1 - t^2) and three accumulations (~6 FLOP per element), the softmax backward, the context
    GEMMs x2 and the projection GEMMs x2. Luong: score and context GEMMs, 2*B*Tq*Tk*H each, x3
    for the backward. Bytes: what a fused kernel must move at least (inputs, weights, outputs and
    their gradients), never the [B, Tq, Tk, U] tensor."""
    S = B * Tq * Tk
    N = S * H
    proj = 2.0 * B * (Tq + Tk) * H * H
    io = (B * (Tq + 2 * Tk) * H + S + B * Tq * H) * FP32
    if kind == "bahdanau":
        fwd = proj + 3.0 * N + 5.0 * S + 2.0 * S * H
        bwd = 2 * proj + 6.0 * N + 5.0 * S + 4.0 * S * H
        tanh = N * (2 if mode == "fwdbwd" else 1)
    else:
        fwd = 4.0 * N + 5.0 * S
        bwd = 8.0 * N + 5.0 * S
        tanh = 0
    if mode == "fwdbwd":
        return fwd + bwd, 2 * io, tanh
    return fwd, io, tanh


class _TutorialBahdanau(torch.nn.Module):
    """The tutorial's BahdanauAttention, with unsqueezes so that it takes Tq > 1 queries."""

    def __init__(self, hidden_size):
        super().__init__()
        self.Wa = torch.nn.Linear(hidden_size, hidden_size)
        self.Ua = torch.nn.Linear(hidden_size, hidden_size)
        self.Va = torch.nn.Linear(hidden_size, 1)

    def forward(self, query, keys):
        scores = self.Va(torch.tanh(self.Wa(query).unsqueeze(2) + self.Ua(keys).unsqueeze(1)))
        weights = torch.softmax(scores.squeeze(3), dim=-1)
        return torch.bmm(weights, keys), weights


def _luong_torch(query, keys):
    weights = torch.softmax(torch.bmm(query, keys.transpose(1, 2)), dim=-1)
    return torch.bmm(weights, keys), weights


def _make_setup(kind, mode, B, Tq, Tk, H, device):
    def setup():
        import pyseqk

        torch.manual_seed(0)
        query = torch.randn(B, Tq, H, device=device)
        keys = torch.randn(B, Tk, H, device=device)
        if kind == "bahdanau":
            ref = _TutorialBahdanau(H).to(device)
            ours = pyseqk.nn.BahdanauAttention(H).to(device)
            ours.load_state_dict(ref.state_dict())
            params = {"torch": [p for n, p in ref.named_parameters() if n != "Va.bias"],
                      "pyseqk": [p for n, p in ours.named_parameters() if n != "Va.bias"]}
        else:
            ref = _luong_torch
            ours = pyseqk.functional.luong_attention
            params = {"torch": [], "pyseqk": []}

        def make(fn, side):
            if mode in ("fwd", "step"):
                def run():
                    with torch.no_grad():
                        return fn(query, keys)
                return run

            ps = params[side]

            def run():
                q = query.detach().requires_grad_()
                k = keys.detach().requires_grad_()
                for p in ps:  # a training step starts from no gradient
                    p.grad = None
                context, weights = fn(q, k)
                (context.sum() + (weights * weights).sum()).backward()
                return (context.detach(), q.grad, k.grad, *[p.grad for p in ps])
            return run

        return make(ref, "torch"), make(ours, "pyseqk")

    return setup


def cases(preset: str, device: str = "cpu") -> list[Case]:
    out = []
    for kind, mode, B, Tq, Tk, H in SHAPES[preset]:
        flops, nbytes, tanh = counts(kind, mode, B, Tq, Tk, H)
        out.append(Case(
            name=f"{kind}.{mode}.B{B}.Tq{Tq}.Tk{Tk}.H{H}", group="seq2seq",
            params={"kind": kind, "mode": mode, "B": B, "Tq": Tq, "Tk": Tk, "H": H,
                    "dtype": "float32"},
            flops=flops, bytes=nbytes, setup=_make_setup(kind, mode, B, Tq, Tk, H, device),
            # fp32 sums over Tk = 256 keys and U = 256 units in another order
            atol=1e-3, rtol=1e-3, extra={"tanh": tanh},
        ))
    return out
