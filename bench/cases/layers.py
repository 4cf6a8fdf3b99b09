"""Whole-sequence layers: torch.nn.LSTM/GRU/RNN (1 layer, unidirectional) against the drop-in
pyseqk.nn.LSTM/GRU/RNN with the same weights (load_state_dict) and the same call, forward
(no_grad) and forward+backward: what a user who swaps the module gets, module overhead included."""
from __future__ import annotations

import torch

from bench.case import Case

# name -> (torch class name, gates G, constructor kwargs)
LAYERS = {
    "lstm": ("LSTM", 4, {}),
    "gru": ("GRU", 3, {}),
    "rnn_tanh": ("RNN", 1, {"nonlinearity": "tanh"}),
}

# (layer, mode, T, B, I, H, dtype) per preset; the goals of each row are in bench/NOTES.md.
_MAIN = [
    ("lstm", "fwd", 200, 1, 128, 128, torch.float32),
    ("lstm", "fwd", 100, 32, 256, 256, torch.float32),
    ("lstm", "fwdbwd", 100, 32, 256, 256, torch.float32),
    ("gru", "fwd", 100, 32, 256, 256, torch.float32),
    ("gru", "fwdbwd", 100, 32, 256, 256, torch.float32),
    ("rnn_tanh", "fwd", 100, 32, 256, 256, torch.float32),
    ("lstm", "fwd", 100, 32, 256, 256, torch.bfloat16),
    ("gru", "fwd", 100, 32, 256, 256, torch.bfloat16),
]
SHAPES = {
    "quick": [(n, m, max(1, T // 4), B, I, H, d) for n, m, T, B, I, H, d in _MAIN],
    "default": _MAIN,
    "full": _MAIN + [("gru", "fwd", 200, 1, 128, 128, torch.float32),
                     ("rnn_tanh", "fwdbwd", 100, 32, 256, 256, torch.float32),
                     ("lstm", "fwdbwd", 200, 1, 128, 128, torch.float32)],
}

# On a GPU (default and full presets): batches and widths that fill the chip's GEMMs.
SHAPES_CUDA = [
    ("lstm", "fwd", 200, 1, 128, 128, torch.float32),
    ("lstm", "fwd", 100, 64, 512, 512, torch.float32),
    ("lstm", "fwdbwd", 100, 64, 512, 512, torch.float32),
    ("gru", "fwd", 100, 64, 512, 512, torch.float32),
    ("rnn_tanh", "fwd", 100, 64, 512, 512, torch.float32),
    ("lstm", "fwd", 100, 64, 1024, 1024, torch.bfloat16),
    ("lstm", "fwdbwd", 100, 64, 1024, 1024, torch.bfloat16),
    ("gru", "fwd", 100, 64, 1024, 1024, torch.bfloat16),
]


def layer_counts(G: int, T: int, B: int, I: int, H: int, backward: bool, elem: int):
    """(flops, bytes). FLOPs: the input GEMM 2*T*B*I*G*H plus T recurrent GEMMs 2*B*H*G*H;
    the backward costs twice the forward GEMMs again (data and weight gradients), hence x3.
    Bytes: weights once, plus x [T,B,I], the output [T,B,H] and the saved gates [T,B,G*H]
    written and read once; x3 for forward+backward."""
    flops = 2.0 * T * B * (I + H) * G * H
    nbytes = (G * H * (I + H) + 2 * G * H + T * B * (I + H + G * H)) * elem
    if backward:
        flops *= 3
        nbytes *= 3
    return flops, nbytes


def _make_setup(layer: str, mode: str, T: int, B: int, I: int, H: int, dtype, device: str):
    cls_name, _, kwargs = LAYERS[layer]
    backward = mode == "fwdbwd"

    def setup():
        import pyseqk

        torch.manual_seed(0)
        ref = getattr(torch.nn, cls_name)(I, H, **kwargs).to(device=device, dtype=dtype)
        ours = getattr(pyseqk.nn, cls_name)(I, H, **kwargs).to(device=device, dtype=dtype)
        ours.load_state_dict(ref.state_dict())
        ref.flatten_parameters()  # cuDNN's weight buffer (a no-op on the CPU)
        x = torch.randn(T, B, I, device=device, dtype=dtype)
        h0 = (torch.randn(1, B, H, device=device) * 0.1).to(dtype)
        c0 = (torch.randn(1, B, H, device=device) * 0.1).to(dtype)

        def call_of(m):
            def call():
                if layer == "lstm":
                    out, (h, _) = m(x, (h0, c0))
                else:
                    out, h = m(x, h0)
                return out, h[0]
            return call

        torch_call, ours_call = call_of(ref), call_of(ours)

        def fwd(call):
            def run():
                with torch.no_grad():
                    return call()
            return run

        def fwd_bwd(call, params):
            def run():
                for p in params:  # a training step starts from no gradient
                    p.grad = None
                out, h = call()
                (out.sum() + h.sum()).backward()
                return out.detach(), params[1].grad, params[0].grad
            return run

        if backward:
            return (fwd_bwd(torch_call, [ref.weight_ih_l0, ref.weight_hh_l0]),
                    fwd_bwd(ours_call, [ours.weight_ih_l0, ours.weight_hh_l0]))
        return fwd(torch_call), fwd(ours_call)

    return setup


def cases(preset: str, device: str = "cpu") -> list[Case]:
    out = []
    shapes = SHAPES_CUDA if device == "cuda" and preset != "quick" else SHAPES[preset]
    for layer, mode, T, B, I, H, dtype in shapes:
        G = LAYERS[layer][1]
        dt = str(dtype).removeprefix("torch.")
        flops, nbytes = layer_counts(G, T, B, I, H, mode == "fwdbwd", dtype.itemsize)
        name = f"{layer}_layer.{mode}.T{T}.B{B}.H{H}" + (f".I{I}" if I != H else "")
        name += "" if dtype == torch.float32 else f".{dt}"
        bf16 = dtype == torch.bfloat16
        out.append(Case(
            name=name, group="layers",
            params={"layer": layer, "mode": mode, "T": T, "B": B, "I": I, "H": H, "dtype": dt},
            flops=flops, bytes=nbytes,
            setup=_make_setup(layer, mode, T, B, I, H, dtype, device),
            # fp32 over 100-200 steps with a different summation order; bf16 rounds every step
            # (and the two sides round in different places), so its check only catches gross
            # errors; its accuracy is tested against the fp64 oracle in tests/test_layers.py.
            atol=1e-1 if bf16 else 2e-3, rtol=1e-1 if bf16 else 2e-3,
        ))
    return out
