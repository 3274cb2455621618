from __future__ import annotations

import pytest
import torch

from harness import registry
from harness.errors import InputError
from harness.variants import VARIANTS, Params, get_variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_inputs_are_deterministic_per_seed(variant):
    spec = VARIANTS[variant]
    params = spec.normalize(
        Params(
            batch=2,
            heads=2,
            seq_len=4 if variant == "decode" else 16,
            seq_len_kv=12 if variant in ("cross_attention", "decode") else None,
            head_dim=8,
        )
    )
    first, again, other = (spec.make_inputs(params, seed=s) for s in (1, 1, 2))
    assert torch.equal(first.args[0], again.args[0])
    assert not torch.equal(first.args[0], other.args[0])


def test_inputs_take_dtype_and_device_from_arguments_over_params():
    inputs = VARIANTS["multi_head"].make_inputs(Params(dtype="float32"), dtype="bfloat16", device="cpu")
    assert inputs.args[0].dtype == torch.bfloat16


def test_flops_follow_the_design_formula():
    p = Params(batch=2, heads=4, seq_len=128, head_dim=64)
    assert VARIANTS["multi_head"].flops(p) == 4 * 2 * 4 * 128 * 128 * 64
    # causal counts its visible pairs: N(N+1)/2 per head, not N²/2
    assert VARIANTS["causal"].flops(VARIANTS["causal"].normalize(p)) == 4 * 2 * 4 * (128 * 129 // 2) * 64
    cross = Params(batch=1, heads=2, seq_len=100, seq_len_kv=30, head_dim=16)
    assert VARIANTS["cross_attention"].flops(cross) == 4 * 2 * 100 * 30 * 16


def test_self_attention_is_single_head_and_causal_is_always_causal():
    assert VARIANTS["self_attention"].normalize(Params(heads=8)).heads == 1
    assert VARIANTS["causal"].normalize(Params()).causal is True


def test_cross_attention_needs_seq_len_kv_and_others_refuse_it():
    with pytest.raises(InputError, match="seq_len_kv"):
        VARIANTS["cross_attention"].normalize(Params())
    with pytest.raises(InputError, match="only for cross_attention"):
        VARIANTS["multi_head"].normalize(Params(seq_len_kv=64))


def test_attention_gate_needs_a_square_pixel_count():
    with pytest.raises(InputError, match="perfect square"):
        VARIANTS["attention_gate"].normalize(Params(seq_len=1000))
    x, g, weights = VARIANTS["attention_gate"].make_inputs(Params(batch=2, seq_len=64, head_dim=8)).args
    assert x.shape == (2, 8, 8, 8) and g.shape == (2, 8, 8, 8) and weights.w_x.shape == (4, 8)


def test_attention_gate_reference_is_the_papers_additive_gate():
    x, g, w = VARIANTS["attention_gate"].make_inputs(Params(batch=1, seq_len=4, head_dim=2), dtype="float64").args
    px, pg = x[0, :, 0, 0], g[0, :, 0, 0]
    alpha = torch.sigmoid(w.w_psi @ torch.relu(w.w_g @ pg + w.b_g + w.w_x @ px + w.b_x) + w.b_psi)
    out = VARIANTS["attention_gate"].reference(
        VARIANTS["attention_gate"].make_inputs(Params(batch=1, seq_len=4, head_dim=2), dtype="float64")
    )
    assert torch.allclose(out[0, :, 0, 0], px * alpha)


def test_reference_of_a_row_slice_equals_the_slice_of_the_reference():
    from harness.variants import reference_attention

    q, k, v = VARIANTS["causal"].make_inputs(Params(batch=1, heads=2, seq_len=50, head_dim=8)).args
    full = reference_attention(q, k, v, causal=True)
    assert torch.allclose(reference_attention(q, k, v, causal=True, rows=slice(3, 50, 7)), full[:, :, 3:50:7])


def test_unknown_variant_has_a_did_you_mean():
    with pytest.raises(InputError, match="Did you mean 'multi_head'"):
        get_variant("multihead")


# Bad tensors: a clear InputError (a ValueError) naming the argument, never a silent broadcast.


def _qkv(b=1, h=2, n=8, d=4, n_kv=None):
    n_kv = n if n_kv is None else n_kv
    return torch.randn(b, h, n, d), torch.randn(b, h, n_kv, d), torch.randn(b, h, n_kv, d)


BAD_CALLS = {
    "rank-3 q": (lambda q, k, v: (q[0], k, v), "q must have rank 4"),
    "head_dim mismatch": (lambda q, k, v: (q, k[..., :3], v), "head_dim"),
    "dtype mismatch": (lambda q, k, v: (q, k.double(), v), "one dtype"),
    # Fewer k/v heads that divide q's are grouped-query attention; 3 kv heads for 2 query heads are not.
    "heads mismatch": (
        lambda q, k, v: (q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)),
        "batch and heads",
    ),
    "k/v heads differ": (lambda q, k, v: (q, k[:, :1], v), "batch and heads"),
    "batch broadcast": (lambda q, k, v: (q.expand(3, -1, -1, -1), k, v), "batch and heads"),
    "k/v length mismatch": (lambda q, k, v: (q, k, v[:, :, :5]), "same seq_len"),
    "not a tensor": (lambda q, k, v: (q.tolist(), k, v), "torch.Tensor"),
}


@pytest.mark.parametrize("name", [i.name for i in registry.implementations("multi_head")])
@pytest.mark.parametrize("bad", BAD_CALLS, ids=list(BAD_CALLS))
def test_bad_tensors_raise_a_value_error_naming_the_argument(name, bad):
    make, message = BAD_CALLS[bad]
    with pytest.raises(ValueError, match=message):
        registry.get("multi_head", name)(*make(*_qkv()))


@pytest.mark.parametrize("name", [i.name for i in registry.implementations("multi_head")])
def test_masks_that_do_not_broadcast_are_refused(name):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="mask"):
        registry.get("multi_head", name)(q, k, v, mask=torch.ones(7, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        registry.get("multi_head", name)(q, k, v, mask=torch.ones(8, 8, dtype=torch.int64))


@pytest.mark.parametrize("name", registry.names("attention_gate"))
def test_gate_refuses_mismatched_channels(name):
    x, g, w = VARIANTS["attention_gate"].make_inputs(Params(batch=1, seq_len=16, head_dim=4)).args
    with pytest.raises(ValueError, match="channels"):
        registry.get("attention_gate", name)(x[:, :3], g, w)
