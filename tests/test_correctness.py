"""Every available implementation of every variant against the float64 reference."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import implementations.memory_efficient as memory_efficient_module
from harness import registry
from harness.accuracy import baseline
from harness.variants import DOT_PRODUCT_VARIANTS, VARIANTS, Inputs, Params
from tests.conftest import assert_accurate

DTYPES = ["float32", "bfloat16", "float16"]

SHAPES = {
    "self_attention": Params(batch=2, seq_len=67, head_dim=32),
    "multi_head": Params(batch=2, heads=3, seq_len=67, head_dim=32),
    "causal": Params(batch=2, heads=3, seq_len=67, head_dim=32),
    "cross_attention": Params(batch=2, heads=3, seq_len=67, seq_len_kv=45, head_dim=32),
    "attention_gate": Params(batch=2, seq_len=81, head_dim=12),
    "decode": Params(batch=2, heads=4, kv_heads=2, seq_len=3, seq_len_kv=67, head_dim=32),
}


def cases():
    for variant in VARIANTS:
        for impl in registry.implementations(variant):
            for dtype in DTYPES:
                yield pytest.param(variant, impl.name, dtype, id=f"{variant}-{impl.name}-{dtype}")


@pytest.mark.parametrize(("variant", "name", "dtype"), cases())
def test_matches_the_float64_reference(variant, name, dtype):
    impl = registry.get(variant, name)
    spec = VARIANTS[variant]
    params = spec.normalize(SHAPES[variant])
    ok, why = impl.available_for(replace(params, dtype=dtype))
    if not ok:
        pytest.skip(why)
    assert_accurate(variant, spec.make_inputs(params, dtype=dtype, seed=3), impl)


def _dot_product_impls(dtype="float32", **case):
    return [i.name for i in registry.implementations("multi_head") if i.available("cpu", dtype, **case)[0]]


def _inductor_cpu_isa() -> str:
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa())
    except Exception:  # an old torch, or no compiler: flex is unavailable there anyway
        return ""


# torch 2.13's compiled flex_attention on CPU is wrong when inductor generates AVX2 code (not AVX512)
# for causal attention with a short key sequence: the first query rows, those that see fewer keys than
# a vector holds, come out as garbage or inf, and which values depends on what the process allocated
# before (uninitialised lanes of the partial key block). Measured on this machine with
# ATEN_CPU_CAPABILITY=avx2 and a fresh inductor cache: Nq/Nkv 70/40 wrong (row 1), 129/40 wrong (rows
# 0-4); 70/64, 200/100, 70/128, 300/129 right; all right with AVX512 code. Minimal reproduction:
#
#   ATEN_CPU_CAPABILITY=avx2 python -c "
#   import torch; from torch.nn.attention.flex_attention import create_block_mask, flex_attention
#   q, k, v = torch.randn(1, 1, 70, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
#   bm = create_block_mask(lambda b, h, i, j: i >= j, None, None, 70, 40, device='cpu')
#   out = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm)
#   ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
#   print((out - ref).abs().amax(dim=-1))"    # one of the first rows is far off
#
# The harness keeps measuring it and reports such cases as inaccurate (that is the truth a user needs);
# the test expects the failure where torch produces it, and must pass wherever inductor emits AVX512.
FLEX_SHORT_KEYS_AVX2 = pytest.mark.xfail(
    "avx512" not in _inductor_cpu_isa(),
    reason="torch's compiled CPU flex_attention is wrong for causal rows with few keys under AVX2 (see above)",
    strict=False,
)


def _aligned_cases():
    for name in _dot_product_impls(causal=True, seq_len_kv=1):
        for n_q, n_kv in [(40, 70), (70, 40), (1, 9)]:
            marks = [FLEX_SHORT_KEYS_AVX2] if name == "flex" and n_kv < 64 else []
            yield pytest.param(name, n_q, n_kv, id=f"{n_q}-{n_kv}-{name}", marks=marks)


@pytest.mark.parametrize(("name", "n_q", "n_kv"), _aligned_cases())
def test_causal_with_unequal_lengths_is_aligned_top_left(name, n_q, n_kv):
    spec = VARIANTS["cross_attention"]
    inputs = spec.make_inputs(Params(batch=2, heads=2, seq_len=n_q, seq_len_kv=n_kv, head_dim=16), seed=1)
    inputs.kwargs["causal"] = True
    assert_accurate("cross_attention", inputs, registry.get("cross_attention", name))


def _masked(kind: str, shape: tuple[int, ...], n_q: int, n_kv: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(*shape[:-2], n_q, n_kv, generator=gen) > 0.3
    keep[..., 0] = True  # every row sees at least one key here; fully masked rows are tested apart
    if kind == "bool":
        return keep
    bias = torch.randn(*keep.shape, generator=gen) * 0.5
    return bias.masked_fill(~keep, float("-inf")).to(dtype)


@pytest.mark.parametrize("name", _dot_product_impls(masked=True))
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("mask_shape", [(1, 1), (2, 1), (2, 3)], ids=["broadcast", "per-batch", "per-head"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks_follow_torch_conventions(name, kind, mask_shape, causal):
    spec = VARIANTS["cross_attention"]
    inputs = spec.make_inputs(Params(batch=2, heads=3, seq_len=37, seq_len_kv=53, head_dim=16), seed=2)
    inputs.kwargs.update(mask=_masked(kind, mask_shape, 37, 53, torch.float32), causal=causal)
    assert_accurate("cross_attention", inputs, registry.get("cross_attention", name))


@pytest.mark.parametrize("name", _dot_product_impls(masked=True))
def test_fully_masked_rows_give_zeros_not_nan(name):
    spec = VARIANTS["multi_head"]
    inputs = spec.make_inputs(Params(batch=1, heads=2, seq_len=20, head_dim=8), seed=4)
    mask = torch.ones(20, 20, dtype=torch.bool)
    mask[5] = False
    inputs.kwargs["mask"] = mask
    out = inputs.call(registry.get("multi_head", name).fn)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny tiles so that short test inputs exercise many query and key tiles."""
    monkeypatch.setattr(memory_efficient_module, "Q_TILE", 16)
    monkeypatch.setattr(memory_efficient_module, "K_TILE", 24)
    monkeypatch.setattr(memory_efficient_module, "TILE_ELEMENTS", 16 * 24 * 2)


@pytest.mark.parametrize("variant", DOT_PRODUCT_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_efficient_across_many_ragged_tiles(small_tiles, variant, dtype):
    spec = VARIANTS[variant]
    params = spec.normalize(
        Params(batch=2, heads=3, seq_len=101, seq_len_kv=77 if variant == "cross_attention" else None, head_dim=16)
    )
    assert_accurate(variant, spec.make_inputs(params, dtype=dtype, seed=5), registry.get(variant, "memory_efficient"))


def test_memory_efficient_rescales_when_a_later_key_tile_has_much_larger_scores(small_tiles, monkeypatch):
    spec = VARIANTS["multi_head"]
    inputs = spec.make_inputs(Params(batch=1, heads=2, seq_len=40, head_dim=16), seed=6)
    q, k, v = inputs.args
    # Scores of the last keys are ~e^400 times larger than the first tile's: the lagged maximum would
    # overflow float32 without the exact redo of the query tile.
    k[:, :, -10:] = q[:, :, :1] * 60
    calls = []
    query_tile = memory_efficient_module._query_tile

    def spy(*args, exact, **options):
        calls.append(exact)
        return query_tile(*args, exact=exact, **options)

    monkeypatch.setattr(memory_efficient_module, "_query_tile", spy)
    assert_accurate("multi_head", inputs, registry.get("multi_head", "memory_efficient"))
    assert True in calls, "the overflow was not detected, so no query tile was redone exactly"


def test_memory_efficient_rows_that_see_keys_only_late_are_exact(small_tiles):
    spec = VARIANTS["multi_head"]
    inputs = spec.make_inputs(Params(batch=1, heads=2, seq_len=30, head_dim=8), seed=8)
    mask = torch.zeros(30, 60, dtype=torch.bool)
    mask[:, 50:] = True  # the first two key tiles are fully masked for every row
    q, k, v = inputs.args
    inputs = Inputs((q, torch.cat([k, k], 2), torch.cat([v, v], 2)), {"mask": mask})
    assert_accurate("cross_attention", inputs, registry.get("cross_attention", "memory_efficient"))


@pytest.mark.parametrize("name", _dot_product_impls())
def test_explicit_scale_is_honoured(name):
    spec = VARIANTS["multi_head"]
    inputs = spec.make_inputs(Params(batch=1, heads=2, seq_len=33, head_dim=16), seed=9)
    inputs.kwargs["scale"] = 0.05
    assert_accurate("multi_head", inputs, registry.get("multi_head", name))


def test_float64_inputs_stay_float64():
    spec = VARIANTS["multi_head"]
    inputs = spec.make_inputs(Params(batch=1, heads=2, seq_len=33, head_dim=16, dtype="float64"))
    for name in ("naive", "memory_efficient", "chunked"):
        out = inputs.call(registry.get("multi_head", name).fn)
        assert out.dtype == torch.float64
        assert torch.allclose(out, spec.reference(inputs), atol=1e-12)


def _grouped_impls(variant: str = "multi_head", **case):
    return [
        i.name
        for i in registry.implementations(variant)
        if i.available("cpu", "float32", heads=4, kv_heads=2, head_dim=16, **case)[0]
    ]


@pytest.mark.parametrize("name", _grouped_impls())
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("variant", ["multi_head", "causal", "cross_attention"])
def test_grouped_query_attention_matches_the_reference(name, kv_heads, variant):
    spec = VARIANTS[variant]
    params = spec.normalize(
        Params(
            batch=2,
            heads=4,
            kv_heads=kv_heads,
            seq_len=45,
            seq_len_kv=38 if variant == "cross_attention" else None,
            head_dim=16,
        )
    )
    inputs = spec.make_inputs(params, seed=12)
    assert inputs.args[1].shape[1] == kv_heads  # kernels receive k, v with kv_heads heads
    assert_accurate(variant, inputs, registry.get(variant, name))


@pytest.mark.parametrize("name", _grouped_impls(masked=True))
def test_grouped_query_attention_with_a_per_head_mask(name):
    inputs = VARIANTS["cross_attention"].make_inputs(
        Params(batch=2, heads=4, kv_heads=2, seq_len=33, seq_len_kv=41, head_dim=16), seed=13
    )
    inputs.kwargs.update(mask=_masked("bool", (2, 4), 33, 41, torch.float32), causal=True)
    assert_accurate("cross_attention", inputs, registry.get("cross_attention", name))


def test_memory_efficient_grouped_query_attention_across_ragged_tiles(small_tiles):
    spec = VARIANTS["causal"]
    inputs = spec.make_inputs(spec.normalize(Params(batch=1, heads=6, kv_heads=2, seq_len=71, head_dim=16)), seed=14)
    assert_accurate("causal", inputs, registry.get("causal", "memory_efficient"))


def test_kv_heads_must_divide_heads():
    from harness.errors import InputError

    with pytest.raises(InputError, match="kv_heads must divide heads"):
        VARIANTS["multi_head"].normalize(Params(heads=8, kv_heads=3))
    with pytest.raises(InputError, match="kv_heads does not apply to attention_gate"):
        VARIANTS["attention_gate"].normalize(Params(seq_len=16, kv_heads=1))
    same = VARIANTS["multi_head"].normalize(Params(heads=8, kv_heads=8))
    assert same.kv_heads is None  # plain multi-head attention: the same case and case id as before


def test_the_gpu_plan_puts_every_head_in_one_group_and_never_asks_the_host(monkeypatch):
    """memory_efficient's CUDA plan, run on the CPU: exact, all heads in one group, and no tensor is
    ever turned into a Python value (each would stall a GPU stream once per tile)."""
    monkeypatch.setattr(memory_efficient_module, "_on_gpu", lambda device: True)
    monkeypatch.setattr(memory_efficient_module, "CUDA_TILE_ELEMENTS", 6 * 16 * 24)
    monkeypatch.setattr(memory_efficient_module, "CUDA_K_TILE", 24)
    assert memory_efficient_module._tile_sizes(6, 101, 77, device=torch.device("cpu")) == (6, 16, 24)
    for variant, kv_heads in [("causal", None), ("cross_attention", 1), ("multi_head", 3)]:
        spec = VARIANTS[variant]
        params = Params(batch=2, heads=6, kv_heads=kv_heads, seq_len=101, head_dim=16)
        if variant == "cross_attention":
            params = replace(params, seq_len_kv=77)
        inputs = spec.make_inputs(spec.normalize(params), seed=21)
        base = baseline(spec, inputs, registry.get(variant, "naive").fn)

        def refuse(*_, **__):
            raise AssertionError("host synchronisation in the GPU plan")

        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", refuse)
            m.setattr(torch.Tensor, "__bool__", refuse)
            out = inputs.call(registry.get(variant, "memory_efficient").fn)
        assert base.judge(out).accurate


def test_cpu_tiles_are_tuned_once_cached_and_overridable(monkeypatch, tmp_path):
    me = memory_efficient_module
    path = tmp_path / "machine-cpu-t1-tiles.json"
    monkeypatch.setattr(me, "tiles_path", lambda threads: path)
    monkeypatch.setattr(me, "TILE_CANDIDATES", ((64, 32), (32, 64)))
    tuned: list[int] = []
    real = me.tune_tiles

    def small(candidates=me.TILE_CANDIDATES, **_):
        tuned.append(1)
        return real(candidates, seq_len=128, heads=2, head_dim=16, rounds=2)

    monkeypatch.setattr(me, "tune_tiles", small)
    monkeypatch.delenv(me.TILES_ENV, raising=False)
    me.cpu_tiles.cache_clear()
    try:
        first = me.cpu_tiles(1)
        assert first in ((64, 32), (32, 64)) and len(tuned) == 1
        saved = json.loads(path.read_text())
        assert saved["tiles"] == f"{first[0]}x{first[1]}" and set(saved["medians_s"]) == {"64x32", "32x64"}
        me.cpu_tiles.cache_clear()
        assert me.cpu_tiles(1) == first and len(tuned) == 1  # read back, not tuned again
        for stale in ({"torch": "0.0"}, {"isa": "SSE2"}):  # another torch, another vector ISA: tuned again
            path.write_text(json.dumps(saved | stale))
            me.cpu_tiles.cache_clear()
            me.cpu_tiles(1)
        assert len(tuned) == 3
        monkeypatch.setenv(me.TILES_ENV, "256x128")
        me.cpu_tiles.cache_clear()
        assert me.cpu_tiles(1) == (256, 128)
        monkeypatch.setenv(me.TILES_ENV, "big")
        me.cpu_tiles.cache_clear()
        with pytest.raises(ValueError, match="ROWSxKEYS"):
            me.cpu_tiles(1)
    finally:
        me.cpu_tiles.cache_clear()
