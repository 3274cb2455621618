"""tools/gpu_check.py's bookkeeping, which must hold on any machine: a failing implementation is a row
with its reason and the check goes on; without a GPU it says so and exits 2."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_failing_implementation_is_a_row_with_its_reason_and_the_check_goes_on():
    gpu_check = _gpu_check()

    def measure(name: str) -> float:
        if name == "xformers":
            raise NotImplementedError("xFormers was built for PyTorch 2.10.0+cu128\nmore detail")
        return 1.5

    rows = list(gpu_check.each(["sdpa", "xformers", "flex"], measure))
    assert [(r.name, r.value) for r in rows] == [("sdpa", 1.5), ("xformers", None), ("flex", 1.5)]
    assert rows[1].error == "NotImplementedError: xFormers was built for PyTorch 2.10.0+cu128"


@pytest.mark.slow
def test_without_a_gpu_the_check_exits_2_with_a_reason():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run the check itself")
    done = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr
