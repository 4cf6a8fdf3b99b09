"""Peak extra memory of a causal attention forward, pyseqk against torch: each side runs in its
own subprocess, which reports how much its peak resident set (ru_maxrss) grew during one call
after the inputs exist and a small warm-up call has loaded every library and thread.

    python -m bench.attention_memory [--B 1 --H 4 --N 8192 --D 64 --threads 2]

The output itself ([B, H, N, D] fp32: 8 MiB at the default shape) is part of the growth; an
L x S score matrix per head would be N^2 * 4 bytes = 256 MiB at N = 8192.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
args = sys.argv[1:]
B, H, N, D, threads = map(int, args[:5])
side = args[5]
torch.set_num_threads(threads)
if side == "pyseqk":
    import pyseqk.functional as F
    fn = F.scaled_dot_product_attention
else:
    fn = torch.nn.functional.scaled_dot_product_attention
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
with torch.no_grad():
    fn(q[:, :, :512], k[:, :, :512], v[:, :, :512], is_causal=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn(q, k, v, is_causal=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"side": side, "peak_growth_bytes": (after - before) * 1024,
                  "output_bytes": out.numel() * out.element_size()}))
"""


def measure(side: str, B: int, H: int, N: int, D: int, threads: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", CHILD, str(B), str(H), str(N), str(D), str(threads),
                          side], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    mib = 2 ** 20
    print(f"causal forward B={a.B} H={a.H} N={a.N} D={a.D} fp32, {a.threads} threads; "
          f"one N x N fp32 score matrix = {a.N * a.N * 4 / mib:.0f} MiB")
    for side in ("torch", "pyseqk"):
        r = measure(side, a.B, a.H, a.N, a.D, a.threads)
        print(f"  {side:7s} peak RSS growth {r['peak_growth_bytes'] / mib:8.1f} MiB "
              f"(output {r['output_bytes'] / mib:.1f} MiB)")


if __name__ == "__main__":
    main()
