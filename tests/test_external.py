"""The xformers and flash-attn adapters, on CPU, against stand-ins that follow those packages' APIs.

The real packages need CUDA, which CI does not have. The stand-ins implement the documented calling
conventions (sequence-major (B, N, H, D) layout, softmax_scale/scale, xformers' top-left
LowerTriangularMask and its 8-aligned bias rows, flash-attn's bottom-right causal alignment when
Nq != Nkv) with torch's SDPA, so these tests check what the adapters do: transposes, scales, mask
conversion, the fully-masked-row policy and honest availability.
"""

from __future__ import annotations

import itertools
import sys
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import implementations.external as external
from harness import registry
from harness.accuracy import baseline
from harness.variants import VARIANTS, Params
from tests.conftest import assert_accurate


def _fake_flash_attn() -> types.ModuleType:
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.shape[2] == k.shape[2], "layout must be (batch, seq_len, heads, head_dim)"
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = None
        if causal:  # bottom-right aligned, as flash-attn >= 2.1 documents
            n_q, n_kv = q.shape[2], k.shape[2]
            mask = torch.ones(n_q, n_kv, dtype=torch.bool).tril(n_kv - n_q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale).transpose(1, 2)

    module.flash_attn_func = flash_attn_func
    return module


def _fake_xformers() -> tuple[types.ModuleType, types.ModuleType]:
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        if isinstance(attn_bias, LowerTriangularMask):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            if attn_bias is not None:
                assert attn_bias.stride(-2) % 8 == 0, "xformers needs 8-aligned bias rows"
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
        return out.transpose(1, 2)

    ops.LowerTriangularMask = LowerTriangularMask
    ops.memory_efficient_attention = memory_efficient_attention
    package.ops = ops
    return package, ops


@pytest.fixture
def fake_packages(monkeypatch):
    package, ops = _fake_xformers()
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def _inputs(n_q=37, n_kv=53, dtype="float32", seed=11):
    spec = VARIANTS["cross_attention"]
    return spec.make_inputs(Params(batch=2, heads=3, seq_len=n_q, seq_len_kv=n_kv, head_dim=16), dtype=dtype, seed=seed)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_adapter_is_exact(fake_packages, causal):
    inputs = _inputs(n_q=41, n_kv=41, dtype="bfloat16")
    inputs.kwargs.update(causal=causal, scale=0.2)
    assert_accurate("cross_attention", inputs, registry.get("cross_attention", "flash_attn"))


def test_flash_attn_refuses_what_it_cannot_do_exactly(fake_packages):
    impl = registry.get("cross_attention", "flash_attn")
    q, k, v = _inputs(dtype="bfloat16").args
    with pytest.raises(ValueError, match="bottom-right"):
        impl.fn(q, k, v, causal=True)
    with pytest.raises(ValueError, match="mask must be None"):
        impl.fn(q, k, v, mask=torch.ones(37, 53, dtype=torch.bool))
    with pytest.raises(ValueError, match="float16, bfloat16"):
        impl.fn(*_inputs().args)
    ok, why = impl.available("cuda", "bfloat16", causal=True, seq_len=37, seq_len_kv=53)
    assert not ok and ("bottom-right" in why or "CUDA" in why)


@pytest.mark.parametrize("kind", ["none", "causal", "bool", "additive", "bool+causal"])
def test_xformers_adapter_is_exact(fake_packages, kind):
    inputs = _inputs()
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(2, 1, 37, 53, generator=gen) > 0.3
    keep[..., 0] = True
    if kind in ("causal", "bool+causal"):
        inputs.kwargs["causal"] = True
    if kind.startswith("bool"):
        inputs.kwargs["mask"] = keep
    if kind == "additive":
        inputs.kwargs["mask"] = (torch.randn(keep.shape, generator=gen) * 0.5).masked_fill(~keep, float("-inf"))
    assert_accurate("cross_attention", inputs, registry.get("cross_attention", "xformers"))


def test_xformers_rows_that_see_no_key_are_zeros(fake_packages):
    q, k, v = _inputs().args
    mask = torch.ones(37, 53, dtype=torch.bool)
    mask[4] = False
    out = registry.get("cross_attention", "xformers").fn(q, k, v, mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))


def test_external_kernels_say_why_they_cannot_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import of it now fails like a missing package
    ok, why = registry.get("multi_head", "flash_attn").available("cpu", "float16")
    assert not ok and "not installed" in why
    assert external._installed("no_such_package_xyz") == (
        False,
        "no_such_package_xyz is not installed (pip install -e '.[gpu]' on a CUDA machine)",
    )


def test_installed_external_kernels_still_need_cuda(fake_packages):
    for name in ("xformers", "flash_attn"):
        ok, why = registry.get("multi_head", name).available("cpu", "float16")
        assert not ok and "CUDA only" in why


def test_a_package_that_imports_but_cannot_run_is_unavailable_in_its_own_words(monkeypatch):
    # As an xformers wheel built for another torch: the import works, the first call fails.
    package, ops = _fake_xformers()
    message = "xFormers was built for PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.11.0+cu130)"

    def broken(*args, **kwargs):
        raise NotImplementedError(message + "\n  Memory-efficient attention, SwiGLU, ... won't be available.")

    ops.memory_efficient_attention = broken
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(registry, "needs_cuda", lambda device=None, **_: (True, ""))  # as on a GPU machine
    ok, why = registry.get("multi_head", "xformers").available("cpu", "float32", head_dim=64)
    assert not ok and message in why and "imports but cannot run" in why


def test_a_package_that_runs_is_available_after_its_probe(fake_packages, monkeypatch):
    monkeypatch.setattr(registry, "needs_cuda", lambda device=None, **_: (True, ""))
    assert registry.get("multi_head", "xformers").available("cpu", "float32", head_dim=32) == (True, "")


# ----------------------------------------------------------------------------- score modifiers
#
# Richer stand-ins: flash-attn's window_size=(left, right), softcap, alibi_slopes and varlen documents,
# xformers' block-diagonal and local-attention biases, each written from the packages' documented
# semantics (bottom-right alignment, xformers' window counting the query itself), so a wrong argument
# (a window off by one, right and left swapped, top-left where the package means bottom-right) shows.


def _documented(q, k, v, scale, allowed, softcap=0.0, slopes=None):
    """softmax(cap(q kᵀ·scale) − slope·|i − j| over `allowed`) v in float32, (B, N, H, D) layout, with
    `allowed(pos, keys)` given each query's bottom-right position; rows that see nothing are zeros."""
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    n_q, n_kv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(n_q)[:, None] + (n_kv - n_q)
    keys = torch.arange(n_kv)[None, :]
    if slopes is not None:
        s = s - slopes.float()[None, :, None, None] * (pos - keys).abs()
    s = s.masked_fill(~allowed(pos, keys), float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return (p @ v).transpose(1, 2)


SEEN: dict[str, dict] = {}


def _flash_standin() -> types.ModuleType:
    module = types.ModuleType("flash_attn")

    def flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None
    ):
        SEEN["flash_attn_func"] = {"window_size": window_size, "softcap": softcap, "alibi": alibi_slopes is not None}
        left, right = window_size
        if alibi_slopes is not None:
            assert alibi_slopes.dtype == torch.float32 and alibi_slopes.shape == (q.shape[2],)

        def allowed(pos, keys):
            ok = torch.ones(pos.shape[0], keys.shape[1], dtype=torch.bool)
            if causal:
                ok &= keys <= pos
            if left >= 0:
                ok &= keys >= pos - left
            if right >= 0:
                ok &= keys <= pos + right
            return ok

        out = _documented(q, k, v, softmax_scale, allowed, softcap, alibi_slopes)
        return out.to(q.dtype)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
        assert cu_seqlens_q.dtype == torch.int32 and isinstance(max_seqlen_q, int)
        assert q.dim() == 3, "varlen takes packed (total_tokens, heads, head_dim)"
        lengths = torch.diff(cu_seqlens_q).tolist()
        assert max(lengths) == max_seqlen_q
        SEEN["flash_attn_varlen_func"] = {"documents": len(lengths)}
        pieces = [
            flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], **kwargs)[0]
            for a, b in itertools.pairwise(cu_seqlens_q.tolist())
        ]
        return torch.cat(pieces)

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_with_kvcache = lambda q, k, v, softmax_scale=None, causal=False, **kw: flash_attn_func(
        q, k, v, softmax_scale=softmax_scale, causal=causal, **kw
    )
    return module


def _xformers_standin() -> tuple[types.ModuleType, types.ModuleType]:
    package, ops = _fake_xformers()
    plain = ops.memory_efficient_attention
    biases = types.SimpleNamespace()

    class Blocks:
        causal = False

        def __init__(self, lengths, window=None):
            self.lengths, self.window = list(lengths), window

        @classmethod
        def from_seqlens(cls, lengths):
            return cls(lengths)

        def make_local_attention(self, window_size):
            assert self.causal and window_size > 0
            return type(self)(self.lengths, window_size)

    class BlockDiagonalMask(Blocks):
        pass

    class BlockDiagonalCausalMask(Blocks):
        causal = True

    class LocalAttentionFromBottomRightMask:
        def __init__(self, window_left, window_right):
            self.left, self.right = window_left, window_right

    class LowerTriangularFromBottomRightMask:
        pass

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        if isinstance(attn_bias, Blocks):
            SEEN["xformers"] = {"blocks": attn_bias.lengths, "causal": attn_bias.causal, "window": attn_bias.window}
            assert query.shape[0] == 1, "block-diagonal biases take one packed sequence"
            doc = torch.repeat_interleave(torch.arange(len(attn_bias.lengths)), torch.tensor(attn_bias.lengths))

            def allowed(pos, keys):
                ok = doc[pos] == doc[keys]
                if attn_bias.causal:
                    ok &= keys <= pos
                if attn_bias.window is not None:  # the query itself counts: keys j > i - window_size
                    ok &= keys > pos - attn_bias.window
                return ok

            return _documented(query, key, value, scale, allowed).to(query.dtype)
        if isinstance(attn_bias, LocalAttentionFromBottomRightMask):
            SEEN["xformers"] = {"left": attn_bias.left, "right": attn_bias.right}
            return _documented(
                query,
                key,
                value,
                scale,
                lambda pos, keys: (keys >= pos - attn_bias.left) & (keys <= pos + attn_bias.right),
            ).to(query.dtype)
        if isinstance(attn_bias, LowerTriangularFromBottomRightMask):
            return _documented(query, key, value, scale, lambda pos, keys: keys <= pos).to(query.dtype)
        return plain(query, key, value, attn_bias=attn_bias, p=p, scale=scale)

    for cls in (BlockDiagonalMask, BlockDiagonalCausalMask, LocalAttentionFromBottomRightMask):
        setattr(biases, cls.__name__, cls)
    biases.LowerTriangularFromBottomRightMask = LowerTriangularFromBottomRightMask
    ops.fmha = types.SimpleNamespace(attn_bias=biases)
    ops.memory_efficient_attention = memory_efficient_attention
    return package, ops


@pytest.fixture
def standins(monkeypatch):
    package, ops = _xformers_standin()
    monkeypatch.setitem(sys.modules, "flash_attn", _flash_standin())
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(registry, "needs_cuda", lambda device=None, **_: (True, ""))  # as on a GPU machine
    SEEN.clear()


MODIFIED = [
    ("causal", Params(batch=2, heads=4, seq_len=45, head_dim=16, window=7), "window_size", (7, 0)),
    ("multi_head", Params(batch=2, heads=4, seq_len=45, head_dim=16, window=5), "window_size", (5, 5)),
    ("causal", Params(batch=2, heads=4, seq_len=45, head_dim=16, softcap=2.0, alibi=True), "softcap", 2.0),
    ("causal", Params(batch=2, heads=4, seq_len=45, head_dim=16, documents=4), "documents", 8),
    ("multi_head", Params(batch=2, heads=4, seq_len=45, head_dim=16, documents=3, window=4), "documents", 6),
    (
        "decode",
        Params(batch=2, heads=4, kv_heads=2, seq_len=3, seq_len_kv=45, head_dim=16, window=9),
        "window_size",
        (9, 0),
    ),
]


def _prepared(variant: str, name: str, params: Params, dtype: str = "bfloat16"):
    from harness.prepare import prepare
    from harness.shapes import Case

    spec = VARIANTS[variant]
    params = spec.normalize(params)
    inputs = spec.make_inputs(params, dtype=dtype, seed=5)
    return inputs, prepare(Case("", variant, name, replace(params, dtype=dtype)), 5, inputs=inputs)


@pytest.mark.parametrize(("variant", "params", "key", "expected"), MODIFIED, ids=[str(i) for i in range(len(MODIFIED))])
def test_flash_attn_maps_every_modifier_exactly(standins, variant, params, key, expected):
    impl = registry.get(variant, "flash_attn")
    ok, why = impl.available_for(replace(params, dtype="bfloat16"))
    assert ok, why
    inputs, case = _prepared(variant, "flash_attn", params)
    base = baseline(VARIANTS[variant], inputs, registry.get(variant, "naive").fn)
    result = base.judge(case.call())
    assert result.accurate, result.reason
    seen = SEEN["flash_attn_varlen_func" if key == "documents" else "flash_attn_func"]
    assert seen[key] == expected


@pytest.mark.parametrize(("variant", "params", "key", "expected"), MODIFIED, ids=[str(i) for i in range(len(MODIFIED))])
def test_xformers_maps_what_it_can_and_says_why_not(standins, variant, params, key, expected):
    impl = registry.get(variant, "xformers")
    params = VARIANTS[variant].normalize(params)
    ok, why = impl.available_for(replace(params, dtype="bfloat16"))
    if params.softcap is not None:
        assert not ok and "soft-capping" in why
        return
    if params.documents is not None and params.window is not None and not params.causal:
        assert not ok and "causal documents" in why
        return
    if params.kv_heads is not None:
        assert not ok
        return
    assert ok, why
    inputs, case = _prepared(variant, "xformers", params)
    assert case.setup_s is not None  # the bias object is built once, outside the calls
    base = baseline(VARIANTS[variant], inputs, registry.get(variant, "naive").fn)
    result = base.judge(case.call())
    assert result.accurate, result.reason


def test_a_window_off_by_one_in_the_adapter_would_be_caught(standins, monkeypatch):
    # The stand-in is strict enough to tell: shift flash-attn's left window by one and the rule fails.
    monkeypatch.setattr(
        external, "_flash_mods", lambda causal, window, softcap, slopes: {"window_size": (window - 1, 0)}
    )
    inputs, case = _prepared("causal", "flash_attn", Params(batch=1, heads=2, seq_len=40, head_dim=16, window=6))
    base = baseline(VARIANTS["causal"], inputs, registry.get("causal", "naive").fn)
    assert not base.judge(case.call()).accurate


def test_flash_attn_refuses_top_left_windows_across_lengths(standins):
    impl = registry.get("cross_attention", "flash_attn")
    ok, why = impl.available("cuda", "bfloat16", seq_len=20, seq_len_kv=40, window=4, heads=2, head_dim=16)
    assert not ok and "window" in why and "bottom-right" in why


# ----------------------------------------------------------------------------- paged KV caches


def _paged_flash_standin() -> types.ModuleType:
    """flash_attn_with_kvcache as documented: k_cache (num_blocks, page_block_size, H_kv, D) read through
    block_table (B, max_blocks) int32, each request's length cache_seqlens (B,) int32, bottom-right."""
    module = _flash_standin()

    def flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=None, block_table=None, softmax_scale=None, causal=False, **kw
    ):
        SEEN["flash_attn_with_kvcache"] = {"paged": block_table is not None, "seqlens": cache_seqlens is not None}
        assert cache_seqlens is None or cache_seqlens.dtype == torch.int32
        if block_table is not None:
            assert block_table.dtype == torch.int32 and k_cache.shape[1] % 256 == 0, "flash-attn 2: pages of 256k"
        outs = []
        for b in range(q.shape[0]):
            n = int(cache_seqlens[b]) if cache_seqlens is not None else k_cache.shape[1]
            if block_table is not None:
                pages = block_table[b, : -(-n // k_cache.shape[1])].long()
                k_b, v_b = (t[pages].flatten(0, 1)[None, :n] for t in (k_cache, v_cache))
            else:
                k_b, v_b = k_cache[b : b + 1, :n], v_cache[b : b + 1, :n]
            outs.append(
                module.flash_attn_func(q[b : b + 1], k_b, v_b, softmax_scale=softmax_scale, causal=causal, **kw)
            )
        return torch.cat(outs)

    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    return module


def _flashinfer_standin() -> types.ModuleType:
    """BatchDecodeWithPagedKVCacheWrapper as documented: plan(indptr, indices, last_page_len, ...) then
    run(q (B, H, D), (k_pages, v_pages)) with NHD pages (num_pages, P, H_kv, D)."""
    module = types.ModuleType("flashinfer")

    class BatchDecodeWithPagedKVCacheWrapper:
        def __init__(self, workspace, kv_layout="NHD"):
            assert kv_layout == "NHD" and workspace.dtype == torch.uint8
            self.planned = None

        def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kwargs):
            assert indptr.dtype == indices.dtype == last_page_len.dtype == torch.int32
            assert int(indptr[-1]) == len(indices) and (last_page_len >= 1).all() and (last_page_len <= page_size).all()
            self.planned = (indptr.tolist(), indices.long(), last_page_len.tolist(), page_size)
            SEEN["flashinfer.plan"] = SEEN.get("flashinfer.plan", 0) + 1

        def run(self, q, kv):
            indptr, indices, last, page = self.planned
            k_pages, v_pages = kv
            outs = []
            for b in range(q.shape[0]):
                pages = indices[indptr[b] : indptr[b + 1]]
                n = (len(pages) - 1) * page + last[b]
                k_b, v_b = (t[pages].flatten(0, 1)[None, :n] for t in (k_pages, v_pages))
                outs.append(_documented(q[b : b + 1, None], k_b, v_b, None, lambda pos, keys: keys <= pos)[:, 0])
            return torch.cat(outs).to(q.dtype)

    module.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    return module


@pytest.fixture
def paged_standins(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _paged_flash_standin())
    monkeypatch.setitem(sys.modules, "flashinfer", _flashinfer_standin())
    monkeypatch.setattr(registry, "needs_cuda", lambda device=None, **_: (True, ""))
    SEEN.clear()


PAGED = Params(batch=3, heads=4, kv_heads=2, seq_len=1, seq_len_kv=700, head_dim=16, ragged=True)


@pytest.mark.parametrize("page_size", [None, 256])
def test_flash_attn_reads_pages_through_its_block_table(paged_standins, page_size):
    params = replace(PAGED, page_size=page_size)
    assert registry.get("decode", "flash_attn").available_for(replace(params, dtype="bfloat16"))[0]
    inputs, case = _prepared("decode", "flash_attn", params)
    base = baseline(VARIANTS["decode"], inputs, registry.get("decode", "naive").fn)
    result = base.judge(case.call())
    assert result.accurate, result.reason
    assert SEEN["flash_attn_with_kvcache"] == {"paged": page_size is not None, "seqlens": True}


def test_flash_attn_refuses_pages_it_cannot_take_in_its_words(paged_standins):
    ok, why = registry.get("decode", "flash_attn").available_for(replace(PAGED, page_size=16, dtype="bfloat16"))
    assert not ok and "divisible by 256" in why and "page_block_size" in why


@pytest.mark.parametrize("page_size", [16, 48])
def test_flashinfer_plans_once_and_reads_pages_in_table_order(paged_standins, page_size):
    params = replace(PAGED, page_size=page_size)
    impl = registry.get("decode", "flashinfer")
    assert impl.available_for(replace(params, dtype="bfloat16")) == (True, "")
    inputs, case = _prepared("decode", "flashinfer", params)
    assert case.setup_s is not None and SEEN["flashinfer.plan"] == 1  # the plan is the setup, not a call's
    base = baseline(VARIANTS["decode"], inputs, registry.get("decode", "naive").fn)
    for _ in range(2):
        assert base.judge(case.call()).accurate
    assert SEEN["flashinfer.plan"] == 1


def test_flashinfer_says_what_it_cannot_run(paged_standins):
    impl = registry.get("decode", "flashinfer")
    ok, why = impl.available_for(replace(PAGED, page_size=16, seq_len=4, dtype="bfloat16"))
    assert not ok and "one new token" in why
    ok, why = impl.available_for(replace(PAGED, dtype="bfloat16"))
    assert not ok and "paged" in why


def test_flashinfer_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    ok, why = registry.get("decode", "flashinfer").available("cuda", "bfloat16", page_size=16, seq_len=1)
    assert not ok and "pip install -e '.[flashinfer]'" in why
