"""The xformers and flash-attn adapters, on CPU, against stand-ins that follow those packages' APIs.

The real packages need CUDA, which CI does not have. The stand-ins implement the documented calling
conventions (sequence-major (B, N, H, D) layout, softmax_scale/scale, xformers' top-left
LowerTriangularMask and its 8-aligned bias rows, flash-attn's bottom-right causal alignment when
Nq != Nkv) with torch's SDPA, so these tests check what the adapters do: transposes, scales, mask
conversion, the fully-masked-row policy and honest availability.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import implementations.external as external
from harness import registry
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
