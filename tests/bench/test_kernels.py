"""pytest-benchmark over the same registry and suites/ci.yaml, for teams that gate with pytest.

Ordinary test runs skip these (`--benchmark-skip` in README's test command). To record and gate:

    python -m pytest tests/bench --benchmark-only --benchmark-autosave
    python -m pytest tests/bench --benchmark-only --benchmark-compare --benchmark-compare-fail=median:15%
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import registry
from harness.prepare import prepare
from harness.suite import expand, load_suite

SUITE = load_suite(Path(__file__).resolve().parents[2] / "suites" / "ci.yaml")
CASES = [c for c in expand(SUITE) if not c.skip_reason]


@pytest.mark.slow  # benchmarks time kernels (and compile some): never in the fast tier
@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_kernel(benchmark, case):
    impl = registry.get(case.variant, case.implementation)
    ok, why = impl.available_for(case.params)
    if not ok:
        pytest.skip(why)
    torch.set_num_threads(case.params.threads or torch.get_num_threads())
    prepared = prepare(case, seed=SUITE.seed)
    benchmark.group = f"{case.variant} n={case.params.seq_len}"
    benchmark.extra_info.update(case.params.as_dict())

    if case.params.direction == "fwd":

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return prepared.call()

        out = benchmark(step)
        assert out.shape == prepared.inputs.args[0].shape
    else:
        with torch.enable_grad():
            timed = prepared.step()  # bwd: an untimed forward, then backward on its retained graph
            benchmark(timed)
        assert all(t.grad is not None for t in prepared.inputs.grad_leaves().values())
    if benchmark.stats is not None:  # None under --benchmark-disable (a plain correctness run)
        benchmark.extra_info["tflops"] = prepared.flops / benchmark.stats.stats.median / 1e12
