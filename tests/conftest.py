from __future__ import annotations

import pytest
import torch

from harness import registry
from harness.accuracy import baseline
from harness.variants import VARIANTS, Inputs, Params


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
