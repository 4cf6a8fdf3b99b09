"""examples/transformer.py runs end to end (a few training steps, greedy decoding) and ends with
the accuracy line in its documented format."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_transformer_example_smoke():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "transformer.py"), "--steps", "3",
         "--batch", "16", "--test", "16", "--seed", "1"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"accuracy: [01]\.\d\d", lines[-1]), lines[-1]
    assert any(line.startswith("step     3  loss ") for line in lines), proc.stdout
