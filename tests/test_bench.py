"""The benchmark runner's smoke test: the quick preset runs end to end and writes its JSON."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_preset(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--preset", "quick", "--no-plot", "--seconds", "0.2",
         "--filter", "B1", "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    text = json.dumps(data)
    assert "lstm_cell" in text
    # Only a case with random dropout may go unchecked (its setup checks drop rates instead).
    for r in data["results"]:
        assert r["check"] == "ok" or (r["check"] == "unchecked" and r["params"].get("dropout")), r
        assert r["speedup_min"] > 0, r
