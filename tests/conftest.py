"""Test setup: Triton runs under its interpreter when there is no GPU (the variable must be set
before any @triton.jit function runs), and GPU tests skip without a GPU unless
PYSEQK_REQUIRE_CUDA=1, which turns that skip into a failure."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyseqk  # noqa: E402
from pyseqk import backends  # noqa: E402

REQUIRE_CUDA = os.environ.get("PYSEQK_REQUIRE_CUDA", "0") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords and not REQUIRE_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and REQUIRE_CUDA and not torch.cuda.is_available():
        pytest.fail("PYSEQK_REQUIRE_CUDA=1 but no CUDA device is available", pytrace=False)


def cpu_backends():
    """Backends that run CPU tensors here: all of them must be present in CI."""
    names = ["cpu", "reference"]
    if backends.triton_interpreter():
        names.insert(1, "triton")
    return names


def cuda_backends():
    return ["cuda", "triton"]
