"""Paged and ragged KV caches (DESIGN.md, "Paged KV caches"): the pool and its block table, the work
counted as the pages read, every available decode implementation exact against the per-request float64
reference (page sizes that do not divide the lengths, a partly filled last page, requests shorter than a
page), and a kernel that reads pages in pool order instead of table order caught."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from harness import registry, shapes
from harness.accuracy import baseline
from harness.errors import InputError
from harness.prepare import prepare
from harness.shapes import Case
from harness.variants import STALE_SLOT, VARIANTS, Params

DECODE = VARIANTS["decode"]

CASES = [
    Params(batch=3, heads=4, kv_heads=2, seq_len=1, seq_len_kv=100, head_dim=16, ragged=True),
    Params(batch=3, heads=4, kv_heads=2, seq_len=3, seq_len_kv=100, head_dim=16, page_size=16),
    Params(batch=3, heads=4, kv_heads=2, seq_len=3, seq_len_kv=100, head_dim=16, page_size=7, ragged=True),
    Params(batch=3, heads=4, kv_heads=1, seq_len=4, seq_len_kv=50, head_dim=16, page_size=64, ragged=True),
    Params(batch=2, heads=4, seq_len=1, seq_len_kv=300, head_dim=16, page_size=32, ragged=True),
    Params(
        batch=3,
        heads=4,
        kv_heads=2,
        seq_len=2,
        seq_len_kv=100,
        head_dim=16,
        page_size=16,
        ragged=True,
        window=10,
        softcap=3.0,
    ),
]
IDS = [shapes.case_id("decode", "x", DECODE.normalize(p)).split("/")[-1] for p in CASES]


def test_ragged_lengths_are_seeded_with_the_first_request_full():
    p = DECODE.normalize(Params(batch=6, seq_len=4, seq_len_kv=4096, ragged=True))
    lengths = shapes.cache_lengths(p, seed=0)
    assert lengths[0] == 4096 and all(512 <= n <= 4096 for n in lengths) and len(set(lengths)) > 1
    assert lengths == shapes.cache_lengths(p, seed=0) != shapes.cache_lengths(p, seed=1)
    assert shapes.cache_lengths(replace(p, ragged=False)) is None
    assert shapes.cache_lengths(replace(p, ragged=False, page_size=16)) == [4096] * 6


def test_the_pool_is_a_fragmented_permutation_holding_each_request_in_table_order():
    p = DECODE.normalize(
        Params(batch=3, heads=4, kv_heads=2, seq_len=1, seq_len_kv=100, head_dim=8, page_size=16, ragged=True)
    )
    contiguous = DECODE.make_inputs(replace(p, page_size=None), seed=5)
    paged = DECODE.make_inputs(p, seed=5)
    pool, table, lens = paged.args[1], paged.kwargs["block_table"], paged.kwargs["cache_lens"]
    assert torch.equal(lens, contiguous.kwargs["cache_lens"])
    used = table[table >= 0]
    assert sorted(used.tolist()) == list(range(pool.shape[0]))  # every page once: no slack, no sharing
    assert used.tolist() != sorted(used.tolist())  # not the sequential best case
    for b, n in enumerate(lens.tolist()):
        pages = -(-n // 16)
        assert (table[b, pages:] == -1).all()
        gathered = pool[table[b, :pages].long()].flatten(0, 1)  # (pages·P, H_kv, D)
        assert torch.equal(gathered[:n].transpose(0, 1), contiguous.args[1][b, :, :n])
        assert (gathered[n:] == STALE_SLOT).all()  # a partly filled last page: the rest is stale, never read


def test_bytes_moved_counts_the_pages_read():
    p = DECODE.normalize(
        Params(batch=2, heads=4, kv_heads=2, seq_len=1, seq_len_kv=100, head_dim=8, page_size=64, ragged=True)
    )
    lengths = shapes.cache_lengths(p, 0)
    per_token = 2 * 4 * 2 * 8  # k and v, float32, H_kv x D
    q_and_out = 2 * 4 * 2 * 4 * 8
    pages = sum(-(-n // 64) for n in lengths)
    assert DECODE.bytes_moved(p, 0) == q_and_out + pages * 64 * per_token
    assert DECODE.bytes_moved(replace(p, page_size=None), 0) == q_and_out + sum(lengths) * per_token


def _skip_slow(impl) -> bool:
    return impl.compiles and impl.name != "triton"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("params", CASES, ids=IDS)
def test_every_available_implementation_is_exact_on_paged_and_ragged_caches(params, dtype):
    params = replace(DECODE.normalize(params), dtype=dtype)
    inputs = DECODE.make_inputs(params, seed=3)
    base = baseline(DECODE, inputs, registry.get("decode", "naive").fn)
    checked = []
    for impl in registry.implementations("decode"):
        if impl.name == "sequential_pages" or _skip_slow(impl) or not impl.available_for(params)[0]:
            continue
        case = prepare(Case("", "decode", impl.name, params), 3, inputs=inputs)
        result = base.judge(case.call())
        assert result.accurate, f"{impl.name}: {result.reason}"
        checked.append(impl.name)
    assert {"naive", "chunked", "memory_efficient"} <= set(checked)


def test_memory_efficient_never_copies_the_whole_cache(monkeypatch):
    """Flash-Decoding over pages: each partition's pages are gathered into one small reused buffer."""
    import implementations.memory_efficient as me

    monkeypatch.setattr(me, "PAGED_PARTITION_KEYS", 64)
    params = DECODE.normalize(
        Params(batch=2, heads=4, kv_heads=2, seq_len=1, seq_len_kv=500, head_dim=16, page_size=16)
    )
    inputs = DECODE.make_inputs(params, seed=1)
    largest = []
    select = torch.index_select

    def spy(t, dim, index, *, out=None):
        largest.append(len(index))
        return select(t, dim, index, out=out)

    monkeypatch.setattr(torch, "index_select", spy)
    out = inputs.call(registry.get("decode", "memory_efficient").fn)
    monkeypatch.undo()
    base = baseline(DECODE, inputs, registry.get("decode", "naive").fn)
    assert base.judge(out).accurate
    assert largest and max(largest) <= 4  # 64 keys: four 16-key pages at a time, of 32 per request


def test_a_kernel_reading_pages_in_pool_order_is_caught(monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", "tests.plugins.sequential_pages")
    registry.reload()
    try:
        params = DECODE.normalize(
            Params(batch=2, heads=2, seq_len=1, seq_len_kv=200, head_dim=16, page_size=16, ragged=True)
        )
        inputs = DECODE.make_inputs(params, seed=0)
        base = baseline(DECODE, inputs, registry.get("decode", "naive").fn)
        result = base.judge(inputs.call(registry.get("decode", "sequential_pages").fn))
        assert not result.accurate
        # ... and the same kernel is right where the order does not matter: one page per request
        one_page = DECODE.normalize(replace(params, page_size=256))
        inputs = DECODE.make_inputs(one_page, seed=0)
        base = baseline(DECODE, inputs, registry.get("decode", "naive").fn)
        assert base.judge(inputs.call(registry.get("decode", "sequential_pages").fn)).accurate
    finally:
        monkeypatch.delenv("HARNESS_PLUGINS")
        registry.reload()


def test_sdpa_says_why_it_does_not_read_pages():
    params = DECODE.normalize(Params(heads=4, seq_len=1, seq_len_kv=64, page_size=16))
    ok, why = registry.get("decode", "sdpa").available_for(params)
    assert not ok and "block table" in why
    assert registry.get("decode", "sdpa").available_for(replace(params, page_size=None, ragged=True))[0]


def test_paging_is_for_decode_and_bad_tables_are_input_errors():
    with pytest.raises(InputError, match="page_size is only for decode"):
        VARIANTS["causal"].normalize(Params(page_size=16))
    params = DECODE.normalize(Params(batch=2, heads=2, seq_len=1, seq_len_kv=40, head_dim=8, page_size=16))
    inputs = DECODE.make_inputs(params)
    table = inputs.kwargs["block_table"].clone()
    table[0, 0] = 99
    with pytest.raises(InputError, match="outside the pool"):
        registry.check_inputs("decode", replace(inputs, kwargs={**inputs.kwargs, "block_table": table}))
    with pytest.raises(InputError, match="int32"):
        registry.check_inputs(
            "decode", replace(inputs, kwargs={**inputs.kwargs, "cache_lens": inputs.kwargs["cache_lens"].long()})
        )


@pytest.mark.slow
@pytest.mark.parametrize("params", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_flex_reads_pages_as_attention_gym_does(params):
    params = DECODE.normalize(params)
    impl = registry.get("decode", "flex")
    ok, why = impl.available_for(params)
    if not ok:
        pytest.skip(why)
    inputs = DECODE.make_inputs(params, seed=3)
    base = baseline(DECODE, inputs, registry.get("decode", "naive").fn)
    case = prepare(Case("", "decode", "flex", params), 3, inputs=inputs)
    assert case.setup_s is not None  # the block mask over the pool's slots, built once
    assert base.judge(case.call()).accurate
    ok, why = impl.available_for(replace(params, window=8))
    assert not ok and "without score modifiers" in why
