"""The CPU extension under AddressSanitizer and UndefinedBehaviorSanitizer: runs
tests/sanitize/asan.sh (a separately built, instrumented pyseqk._C in build/asan; the normal
build is never touched) and asserts that the instrumented build ran the CPU tests clean.

The script itself fails unless the build is instrumented and a deliberate heap overflow in a
canary is reported in the same setup, so a sanitizer that silently does nothing fails here too.
Slow (a build plus the CPU cell tests under ASan: ~2-4 minutes on 2 cores), but part of `make
test` on purpose: it is the only memory-safety check the kernels get. Run it alone with
`tests/sanitize/asan.sh` (see its header for options)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "sanitize", "asan.sh")
TIMEOUT_S = 1500  # a cold build on a loaded 2-core machine; normally a few minutes


def _libasan():
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    path = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.slow
def test_cpu_extension_clean_under_asan_and_ubsan():
    # A missing sanitizer runtime is a broken CI image, not a reason to skip.
    assert _libasan() is not None, "gcc's libasan.so is needed (apt-get install gcc / libasan8)"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    tail = out[-6000:]
    assert "self-check" in out and "tests under ASan/UBSan" in out, tail
    assert not re.search(r"ERROR: AddressSanitizer|runtime error:", out.split("tests under ASan/UBSan", 1)[1]), tail
    assert proc.returncode == 0, tail
    summary = re.findall(r"(\d+) passed", out)
    assert summary and int(summary[-1]) > 0 and " failed" not in out.splitlines()[-1], tail
