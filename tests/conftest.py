from __future__ import annotations

import json
import os
import tempfile

# The `triton` implementation runs on CPU tensors under triton's interpreter. triton reads this when
# it is imported (its own tl.* helpers are jitted then), so it is set before anything can import it:
# every test, and every worker a test starts, can then run the kernels. Slow (0.1-0.3 s a call at the
# tests' sizes), which is why only tests set it.
os.environ.setdefault("TRITON_INTERPRET", "1")
# memory_efficient's CPU tiles are tuned once per machine and cached for real runs; a tuning done
# during the tests (a busy machine) must not become that cache, so the tests fix them.
os.environ.setdefault("HARNESS_TILES", "1024x512")
# What the harness learns about a machine (harness.cache) goes to a folder of this test session, never
# the user's cache: a ceiling measured while the tests load the machine must not outlive them.
os.environ.setdefault("HARNESS_CACHE_DIR", tempfile.mkdtemp(prefix="harness-test-cache-"))
import textwrap
from pathlib import Path

import pytest
import torch

from harness import registry
from harness.accuracy import baseline
from harness.ceilings import DTYPES, Ceilings, cache_path, save
from harness.variants import VARIANTS, Inputs, Params

# Ceilings are measured on a quiet machine, once (15 s each thread count); the tests plant ones no kernel
# can beat, so that no run measures (or, seeing a record above them, re-measures) while the tests load
# the machine. tests/test_roofline.py measures real ones, and plants low ones, in folders of its own.
for _threads in (None, 1, 2):
    save(
        Ceilings("planted by tests/conftest.py", "cpu", _threads, {d: 1e15 for d in DTYPES}, 1e13, {"all": "planted"}),
        cache_path("cpu", _threads),
    )


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests check behaviour, not speed; two threads keep them quick on the 2-core CI machine.
    torch.set_num_threads(2)


def available_cpu(variant: str, dtype: str = "float32", **case) -> list[registry.Implementation]:
    return [impl for impl in registry.implementations(variant) if impl.available("cpu", dtype, **case)[0]]


def assert_accurate(variant: str, inputs: Inputs, impl: registry.Implementation) -> None:
    """The one tolerance rule (harness.accuracy): at most 2x naive's error in the same dtype + eps."""
    spec = VARIANTS[variant]
    base = baseline(spec, inputs, registry.get(variant, "naive").fn)
    result = base.judge(inputs.call(impl.fn))
    assert result.accurate, f"{variant}/{impl.name}: {result.reason}"


@pytest.fixture
def params() -> Params:
    return Params(batch=2, heads=3, seq_len=67, head_dim=32)


ROOT = Path(__file__).resolve().parents[1]
FAST_TIMING = "timing: {warmup: 1, min_time_s: 0.01, min_samples: 3, max_time_s: 0.5, min_sample_time_s: 0}"


def suite_text(implementations: list[str], extra: str = "", seq_len: str = "[32]") -> str:
    """A tiny multi_head suite over the given implementations, timed briefly."""
    return (
        textwrap.dedent(f"""\
        name: t
        variants: [multi_head]
        implementations: {json.dumps(implementations)}
        sweep: {{batch: [1], heads: [2], seq_len: {seq_len}, head_dim: [16], threads: [1]}}
        """)
        + FAST_TIMING
        + "\n"
        + extra
    )


@pytest.fixture
def faulty_plugins(monkeypatch):
    """Registers tests/plugins/faulty.py here and in every worker (through HARNESS_PLUGINS)."""
    monkeypatch.setenv("HARNESS_PLUGINS", "tests.plugins.faulty")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    registry.reload()
    yield
    monkeypatch.delenv("HARNESS_PLUGINS")
    registry.reload()


# ----------------------------------------------------------------------------- the fast tier
# `pytest -m "not slow"` is the inner loop: a test that starts a worker, a CLI process, a compile or a
# browser is `slow`. Compiling implementations are marked by name here; a test that starts a process
# without the mark fails and says so, so the tier cannot silently grow slow again.
COMPILING = ("compiled.", "flex")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        ids = getattr(getattr(item, "callspec", None), "id", "")
        if any(name in ids for name in COMPILING):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request, monkeypatch):
    if request.node.get_closest_marker("slow") is not None:
        return
    import multiprocessing.process
    import subprocess

    from harness.memory import _libc

    _libc()  # found once through `ldconfig -p` (ctypes.util): a library's look-up, not a process a test starts

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
