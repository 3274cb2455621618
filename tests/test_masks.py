"""Score modifiers and packed documents: window, softcap, ALiBi and documents (DESIGN.md).

The float64 reference is checked against a brute-force loop written from DESIGN.md's definitions;
every available implementation against the reference by the one accuracy rule, forward and backward,
through the registry's setup where it has one; the work (visible pairs, density) against a count; and
a kernel whose window is off by one must be caught.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from harness import registry, shapes
from harness.accuracy import baseline, grad_baseline
from harness.errors import InputError
from harness.prepare import make_dout, prepare
from harness.shapes import Case
from harness.variants import VARIANTS, Params, alibi_slopes, position_bias

# Lengths that are not multiples of any tile, GQA, both causal alignments, every modifier alone and
# all together.
CASES = [
    ("multi_head", Params(batch=2, heads=4, seq_len=67, head_dim=16, window=8)),
    ("causal", Params(batch=2, heads=4, seq_len=67, head_dim=16, window=5)),
    ("causal", Params(batch=1, heads=2, seq_len=40, head_dim=16, window=0)),
    ("causal", Params(batch=2, heads=4, seq_len=67, head_dim=16, softcap=2.0)),
    ("multi_head", Params(batch=2, heads=4, seq_len=67, head_dim=16, alibi=True)),
    ("causal", Params(batch=2, heads=4, seq_len=67, head_dim=16, documents=4)),
    ("multi_head", Params(batch=2, heads=4, seq_len=67, head_dim=16, documents=5)),
    ("self_attention", Params(batch=2, seq_len=67, head_dim=16, documents=6)),
    (
        "causal",
        Params(batch=2, heads=4, kv_heads=2, seq_len=70, head_dim=16, documents=3, window=9, softcap=3.0, alibi=True),
    ),
    (
        "cross_attention",
        Params(batch=2, heads=4, seq_len=37, seq_len_kv=67, head_dim=16, window=6, alibi=True, softcap=4.0),
    ),
    (
        "decode",
        Params(batch=2, heads=4, kv_heads=2, seq_len=3, seq_len_kv=67, head_dim=16, window=10, alibi=True, softcap=3.0),
    ),
    ("decode", Params(batch=2, heads=4, seq_len=1, seq_len_kv=67, head_dim=16, window=10)),
]
IDS = [f"{v}-{shapes.case_id(v, 'x', VARIANTS[v].normalize(p)).split('/')[-1]}" for v, p in CASES]


def brute_force(q, k, v, *, offset, causal, window=None, softcap=None, slopes=None, doc_of=None):
    """DESIGN.md's definitions, one (batch, head, query) at a time, in float64."""
    batch, heads, n_q, d = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(n_q):
                pos = i + offset
                weights = []
                for j in range(k.shape[2]):
                    hidden = (causal and j > pos) or (
                        window is not None and (j < pos - window or (not causal and j > pos + window))
                    )
                    if doc_of is not None and doc_of[b][i] != doc_of[b][j]:
                        hidden = True
                    if hidden:
                        continue
                    s = float(q[b, h, i].double() @ k[b, h // group, j].double()) / math.sqrt(d)
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= slopes[h] * abs(pos - j)
                    weights.append((j, s))
                if not weights:
                    continue
                top = max(s for _, s in weights)
                total = sum(math.exp(s - top) for _, s in weights)
                for j, s in weights:
                    out[b, h, i] += math.exp(s - top) / total * v[b, h // group, j].double()
    return out


@pytest.mark.parametrize(("variant", "params"), CASES[:2] + CASES[8:11], ids=IDS[:2] + IDS[8:11])
def test_the_reference_applies_every_modifier_exactly(variant, params):
    spec = VARIANTS[variant]
    params = spec.normalize(replace(params, seq_len=min(params.seq_len, 20), seq_len_kv=params.seq_len_kv and 24))
    inputs = spec.make_inputs(params, seed=1)
    q, k, v = inputs.args
    doc_of = None
    lengths = shapes.document_lengths(params, seed=1)
    if lengths is not None:
        doc_of = [[d for d, n in enumerate(row) for _ in range(n)] for row in lengths]
    expected = brute_force(
        q, k, v,
        offset=spec.causal_offset(q.shape[2], k.shape[2]),
        causal=params.causal or variant == "decode",
        window=params.window,
        softcap=params.softcap,
        slopes=alibi_slopes(params.heads) if params.alibi else None,
        doc_of=doc_of,
    )  # fmt: skip
    assert torch.allclose(spec.reference(inputs), expected, atol=1e-10)


def test_documents_are_a_seeded_composition_of_the_sequence():
    p = Params(batch=3, seq_len=100, documents=7)
    lengths = shapes.document_lengths(p, seed=0)
    assert len(lengths) == 3 and all(len(row) == 7 and sum(row) == 100 and min(row) > 0 for row in lengths)
    assert lengths == shapes.document_lengths(p, seed=0) != shapes.document_lengths(p, seed=1)
    cu = VARIANTS["causal"].make_inputs(VARIANTS["causal"].normalize(replace(p, heads=1))).kwargs["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.tolist()[-1] == 300 and len(cu) == 22


@pytest.mark.parametrize(("variant", "params"), CASES, ids=IDS)
def test_visible_pairs_count_what_the_reference_lets_through(variant, params):
    spec = VARIANTS[variant]
    params = spec.normalize(params)
    inputs = spec.make_inputs(params, seed=4)
    q, k, _ = inputs.args
    cu = inputs.kwargs.get("cu_seqlens")
    from harness.variants import reference_doc_ids

    bias = position_bias(
        torch.arange(q.shape[2]),
        k.shape[2],
        offset=spec.causal_offset(q.shape[2], k.shape[2]),
        causal=params.causal or variant == "decode",
        window=params.window,
        doc_ids=None if cu is None else reference_doc_ids(cu, params.batch, params.seq_len),
    )
    visible = (
        params.batch * q.shape[2] * k.shape[2]
        if bias is None
        else int(torch.isfinite(bias).expand(params.batch, 1, -1, -1).sum())
    )
    assert shapes.visible_pairs(params, seed=4, bottom_right=variant == "decode") == visible
    assert spec.density(params, seed=4) == pytest.approx(visible / (params.batch * q.shape[2] * k.shape[2]))


def test_causal_work_is_n_times_n_plus_one_over_two_pairs():
    p = VARIANTS["causal"].normalize(Params(batch=1, heads=1, seq_len=8192, head_dim=64, window=512))
    assert shapes.visible_pairs(replace(p, window=None)) == 8192 * 8193 // 2
    # the figure: W=512 leaves 0.061 of the pairs, causal alone 0.5
    assert round(shapes.density(p), 3) == 0.061


def _implementations(variant: str, params: Params, direction: str = "fwd"):
    for impl in registry.implementations(variant):
        if impl.name in ("wrong_window",):
            continue
        ok, _ = impl.available_for(replace(params, direction=direction))
        if ok:
            yield impl


def _slow_ones(impl) -> bool:
    return impl.compiles and impl.name != "triton"  # flex, compiled.*: a compile per case


@pytest.mark.parametrize(("variant", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_available_implementation_is_exact_with_modifiers(variant, params, dtype):
    spec = VARIANTS[variant]
    params = replace(spec.normalize(params), dtype=dtype)
    inputs = spec.make_inputs(params, seed=3)
    base = baseline(spec, inputs, registry.get(variant, "naive").fn)
    checked = []
    for impl in _implementations(variant, params):
        if _slow_ones(impl):
            continue
        case = prepare(Case("", variant, impl.name, params), 3, inputs=inputs)
        result = base.judge(case.call())
        assert result.accurate, f"{impl.name}: {result.reason}"
        checked.append(impl.name)
    assert {"naive", "chunked", "memory_efficient"} <= set(checked)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "params"), [CASES[8], CASES[9], CASES[10]], ids=[IDS[8], IDS[9], IDS[10]])
def test_flex_applies_every_modifier_exactly(variant, params):
    spec = VARIANTS[variant]
    params = spec.normalize(params)
    impl = registry.get(variant, "flex")
    ok, why = impl.available_for(params)
    if not ok:
        pytest.skip(why)
    inputs = spec.make_inputs(params, seed=3)
    base = baseline(spec, inputs, registry.get(variant, "naive").fn)
    case = prepare(Case("", variant, "flex", params), 3, inputs=inputs)
    assert base.judge(case.call()).accurate
    if params.window is not None or params.documents is not None:
        assert case.setup_s is not None and case.setup_bytes > 0  # the block mask, built once


# Window 0 is left out of the gradient check: each row then sees only itself, dq and dk are exactly 0 in
# float64, and a tiled kernel's rounding of P = 2^(s - lse) ≈ 1 leaves ~1e-6 there, which the rule's
# floor (scaled by the reference gradient's magnitude, here 0) does not allow for. Its forward is checked.
GRADIENT_CASES = [(c, i) for c, i in zip(CASES, IDS, strict=True) if c[0] != "decode" and c[1].window != 0]


@pytest.mark.parametrize(("variant", "params"), [c for c, _ in GRADIENT_CASES], ids=[i for _, i in GRADIENT_CASES])
def test_gradients_with_modifiers_match_float64_autograd(variant, params):
    spec = VARIANTS[variant]
    params = replace(spec.normalize(params), direction="bwd", seq_len=min(params.seq_len, 40))
    inputs = spec.make_inputs(params, seed=2)
    dout = make_dout(inputs.args[0], 2)
    grads = grad_baseline(spec, inputs, dout, registry.get(variant, "naive").fn)
    for impl in _implementations(variant, params, "bwd"):
        if _slow_ones(impl):
            continue
        case = prepare(Case("", variant, impl.name, params), 2, inputs=inputs)
        with torch.enable_grad():
            case.call().backward(dout)
        result = grads.judge(case.grads())
        assert result.accurate, f"{impl.name}: {result.reason}"


def test_a_window_off_by_one_is_caught(monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", "tests.plugins.wrong_window")
    registry.reload()
    try:
        spec = VARIANTS["causal"]
        params = spec.normalize(Params(batch=1, heads=2, seq_len=64, head_dim=16, window=8))
        inputs = spec.make_inputs(params, seed=0)
        base = baseline(spec, inputs, registry.get("causal", "naive").fn)
        result = base.judge(inputs.call(registry.get("causal", "wrong_window").fn))
        assert not result.accurate and "tolerance" in result.reason
    finally:
        monkeypatch.delenv("HARNESS_PLUGINS")
        registry.reload()


def test_a_kernel_that_cannot_apply_a_modifier_is_unavailable_with_its_reason():
    params = VARIANTS["causal"].normalize(Params(heads=4, softcap=30.0))
    ok, why = registry.get("causal", "sdpa").available_for(params)
    assert not ok and "nonlinear" in why
    # A kernel that declares no modifiers (every plugin until it says otherwise) is never silently used.
    registry.register("declares_nothing", variants=("causal",))(
        lambda q, k, v, *, causal=False, scale=None, mask=None: q
    )
    try:
        ok, why = registry.get("causal", "declares_nothing").available_for(replace(params, softcap=None, window=4))
        assert not ok and "does not apply window" in why
    finally:
        registry._REGISTRY.pop(("causal", "declares_nothing"))


@pytest.mark.parametrize(
    ("variant", "params", "words"),
    [
        ("self_attention", Params(window=4), "window is only for"),
        ("cross_attention", Params(seq_len_kv=64, documents=2), "documents is only for"),
        ("decode", Params(seq_len=1, seq_len_kv=64, documents=2), "documents is only for"),
        ("multi_head", Params(heads=6, alibi=True), "power of two"),
        ("causal", Params(seq_len=8, documents=9), "cannot exceed seq_len"),
    ],
)
def test_impossible_combinations_are_input_errors(variant, params, words):
    with pytest.raises(InputError, match=words):
        VARIANTS[variant].normalize(params)


def test_memory_efficient_visits_only_the_keys_a_window_leaves():
    import implementations.memory_efficient as me
    from implementations.masks import Positions

    where = Positions(n_q=1000, n_kv=1000, causal=True, window=100)
    tiles = me._key_tiles(where, 0, 500, 64, 256, None, 1, None, "cpu")
    first, last = tiles[0][0], tiles[-1][0] + tiles[-1][1]
    assert (first, last) == (400, 564)  # rows 500..563 see keys 400..563: nothing else is visited
    docs = Positions(n_q=100, n_kv=100, causal=True, cu_seqlens=torch.tensor([0, 30, 70, 100], dtype=torch.int32))
    tiles = me._key_tiles(docs, 0, 40, 20, 256, None, 1, None, "cpu")
    assert (tiles[0][0], tiles[-1][0] + tiles[-1][1]) == (30, 60)  # rows 40..59: their document from 30


@pytest.mark.slow
def test_a_masks_suite_records_density_documents_and_setup_and_plots_them(tmp_path):
    import json
    import subprocess
    import sys
    import textwrap

    suite = tmp_path / "masks.yaml"
    suite.write_text(
        textwrap.dedent("""\
        name: tiny_masks
        variants: [causal]
        implementations: [naive, memory_efficient, sdpa, chunked]
        sweep:
          - {batch: [1], heads: [2], head_dim: [16], seq_len: [128], window: [null, 16, 64], threads: [1]}
          - {batch: [2], heads: [2], head_dim: [16], seq_len: [128], documents: [1, 4], softcap: [null, 5.0]}
        timing: {warmup: 1, min_time_s: 0.01, min_samples: 3, max_time_s: 0.5, min_sample_time_s: 0}
        """)
    )
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(suite), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    assert ok and all(r["accurate"] for r in ok)
    assert all(0 < r["density"] <= 1 for r in ok)
    packed = [r for r in ok if r["params"]["documents"] == 4]
    assert packed and all(sum(r["doc_lens"][0]) == 128 and len(r["doc_lens"]) == 2 for r in packed)
    assert all(r.get("setup_s", 0) > 0 for r in ok if r["implementation"] == "sdpa" and r["params"]["window"])
    skipped = [r for r in records if r["implementation"] == "sdpa" and r["params"]["softcap"]]
    assert skipped and all(r["status"] == "skipped" and "nonlinear" in r["reason"] for r in skipped)
    html = (out / "report.html").read_text()
    assert "Windows and documents" in html and "against window" in html and "against documents" in html
