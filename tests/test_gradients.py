"""Gradients of every exact implementation that has a backward, against float64 autograd, by the rule."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import implementations.memory_efficient as memory_efficient_module
from harness import registry
from harness.accuracy import grad_baseline
from harness.prepare import make_dout
from harness.shapes import Case
from harness.variants import VARIANTS, Inputs, Params

DTYPES = ["float32", "bfloat16", "float16"]
SHAPES = {
    "self_attention": Params(batch=2, seq_len=37, head_dim=16),
    "multi_head": Params(batch=2, heads=3, seq_len=37, head_dim=16),
    "causal": Params(batch=2, heads=3, seq_len=37, head_dim=16),
    "cross_attention": Params(batch=2, heads=3, seq_len=37, seq_len_kv=29, head_dim=16),
    "attention_gate": Params(batch=2, seq_len=49, head_dim=8),
}


def assert_gradients_accurate(variant: str, inputs: Inputs, name: str) -> None:
    spec, impl = VARIANTS[variant], registry.get(variant, name)
    dout = make_dout(inputs.args[0], seed=3)
    base = grad_baseline(spec, inputs, dout, registry.get(variant, "naive").fn)
    leaves = inputs.with_grad()
    with torch.enable_grad():
        leaves.call(impl.fn).backward(dout)
    result = base.judge({k: t.grad for k, t in leaves.grad_leaves().items()})
    assert result.accurate, f"{variant}/{name}: {result.reason}"


def _backward_cases():
    for variant in SHAPES:
        for impl in registry.implementations(variant):
            for dtype in DTYPES:
                yield pytest.param(variant, impl.name, dtype, id=f"{variant}-{impl.name}-{dtype}")


@pytest.mark.parametrize(("variant", "name", "dtype"), _backward_cases())
def test_gradients_match_float64_autograd(variant, name, dtype):
    spec = VARIANTS[variant]
    params = replace(spec.normalize(SHAPES[variant]), dtype=dtype, direction="bwd")
    ok, why = registry.get(variant, name).available_for(params)
    if not ok:
        pytest.skip(why)
    assert_gradients_accurate(variant, spec.make_inputs(params, seed=3), name)


def _with_backward(**case):
    return [
        i.name
        for i in registry.implementations("multi_head")
        if i.available("cpu", "float32", direction="bwd", head_dim=16, **case)[0]
    ]


@pytest.mark.parametrize("name", _with_backward(causal=True))
@pytest.mark.parametrize(("n_q", "n_kv"), [(40, 70), (70, 40)])
def test_causal_gradients_with_unequal_lengths(name, n_q, n_kv):
    inputs = VARIANTS["cross_attention"].make_inputs(
        Params(batch=1, heads=2, seq_len=n_q, seq_len_kv=n_kv, head_dim=16), seed=1
    )
    inputs.kwargs["causal"] = True
    assert_gradients_accurate("cross_attention", inputs, name)


@pytest.mark.parametrize("name", _with_backward(masked=True))
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masked_gradients(name, kind):
    inputs = VARIANTS["cross_attention"].make_inputs(
        Params(batch=2, heads=2, seq_len=33, seq_len_kv=45, head_dim=16), seed=2
    )
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(2, 1, 33, 45, generator=gen) > 0.3
    keep[..., 0] = True
    inputs.kwargs["mask"] = (
        keep if kind == "bool" else (torch.randn(keep.shape, generator=gen) * 0.5).masked_fill(~keep, float("-inf"))
    )
    assert_gradients_accurate("cross_attention", inputs, name)


@pytest.mark.parametrize("name", _with_backward(masked=True))
def test_fully_masked_rows_have_zero_gradients_not_nan(name):
    inputs = VARIANTS["multi_head"].make_inputs(Params(batch=1, heads=2, seq_len=20, head_dim=8), seed=4)
    mask = torch.ones(20, 20, dtype=torch.bool)
    mask[5] = False
    inputs.kwargs["mask"] = mask
    leaves = inputs.with_grad()
    with torch.enable_grad():
        leaves.call(registry.get("multi_head", name).fn).backward(torch.ones(1, 2, 20, 8))
    q, k, v = leaves.args
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :, 5], torch.zeros_like(q.grad[:, :, 5]))
    assert_gradients_accurate("multi_head", inputs, name)


def test_memory_efficient_backward_across_many_ragged_tiles(monkeypatch):
    monkeypatch.setattr(memory_efficient_module, "BACKWARD_TILE", 16)
    monkeypatch.setattr(memory_efficient_module, "TILE_ELEMENTS", 16 * 16 * 2)
    for variant in ("multi_head", "causal", "cross_attention"):
        spec = VARIANTS[variant]
        params = spec.normalize(
            Params(batch=2, heads=3, seq_len=53, seq_len_kv=41 if variant == "cross_attention" else None, head_dim=16)
        )
        assert_gradients_accurate(variant, spec.make_inputs(params, seed=5), "memory_efficient")


def test_memory_efficient_saves_row_statistics_not_score_matrices():
    from harness.case_runner import saved_bytes
    from harness.prepare import prepare

    saved = {}
    for n in (256, 1024):
        for name in ("naive", "memory_efficient"):
            case = prepare(
                Case("t", "multi_head", name, Params(batch=1, heads=4, seq_len=n, head_dim=32, direction="bwd"))
            )
            with torch.enable_grad():
                saved_bytes(case, "cpu")  # the first forward pays for lazy set-up
                saved[(name, n)] = saved_bytes(case, "cpu")
    # naive keeps its N² probabilities (4 MiB at N=1024 here); memory_efficient a float per row and head.
    assert saved[("naive", 1024)] >= 4 * 1024 * 1024 * 4
    assert saved[("memory_efficient", 1024)] < saved[("naive", 1024)] / 16


@pytest.mark.parametrize("name", _with_backward(heads=4, kv_heads=2))
@pytest.mark.parametrize("variant", ["multi_head", "causal"])
def test_grouped_query_attention_gradients_sum_over_each_kv_heads_query_heads(name, variant):
    spec = VARIANTS[variant]
    inputs = spec.make_inputs(spec.normalize(Params(batch=2, heads=4, kv_heads=2, seq_len=29, head_dim=16)), seed=6)
    assert_gradients_accurate(variant, inputs, name)


def test_memory_efficient_grouped_backward_across_ragged_tiles(monkeypatch):
    monkeypatch.setattr(memory_efficient_module, "BACKWARD_TILE", 16)
    monkeypatch.setattr(memory_efficient_module, "TILE_ELEMENTS", 16 * 16 * 4)
    spec = VARIANTS["causal"]
    inputs = spec.make_inputs(spec.normalize(Params(batch=1, heads=6, kv_heads=2, seq_len=53, head_dim=16)), seed=7)
    assert_gradients_accurate("causal", inputs, "memory_efficient")
