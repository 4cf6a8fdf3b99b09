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
# On a GPU (default and full presets): sizes where the kernel, not the launch, is the time, in
# the half types the tensor cores run, plus one fp32 row. (B, H, N, D, causal, backward, dtype)
SHAPES_CUDA = [
    (4, 16, 2048, 64, True, False, torch.bfloat16), (4, 16, 2048, 128, True, False, torch.bfloat16),
    (4, 16, 2048, 128, False, False, torch.bfloat16), (2, 16, 4096, 64, True, False, torch.float16),
    (4, 16, 2048, 64, True, True, torch.bfloat16), (4, 16, 2048, 128, False, True, torch.bfloat16),
    (4, 16, 2048, 64, True, False, torch.float32),
]


def attention_counts(B: int, H: int, N: int, D: int, causal: bool, backward: bool,
                     elem: int = FP32):
    """(flops, bytes) of one call. FLOPs: the two GEMMs of the forward, S = QK^T and O = PV,
    2 * 2 * B*H*N*N*D; causal keeps the lower triangle, N(N+1)/2 of the N^2 scores. The backward
    counts 5 GEMMs of that size (S recomputed, dP = dO V^T, dV, dQ, dK): forward+backward = 3.5x
    the forward. Softmax and exp are not counted. Bytes: q, k, v read and out written once
    (the scores never reach memory); forward+backward adds dO and out read, dq, dk, dv written."""
    pairs = N * (N + 1) / 2 if causal else N * N
    flops = 4.0 * B * H * pairs * D
    nbytes = 4.0 * B * H * N * D * elem
    if backward:
        flops *= 3.5
        nbytes += 5.0 * B * H * N * D * elem
    return flops, nbytes


def _make_setup(B, H, N, D, causal, backward, device, dtype=torch.float32):
    def setup():
        import torch.nn.functional as TF

        import pyseqk.functional as PF

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(3))
        go = torch.randn(B, H, N, D, generator=g).to(device, dtype)

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
    shapes = [s + (torch.float32,) for s in SHAPES[preset]]
    if device == "cuda" and preset != "quick":
        shapes = SHAPES_CUDA
    for B, H, N, D, causal, backward, dtype in shapes:
        mode = "fwdbwd" if backward else "fwd"
        flops, nbytes = attention_counts(B, H, N, D, causal, backward, dtype.itemsize)
        dt = str(dtype).removeprefix("torch.")
        name = f"sdpa.{'causal' if causal else 'full'}.{mode}.B{B}.H{H}.N{N}.D{D}"
        name += "" if dtype == torch.float32 else f".{dt}"
        half = dtype != torch.float32
        out.append(Case(
            name=name, group="attention",
            params={"B": B, "H": H, "N": N, "D": D, "causal": causal, "mode": mode, "dtype": dt},
            flops=flops, bytes=nbytes,
            setup=_make_setup(B, H, N, D, causal, backward, device, dtype),
            # half types: both sides round P to the half type before the PV product
            atol=2e-2 if half else 1e-4, rtol=2e-2 if half else 1e-3,
        ))
    return out
