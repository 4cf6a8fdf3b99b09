"""Single-step cells in a Python time loop (the way seq2seq decoders use them): pyseqk.nn.*Cell
against torch.nn.*Cell with the same weights, forward (no_grad) and forward+backward."""
from __future__ import annotations

import torch

from bench.case import Case

# name -> (torch class name, gates G, constructor kwargs)
CELLS = {
    "lstm_cell": ("LSTMCell", 4, {}),
    "gru_cell": ("GRUCell", 3, {}),
    "rnn_tanh_cell": ("RNNCell", 1, {"nonlinearity": "tanh"}),
    "rnn_relu_cell": ("RNNCell", 1, {"nonlinearity": "relu"}),
}

# (cells, T, B, I, H) per preset; every shape runs forward and forward+backward.
_MAIN = ("lstm_cell", "gru_cell", "rnn_tanh_cell")
SHAPES = {
    # a smoke test: the same cells and widths, fewer steps
    "quick": [(_MAIN, 25, 32, 256, 256), (_MAIN, 25, 1, 128, 128)],
    "default": [(_MAIN, 100, 32, 256, 256), (_MAIN, 100, 1, 128, 128)],
    "full": [(_MAIN + ("rnn_relu_cell",), 100, 32, 256, 256), (_MAIN, 100, 1, 128, 128),
             (_MAIN, 100, 64, 512, 512), (_MAIN, 50, 128, 1024, 1024)],
}

FP32 = 4


def cell_counts(G: int, T: int, B: int, I: int, H: int, lstm: bool, backward: bool):
    """(flops, bytes) of T steps. FLOPs: the two GEMMs, 2*B*(I+H)*G*H per step; the backward
    costs two more GEMMs of the same size (dX/dH and dW), hence x3. Bytes: the weights once (they
    stay in cache across steps at these sizes), plus per step x, h in and h out (and c in, c out
    for the LSTM); x3 for forward+backward (weights read again and gradients written)."""
    flops = 2.0 * B * (I + H) * G * H * T
    weights = (G * H * (I + H) + 2 * G * H) * FP32
    acts = T * B * (I + 2 * H + (2 * H if lstm else 0)) * FP32
    nbytes = weights + acts
    if backward:
        flops *= 3
        nbytes *= 3
    return flops, nbytes


def _make_setup(cell: str, T: int, B: int, I: int, H: int, backward: bool, device: str):
    cls_name, _, kwargs = CELLS[cell]
    lstm = cell == "lstm_cell"

    def setup():
        import pyseqk.nn

        torch.manual_seed(0)
        ref = getattr(torch.nn, cls_name)(I, H, **kwargs).to(device)
        ours = getattr(pyseqk.nn, cls_name)(I, H, **kwargs).to(device)
        ours.load_state_dict(ref.state_dict())
        xs = list(torch.randn(T, B, I, device=device).unbind(0))
        h0 = torch.randn(B, H, device=device) * 0.1
        c0 = torch.randn(B, H, device=device) * 0.1

        def loop(m):
            h, c = h0, c0
            if lstm:
                for x in xs:
                    h, c = m(x, (h, c))
            else:
                for x in xs:
                    h = m(x, h)
            return h

        def fwd(m):
            def run():
                with torch.no_grad():
                    return loop(m)
            return run

        def fwd_bwd(m):
            params = list(m.parameters())

            def run():
                for p in params:  # a training step starts from no gradient, not from accumulating
                    p.grad = None
                h = loop(m)
                h.sum().backward()
                return h.detach(), m.weight_hh.grad, m.weight_ih.grad
            return run

        make = fwd_bwd if backward else fwd
        return make(ref), make(ours)

    return setup


def cases(preset: str, device: str = "cpu") -> list[Case]:
    out = []
    for cells, T, B, I, H in SHAPES[preset]:
        for cell in cells:
            G = CELLS[cell][1]
            for backward in (False, True):
                mode = "fwdbwd" if backward else "fwd"
                flops, nbytes = cell_counts(G, T, B, I, H, cell == "lstm_cell", backward)
                name = f"{cell}.{mode}.T{T}.B{B}.H{H}" + (f".I{I}" if I != H else "")
                out.append(Case(
                    name=name, group="cells",
                    params={"cell": cell, "mode": mode, "T": T, "B": B, "I": I, "H": H,
                            "dtype": "float32"},
                    flops=flops, bytes=nbytes,
                    setup=_make_setup(cell, T, B, I, H, backward, device),
                    # fp32 over 100 steps, different summation order; the relu RNN can grow.
                    atol=1e-3 if cell != "rnn_relu_cell" else 1e-2, rtol=1e-3,
                ))
    return out
