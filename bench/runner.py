"""The shared benchmark runner: discovers the cases in bench/cases/, times pyseqk against PyTorch
by alternating single calls, and reports a table, a JSON file and a chart. Method: bench/NOTES.md."""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import pkgutil
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.case import Case

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# seconds: time budget per case (after warm-up); min_pairs: at least this many A,B pairs however
# long a call takes; warmup_s: untimed alternating calls before timing (at least one each, and
# that first call is the correctness check); max_s: stop a case after this long even short of
# min_pairs (a busy machine must not turn a smoke test into minutes); peak_s: budget of the GEMM
# peak measurement. Cases may also use smaller shapes under "quick".
PRESETS = {
    "quick": {"seconds": 0.2, "min_pairs": 3, "max_s": 2.0, "warmup_s": 0.0, "peak_s": 0.3},
    "default": {"seconds": 1.5, "min_pairs": 10, "max_s": 20.0, "warmup_s": 0.3, "peak_s": 1.0},
    "full": {"seconds": 4.0, "min_pairs": 25, "max_s": 60.0, "warmup_s": 1.0, "peak_s": 2.0},
}
MAX_PAIRS = 100_000
PEAK_N = 1024


# ----------------------------------------------------------------------------- discovery

def discover(preset: str, device: str) -> list[Case]:
    """Every Case of every module in bench/cases/ (modules starting with "_" are skipped)."""
    import bench.cases as pkg

    found: list[Case] = []
    for mod_info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if mod_info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"bench.cases.{mod_info.name}")
        factory = getattr(mod, "cases", None)
        if factory is None:
            continue
        kwargs = {"device": device} if "device" in inspect.signature(factory).parameters else {}
        found.extend(factory(preset, **kwargs))
    names = [c.name for c in found]
    dups = {n for n in names if names.count(n) > 1}
    if dups:
        raise ValueError(f"duplicate case names: {sorted(dups)}")
    return found


def select(cases: list[Case], filters: list[str] | None) -> list[Case]:
    if not filters:
        return cases
    subs = [s.strip() for f in filters for s in f.split(",") if s.strip()]
    return [c for c in cases if any(s in c.name or s == c.group for s in subs)]


# ----------------------------------------------------------------------------- timing

def make_timer(device: str):
    """A function fn -> seconds of one call of fn, for the device."""
    if device == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def timed(fn):
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3
        return timed

    clock = time.perf_counter

    def timed(fn):
        t0 = clock()
        fn()
        return clock() - t0
    return timed


def alternate(fn_a, fn_b, timer, seconds: float, min_pairs: int, warmup_s: float,
              max_s: float = math.inf):
    """Warm up, then time single calls A, B, A, B, ... for ``seconds`` (and at least
    ``min_pairs`` pairs, unless that takes more than ``max_s``). Interference from the rest of
    the machine only ever adds time, and alternating exposes both sides to the same interference, so their minima are comparable."""
    t_end = time.perf_counter() + warmup_s
    while True:
        fn_a()
        fn_b()
        if time.perf_counter() >= t_end:
            break
    times_a: list[float] = []
    times_b: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        while True:
            times_a.append(timer(fn_a))
            times_b.append(timer(fn_b))
            n, elapsed = len(times_a), time.perf_counter() - t0
            if n >= MAX_PAIRS or elapsed >= max_s or (n >= min_pairs and elapsed >= seconds):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times_a, times_b


def measure_peak(device: str, seconds: float) -> dict:
    """This machine's fp32 GEMM rate: a 1024^3 torch.mm timed like the cases (minimum)."""
    n = PEAK_N
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    c = torch.empty(n, n, device=device)
    fn = lambda: torch.mm(a, b, out=c)  # noqa: E731
    timer = make_timer(device)
    times, _ = alternate(fn, fn, timer, seconds, 5, min(0.2, seconds))
    flops = 2.0 * n ** 3
    t = min(times)
    return {"shape": [n, n, n], "dtype": "float32", "min_s": t, "median_s": statistics.median(times),
            "gflops": flops / t / 1e9, "n": len(times)}


# ----------------------------------------------------------------------------- checks

def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def compare(out_torch, out_pyseqk, atol: float, rtol: float) -> str:
    a, b = _flatten(out_torch), _flatten(out_pyseqk)
    if len(a) != len(b):
        return f"mismatch: {len(a)} vs {len(b)} outputs"
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return f"mismatch: shape {list(x.shape)} vs {list(y.shape)}"
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        err = (x - y).abs()
        if not bool((err <= atol + rtol * x.abs()).all()):
            return f"mismatch: max abs err {err.max().item():.2e}"
        worst = max(worst, err.max().item() if err.numel() else 0.0)
    return "ok" if a else "unchecked"


# ----------------------------------------------------------------------------- machine info

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy_fraction(interval: float = 0.3) -> float | None:
    """Fraction of all CPUs that were not idle over ``interval`` seconds (/proc/stat), before the
    runner itself starts working: what the rest of the machine is doing."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle+iowait
    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str, threads: int) -> dict:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    try:
        import pyseqk

        pyseqk_info = pyseqk.backends.info()
    except Exception as e:  # the runner must still report torch-only numbers
        pyseqk_info = f"pyseqk not importable: {type(e).__name__}: {e}"
    status = _git("status", "--porcelain")
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": device,
        "cuda_device": torch.cuda.get_device_name() if device == "cuda" else None,
        "pyseqk": pyseqk_info,
        "PYSEQK_BACKEND": os.environ.get("PYSEQK_BACKEND"),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }
    return info


# ----------------------------------------------------------------------------- one case

def backends_for(device: str, requested: str | None) -> list[str | None]:
    """The pyseqk backends to time; None means pyseqk's own choice (PYSEQK_BACKEND or default)."""
    if requested:
        return [b.strip() for b in requested.split(",") if b.strip()]
    return [None] if device == "cpu" else ["cuda", "triton"]


def run_case(case: Case, backend: str | None, device: str, cfg: dict, peak_gflops: float,
             aa: bool = False) -> dict:
    """Time one case. With ``aa`` the "pyseqk" side is a second, separately built torch side:
    an A/A run whose ratio shows how well the method cancels this machine's noise."""
    import pyseqk

    row = {"name": case.name, "group": case.group, "params": case.params, "flops": case.flops,
           "bytes": case.bytes}
    if backend and not aa and backend in pyseqk.backends.BACKENDS:
        why = pyseqk.backends.unavailable_reason(backend, device)
        if why is not None:  # not built here, or not for this device: say so, do not fail
            row.update(backend=backend, skipped=why)
            return row
    ctx = pyseqk.use_backend(backend) if backend and not aa else contextlib.nullcontext()
    with ctx:
        row["backend"] = "torch A/A" if aa else pyseqk.backends.resolve(torch.device(device))
        why = None if aa else pyseqk.backends.unavailable_reason(row["backend"], device)
        if why is not None:
            row["skipped"] = why
            return row
        if aa:
            torch_fn, pyseqk_fn = case.build()[0], case.build()[0]
        else:
            torch_fn, pyseqk_fn = case.build()
        row["check"] = compare(torch_fn(), pyseqk_fn(), case.atol, case.rtol)
        ta, tb = alternate(torch_fn, pyseqk_fn, make_timer(device), cfg["seconds"],
                           cfg["min_pairs"], cfg["warmup_s"], cfg["max_s"])
        del torch_fn, pyseqk_fn
    t_min, p_min = min(ta), min(tb)
    t_med, p_med = statistics.median(ta), statistics.median(tb)
    row.update({
        "n_pairs": len(ta),
        "torch": {"min_s": t_min, "median_s": t_med},
        "pyseqk": {"min_s": p_min, "median_s": p_med},
        "speedup_min": t_min / p_min,
        "speedup_median": t_med / p_med,
        "pyseqk_gflops": case.flops / p_min / 1e9,
        "torch_gflops": case.flops / t_min / 1e9,
        "pyseqk_gbs": case.bytes / p_min / 1e9,
        "pyseqk_pct_peak": 100.0 * case.flops / p_min / 1e9 / peak_gflops,
        "torch_pct_peak": 100.0 * case.flops / t_min / 1e9 / peak_gflops,
        "times_torch_s": ta,
        "times_pyseqk_s": tb,
    })
    return row


# ----------------------------------------------------------------------------- reporting

def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_table(rows: list[dict], peak: dict) -> str:
    head = ["case", "backend", "torch min", "torch med", "pyseqk min", "pyseqk med",
            "x min", "x med", "GFLOP/s", "%peak", "torch %pk", "n", "check"]
    body = []
    for r in rows:
        if "error" in r or "skipped" in r:
            body.append([r["name"], r.get("backend") or "-", *["-"] * 10,
                         "ERROR: " + r["error"] if "error" in r else "skipped: " + r["skipped"]])
            continue
        body.append([
            r["name"], r["backend"],
            _ms(r["torch"]["min_s"]), _ms(r["torch"]["median_s"]),
            _ms(r["pyseqk"]["min_s"]), _ms(r["pyseqk"]["median_s"]),
            f"{r['speedup_min']:.2f}", f"{r['speedup_median']:.2f}",
            f"{r['pyseqk_gflops']:.1f}", f"{r['pyseqk_pct_peak']:.0f}%",
            f"{r['torch_pct_peak']:.0f}%", str(r["n_pairs"]), r["check"],
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    widths[-1] = len(head[-1])  # the last column may be long; do not pad it
    fmt = lambda cells: "  ".join(  # noqa: E731
        (str(c).ljust(w) if i < 2 or i == len(cells) - 1 else str(c).rjust(w))
        for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    timed = [r for r in rows if "speedup_min" in r]
    if timed:
        gm = math.exp(sum(math.log(r["speedup_min"]) for r in timed) / len(timed))
        gmm = math.exp(sum(math.log(r["speedup_median"]) for r in timed) / len(timed))
        lines.append(f"geometric mean speedup (torch/pyseqk): {gm:.2f} from min, {gmm:.2f} from median "
                     f"({len(timed)} cases)")
    lines.insert(0, f"times in ms per call; x = torch/pyseqk (>1: pyseqk faster); GFLOP/s and %peak of "
                    f"pyseqk from min; peak = {peak['gflops']:.1f} GFLOP/s "
                    f"(fp32 {PEAK_N}^3 torch.mm, min; start {peak.get('start_gflops', peak['gflops']):.0f}, "
                    f"end {peak.get('end_gflops', peak['gflops']):.0f})")
    return "\n".join(lines)


def write_plot(rows: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "speedup_min" in r]
    if not timed:
        return
    labels = [f"{r['name']} [{r['backend']}]" for r in timed]
    s_min = [r["speedup_min"] for r in timed]
    s_med = [r["speedup_median"] for r in timed]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(timed)))
    y = list(range(len(timed)))[::-1]
    ax.barh(y, s_min, color=["tab:green" if s >= 1 else "tab:red" for s in s_min], alpha=0.8,
            label="speedup from min")
    ax.scatter(s_med, y, color="black", marker="|", s=120, zorder=3, label="speedup from median")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("speedup = torch time / pyseqk time (>1: pyseqk faster)")
    m = result["machine"]
    ax.set_title(f"pyseqk vs torch — {m['cpu_model'] if m['device'] == 'cpu' else m['cuda_device']}, "
                 f"{m['torch_threads']} threads, peak {result['peak']['gflops']:.0f} GFLOP/s\n"
                 f"{result['timestamp']}  commit {str(m['git_commit'])[:10]}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="quick: smoke test (~20 s); default: ~2 min; full: more shapes, longer")
    p.add_argument("--filter", action="append", default=None, metavar="SUBSTR",
                   help="run cases whose name contains SUBSTR or whose group is SUBSTR "
                        "(repeatable, or a comma list)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--seconds", type=float, default=None, help="time budget per case (after warm-up)")
    p.add_argument("--min-pairs", type=int, default=None, help="at least this many A,B pairs per case")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", default=None,
                   help="pyseqk backend(s) to time, comma list (default: pyseqk's choice on cpu, "
                        "which honours PYSEQK_BACKEND; cuda,triton on cuda)")
    p.add_argument("--aa", action="store_true",
                   help="A/A control: time torch against a second torch instance instead of pyseqk "
                        "(the ratios show the noise the method leaves)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG chart")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the results to PATH (and the chart next to it) instead of "
                        "bench/results/<timestamp>.json and latest.json (the quick preset "
                        "never replaces latest.*)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    if args.seconds is not None:
        cfg["seconds"] = args.seconds
    if args.min_pairs is not None:
        cfg["min_pairs"] = max(1, args.min_pairs)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.device == "cuda":
        # Same math on both sides: cuDNN's RNNs default to TF32 for fp32 (cudnn.allow_tf32), which
        # makes torch.nn.LSTM 1e-2 off an fp32 result while pyseqk's cuBLAS GEMMs are IEEE fp32.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    cases = select(discover(args.preset, args.device), args.filter)
    if args.list:
        for c in cases:
            print(f"{c.name:<40} {c.group:<10} GFLOP {c.flops / 1e9:8.3f}  MB {c.bytes / 1e6:8.2f}  "
                  f"{json.dumps(c.params)}")
        return 0
    if not cases:
        print(f"no case matches --filter {args.filter}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    torch.manual_seed(0)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy_frac = cpu_busy_fraction()
    busy = busy_frac is not None and busy_frac > 0.25
    if busy:
        print(f"WARNING: other processes use {100 * busy_frac:.0f}% of the CPUs: expect noisy numbers "
              "(the minima suffer least; compare with an --aa run)", file=sys.stderr)
    peak = measure_peak(args.device, cfg["peak_s"])
    jobs = [(c, b) for c in cases
            for b in ([None] if args.aa else backends_for(args.device, args.backend))]
    rows = []
    bar = tqdm(jobs, desc="bench", unit="case", dynamic_ncols=True)
    for case, backend in bar:
        bar.set_postfix_str(case.name + (f" [{backend}]" if backend else ""))
        try:
            row = run_case(case, backend, args.device, cfg, peak["gflops"], args.aa)
        except Exception as e:
            tqdm.write(f"{case.name}: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            row = {"name": case.name, "group": case.group, "params": case.params, "backend": backend,
                   "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        if str(row.get("check", "ok")).startswith("mismatch"):
            tqdm.write(f"WARNING {case.name}: pyseqk and torch disagree ({row['check']})", file=sys.stderr)
        rows.append(row)
    bar.close()
    # Measured again at the end: a busy machine shows as a gap between the two. The better one is
    # the peak, as the minimum is the time of each case.
    peak_end = measure_peak(args.device, cfg["peak_s"])
    peak_start, peak = peak, max(peak, peak_end, key=lambda p: p["gflops"])
    peak = dict(peak, start_gflops=peak_start["gflops"], end_gflops=peak_end["gflops"])
    if abs(peak_start["gflops"] - peak_end["gflops"]) > 0.2 * peak["gflops"]:
        print(f"WARNING: GEMM peak changed during the run ({peak_start['gflops']:.0f} -> "
              f"{peak_end['gflops']:.0f} GFLOP/s): the machine was busy; %peak uses the higher",
              file=sys.stderr)
    for row in rows:  # %peak against the final peak
        if "pyseqk_gflops" in row:
            row["pyseqk_pct_peak"] = 100.0 * row["pyseqk_gflops"] / peak["gflops"]
            row["torch_pct_peak"] = 100.0 * row["torch_gflops"] / peak["gflops"]

    now = _dt.datetime.now()
    stamp = now.strftime("%Y%m%d-%H%M%S")
    result = {
        "timestamp": now.isoformat(timespec="seconds"),
        "preset": args.preset,
        "aa": args.aa,
        "config": cfg,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "machine": machine_info(args.device, args.threads),
        "loadavg_1min_start": load_start,
        "cpu_busy_fraction_start": busy_frac,
        "peak": peak,
        "results": rows,
    }
    print(format_table(rows, peak))
    if busy:
        print(f"(machine busy at start: {100 * busy_frac:.0f}% of the CPUs in use by others)")

    if args.json:
        json_path = Path(args.json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        latest = None
    else:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        json_path = RESULTS_DIR / f"{stamp}.json"
        # latest.* are tracked: a smoke test (quick preset) must not replace a real run
        latest = None if args.preset == "quick" else RESULTS_DIR / "latest.json"
    json_path.write_text(json.dumps(result, indent=1))
    written = [json_path]
    if latest is not None:
        shutil.copyfile(json_path, latest)
        written.append(latest)
    if not args.no_plot:
        png = json_path.with_suffix(".png")
        try:
            write_plot(rows, result, png)
            written.append(png)
            if latest is not None:
                shutil.copyfile(png, latest.with_suffix(".png"))
                written.append(latest.with_suffix(".png"))
        except Exception as e:  # a chart is a convenience; never lose the numbers over it
            print(f"chart not written: {type(e).__name__}: {e}", file=sys.stderr)
    print("wrote " + ", ".join(str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)
                               for p in written))
    return 1 if any("error" in r for r in rows) else 0
