"""Helpers shared by the tests: the FlashAttention accuracy rule and random cell arguments."""
import torch

# Absolute slack added to "twice PyTorch's own error", per dtype.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a, b):
    if a is None or b is None:
        assert a is None and b is None, "one side has a gradient, the other does not"
        return 0.0
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_rule(ours, torch_same_dtype, oracle, dtype, what=""):
    """ours and torch_same_dtype are computed in `dtype`, oracle in float64: the error of ours
    must be at most twice PyTorch's own error plus a small atol (the FlashAttention rule)."""
    if oracle is None:
        assert ours is None and torch_same_dtype is None, f"{what}: expected no gradient"
        return
    err = max_err(ours, oracle)
    base = max_err(torch_same_dtype, oracle)
    bound = 2 * base + ATOL[dtype] * max(1.0, oracle.abs().max().item() if oracle.numel() else 1.0)
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (torch's own error {base:.3e})"
