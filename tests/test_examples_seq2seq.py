"""examples/seq2seq.py runs end to end (tiny budget) and ends with its `accuracy: X.XX` line."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags", [["--attention", "bahdanau", "--cell", "gru"],
                                   ["--attention", "luong", "--cell", "lstm"]], ids=" ".join)
def test_seq2seq_example_runs(flags):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "seq2seq.py"), "--steps", "4",
         "--batch-size", "8", "--test-size", "16", "--hidden", "16", "--seed", "3", *flags],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"accuracy: [01]\.\d\d", lines[-1]), lines[-5:]
    assert any(line.startswith("step     4  loss") for line in lines), lines
