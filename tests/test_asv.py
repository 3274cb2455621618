"""The asv suite is generated from the registry and suites/ci.yaml, and asv accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness import registry

ROOT = Path(__file__).resolve().parents[1]


def test_asv_benchmarks_mirror_the_registry_and_the_ci_suite():
    from benchmarks import kernels

    for variant in kernels.SUITE.variants:
        cls = getattr(kernels, variant)
        names, lengths = cls.params
        assert names == registry.names(variant)
        assert lengths == kernels.SWEEP.seq_len
        assert cls.param_names == ["implementation", "seq_len"]
        assert {"time_forward", "peakmem_forward", "track_tflops", "track_max_abs_err"} <= set(dir(cls))


def test_unavailable_implementations_are_skipped_the_asv_way():
    from benchmarks import kernels

    bench = kernels.multi_head()
    with pytest.raises(NotImplementedError, match="CUDNN"):
        bench.setup("sdpa.cudnn", 256)


def test_a_benchmark_measures_a_real_kernel():
    from benchmarks import kernels

    bench = kernels.multi_head()
    bench.setup("memory_efficient", 256)
    assert bench.track_tflops("memory_efficient", 256) > 0
    assert 0 <= bench.track_max_abs_err("memory_efficient", 256) < 1e-5


@pytest.mark.slow
def test_asv_check_passes():
    asv = shutil.which("asv")
    assert asv, "asv is installed by the test extra"
    done = subprocess.run([asv, "check", "-E", "existing"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "No problems found" in done.stdout, done.stdout + done.stderr


def test_backward_benchmarks_exist_for_every_variant_and_run_a_real_backward():
    from benchmarks import kernels

    for variant in kernels.SUITE.variants:
        cls = getattr(kernels, f"{variant}_backward")
        assert cls.params[0] == registry.names(variant) and {"time_backward", "peakmem_backward"} <= set(dir(cls))
    bench = kernels.multi_head_backward()
    bench.setup("memory_efficient", 256)
    bench.time_backward("memory_efficient", 256)
    q = bench.case.inputs.args[0]
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="backward"):
        bench.setup("flex", 256)  # torch has no flex_attention backward on CPU
