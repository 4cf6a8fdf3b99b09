"""Scaled dot-product attention: pyseqk.functional.scaled_dot_product_attention against
torch.nn.functional.scaled_dot_product_attention (on the CPU: torch's own flash-attention kernel),
fp32, [B, H, N, D] inputs, forward (no_grad) and forward+backward. The peak extra memory of a
causal forward is measured separately by bench/attention_memory.py (a subprocess per side)."""
from __future__ import annotations

import torch

from bench.case import Case

FP32 = 4

# (B, H, N, D, causal, backward) per preset
SHAPES = {
    "quick": [(1, 4, 512, 64, True, False), (1, 4, 512, 64, False, False),
              (1, 4, 512, 64, True, True)],
    "default": [(4, 8, 1024, 64, True, False), (1, 8, 4096, 64, True, False),
                (4, 8, 1024, 64, False, False), (4, 8, 1024, 64, True, True)],
    "full": [(4, 8, 1024, 64, True, False), (1, 8, 4096, 64, True, False),
             (4, 8, 1024, 64, False, False), (4, 8, 1024, 64, True, True),
             (4, 8, 1024, 64, False, True), (8, 8, 256, 64, True, False),
             (2, 8, 2048, 128, True, False)],
}


def attention_counts(B: int, H: int, N: int, D: int, causal: bool, backward: bool):
    """(flops, bytes) of one call. FLOPs: the two GEMMs of the forward, S = QK^T and O = PV,
    2 * 2 * B*H*N*N*D; causal keeps the lower triangle, N(N+1)/2 of the N^2 scores. The backward
    counts 5 GEMMs of that size (S recomputed, dP = dO V^T, dV, dQ, dK): forward+backward = 3.5x
    the forward. Softmax and exp are not counted. Bytes: q, k, v read and out written once
    (the scores never reach memory); forward+backward adds dO and out read, dq, dk, dv written."""
    pairs = N * (N + 1) / 2 if causal else N * N
    flops = 4.0 * B * H * pairs * D
    nbytes = 4.0 * B * H * N * D * FP32
    if backward:
        flops *= 3.5
        nbytes += 5.0 * B * H * N * D * FP32
    return flops, nbytes


def _make_setup(B, H, N, D, causal, backward, device):
    def setup():
        import torch.nn.functional as TF

        import pyseqk.functional as PF

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(device) for _ in range(3))
        go = torch.randn(B, H, N, D, generator=g).to(device)

        def make(fn):
            if not backward:
                def run():
                    with torch.no_grad():
                        return fn(q, k, v, is_causal=causal)
                return run
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]

            def run_bwd():
                for t in leaves:
                    t.grad = None
                out = fn(*leaves, is_causal=causal)
                out.backward(go)
                return (out.detach(),) + tuple(t.grad for t in leaves)
            return run_bwd

        return make(TF.scaled_dot_product_attention), make(PF.scaled_dot_product_attention)

    return setup


def cases(preset: str, device: str = "cpu") -> list[Case]:
    out = []
    for B, H, N, D, causal, backward in SHAPES[preset]:
        mode = "fwdbwd" if backward else "fwd"
        flops, nbytes = attention_counts(B, H, N, D, causal, backward)
        name = f"sdpa.{'causal' if causal else 'full'}.{mode}.B{B}.H{H}.N{N}.D{D}"
        out.append(Case(
            name=name, group="attention",
            params={"B": B, "H": H, "N": N, "D": D, "causal": causal, "mode": mode,
                    "dtype": "float32"},
            flops=flops, bytes=nbytes,
            setup=_make_setup(B, H, N, D, causal, backward, device),
            atol=1e-4, rtol=1e-3,
        ))
    return out
