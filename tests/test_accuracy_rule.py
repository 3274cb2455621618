"""The forward accuracy rule's floor: loose enough for float summation over long caches, tight enough to
catch a real bug (a dropped key, a wrong scale, a top-left decode) on every shape the tests use."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from harness import registry
from harness.accuracy import baseline, rounding_floor
from harness.variants import VARIANTS
from tests.test_correctness import DTYPES, SHAPES

DOT_PRODUCT = [v for v in SHAPES if VARIANTS[v].kind == "dot_product"]


def reference_math(q, k, v, *, causal=False, scale=None, mask=None, offset=0):
    """Attention in the inputs' dtype with causality aligned `offset` keys to the right."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * scale
    if causal:
        i = torch.arange(q.shape[2])[:, None]
        scores = scores.masked_fill(torch.arange(k.shape[2])[None, :] > i + offset, float("-inf"))
    return (torch.softmax(scores, dim=-1).to(q.dtype) @ v).to(q.dtype)


def dropped_last_key(q, k, v, **kw):
    return correct(q, k[:, :, :-1], v[:, :, :-1], **kw)


def wrong_scale(q, k, v, *, scale=None, **kw):
    return correct(q, k, v, scale=1 / q.shape[-1], **kw)  # 1/D instead of 1/sqrt(D)


def correct(q, k, v, *, causal=False, scale=None, mask=None):
    offset = k.shape[2] - q.shape[2] if causal and q.shape[2] != k.shape[2] else 0  # decode: bottom-right
    return reference_math(q, k, v, causal=causal, scale=scale, offset=offset)


def top_left(q, k, v, *, causal=False, scale=None, mask=None):
    # A decode kernel that aligns its new tokens with the start of the cache.
    return reference_math(q, k, v, causal=True, scale=scale)


def _judged(variant: str, dtype: str, fn) -> bool:
    spec = VARIANTS[variant]
    inputs = spec.make_inputs(spec.normalize(SHAPES[variant]), dtype=dtype, seed=3)
    base = baseline(spec, inputs, registry.get(variant, "naive").fn)
    return base.judge(inputs.call(fn)).accurate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", DOT_PRODUCT)
def test_correct_math_in_the_dtype_passes(variant, dtype):
    assert _judged(variant, dtype, correct)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", DOT_PRODUCT)
@pytest.mark.parametrize("bug", [dropped_last_key, wrong_scale], ids=["dropped-key", "wrong-scale"])
def test_a_real_bug_is_caught_on_every_test_shape(variant, dtype, bug):
    assert not _judged(variant, dtype, bug)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_top_left_decode_is_caught(dtype):
    assert not _judged("decode", dtype, top_left)


def test_the_floor_grows_with_the_square_root_of_the_reduction():
    one = rounding_floor(torch.float32, 4.0, 1)
    assert rounding_floor(torch.float32, 4.0, 10_000) == pytest.approx(4.0 * torch.finfo(torch.float32).eps * 101)
    assert one == pytest.approx(8.0 * torch.finfo(torch.float32).eps)
    # Half types accumulate in float32: one rounding in the dtype dominates the floor.
    half = rounding_floor(torch.bfloat16, 1.0, 4096)
    assert half == pytest.approx(torch.finfo(torch.bfloat16).eps + 64 * torch.finfo(torch.float32).eps)


def test_sdpa_on_a_long_float32_cache_is_accurate():
    """The decode sweep that once judged torch's SDPA inaccurate: within the rule now."""
    spec = VARIANTS["decode"]
    params = replace(SHAPES["decode"], batch=1, heads=8, kv_heads=2, seq_len=1, seq_len_kv=8192, head_dim=64)
    for seed in range(3):
        inputs = spec.make_inputs(params, seed=seed)
        base = baseline(spec, inputs, registry.get("decode", "naive").fn)
        for name in ("sdpa", "sdpa.math"):
            result = base.judge(inputs.call(registry.get("decode", name).fn))
            assert result.accurate, f"{name} seed {seed}: {result.reason}"
