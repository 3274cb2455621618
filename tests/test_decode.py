"""Decode with a KV cache: bottom-right causality, every implementation exact on ragged caches,
Flash-Decoding's partitions merged exactly, the shapes a suite may ask for, bytes and GB/s in the
records, plots against Nkv, and the chatbot generating through the decode kernels."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import implementations.memory_efficient as memory_efficient_module
from harness import registry, shapes
from harness.errors import InputError
from harness.suite import parse_text
from harness.variants import VARIANTS, Inputs, Params
from tests.conftest import ROOT, assert_accurate, available_cpu

DECODE = VARIANTS["decode"]


def _impls(dtype: str = "float32", compiling: bool = True) -> list[str]:
    """The decode implementations this CPU runs; `compiling=False` leaves out those that compile (the fast
    tier starts no compile: test_correctness checks them, marked slow)."""
    shape = {"heads": 4, "kv_heads": 2, "head_dim": 16, "seq_len": 3, "seq_len_kv": 50}
    return [i.name for i in available_cpu("decode", dtype, **shape) if compiling or not i.compiles]


def _inputs(batch=2, heads=4, kv_heads=2, n_q=1, n_kv=67, head_dim=16, dtype="float32", seed=5) -> Inputs:
    params = Params(
        batch=batch, heads=heads, kv_heads=kv_heads, seq_len=n_q, seq_len_kv=n_kv, head_dim=head_dim, dtype=dtype
    )
    return DECODE.make_inputs(DECODE.normalize(params), seed=seed)


@pytest.fixture
def small_partitions(monkeypatch):
    """Partitions of 8 keys at most, so a short cache has many partitions and a ragged last one."""
    monkeypatch.setattr(memory_efficient_module, "DECODE_MIN_PARTITION", 8)
    monkeypatch.setattr(memory_efficient_module, "DECODE_STEP_ELEMENTS", {"cpu": 8, "cuda": 8})


def test_new_tokens_see_the_cache_bottom_right():
    inputs = _inputs(batch=1, heads=1, kv_heads=1, n_q=3, n_kv=7)
    assert inputs.kwargs == {"causal": True}  # Nq > 1: the kernel must align causality bottom-right
    q, k, v = inputs.args
    ref = DECODE.reference(inputs)
    for i in range(3):  # query i is position Nkv - Nq + i: it sees keys 0 .. 4 + i
        seen = k.shape[2] - 3 + i + 1
        weights = torch.softmax((q[0, 0, i].double() @ k[0, 0, :seen].double().T) / 4.0, dim=-1)
        torch.testing.assert_close(ref[0, 0, i], weights @ v[0, 0, :seen].double())
    assert _inputs(n_q=1).kwargs == {"causal": False}  # one new token sees the whole cache


def test_a_top_left_kernel_is_judged_wrong_for_decode():
    """The check can fail: prefill's top-left causality is not decode's."""
    from harness.accuracy import baseline

    inputs = _inputs(n_q=4, n_kv=40)
    base = baseline(DECODE, inputs, registry.get("decode", "naive").fn)
    assert not base.judge(inputs.call(registry.get("causal", "naive").fn)).accurate
    assert base.judge(inputs.call(registry.get("decode", "naive").fn)).accurate


CASES = [(1, 1, 67), (3, 2, 67), (16, 4, 45), (5, 1, 5)]  # (Nq, kv_heads, Nkv); Nkv = Nq: square


@pytest.mark.parametrize("name", _impls())
@pytest.mark.parametrize(("n_q", "kv_heads", "n_kv"), CASES, ids=[f"nq{a}-kv{b}-n{c}" for a, b, c in CASES])
def test_every_decode_implementation_matches_the_reference(name, n_q, kv_heads, n_kv):
    inputs = _inputs(n_q=n_q, kv_heads=kv_heads, n_kv=n_kv)
    assert inputs.args[1].shape == (2, kv_heads, n_kv, 16)  # the cache has kv_heads heads
    assert_accurate("decode", inputs, registry.get("decode", name))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("name", ["naive", "chunked", "memory_efficient", "sdpa"])
def test_decode_in_other_dtypes(name, dtype):
    if name not in _impls(dtype):
        pytest.skip(registry.get("decode", name).available("cpu", dtype)[1])
    inputs = _inputs(n_q=4, n_kv=300, dtype=dtype)
    out = inputs.call(registry.get("decode", name).fn)
    assert out.dtype == inputs.args[0].dtype
    if dtype == "float64":  # naive's float64 error is 0, so the rule's floor is one ulp: compare directly
        torch.testing.assert_close(out, DECODE.reference(inputs), rtol=1e-12, atol=1e-12)
    else:
        assert_accurate("decode", inputs, registry.get("decode", name))


@pytest.mark.parametrize(("n_q", "n_kv"), [(1, 61), (4, 61), (16, 83), (16, 17)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flash_decoding_merges_many_ragged_partitions_exactly(small_partitions, n_q, n_kv, dtype):
    # 8-key partitions: 61 keys are 7 full ones and a tail of 5, which rows 0-10 of 16 new tokens
    # (83 keys: tail of 3) cannot see at all; the merge must give that tail exactly no weight.
    parts = list(memory_efficient_module._decode_partitions(n_kv, 4, torch.device("cpu")))
    assert len(parts) == -(-n_kv // 8) and parts[-1][1] == n_kv
    inputs = _inputs(n_q=n_q, n_kv=n_kv, dtype=dtype, seed=n_kv)
    assert_accurate("decode", inputs, registry.get("decode", "memory_efficient"))


def test_flash_decoding_with_scores_far_apart_across_partitions(small_partitions):
    # One partition's scores are ~100 above the rest: a merge that forgot a partition's maximum would
    # overflow or lose it.
    inputs = _inputs(batch=1, heads=2, kv_heads=1, n_q=2, n_kv=40)
    q, k, v = inputs.args
    k[:, :, 17] = q[0, 0, 0] * 30
    assert_accurate("decode", inputs, registry.get("decode", "memory_efficient"))


def test_decode_reads_a_cache_slice_in_place():
    """A serving cache is a slice of a longer buffer; kernels must take it as it is."""
    inputs = _inputs(n_q=2, n_kv=50)
    q, k, v = inputs.args
    buffer_k, buffer_v = torch.zeros(2, 2, 80, 16), torch.zeros(2, 2, 80, 16)
    buffer_k[:, :, :50], buffer_v[:, :, :50] = k, v
    sliced = Inputs((q, buffer_k[:, :, :50], buffer_v[:, :, :50]), inputs.kwargs)
    for name in _impls(compiling=False):
        assert_accurate("decode", sliced, registry.get("decode", name))


def test_memory_efficient_decode_with_a_user_mask_or_a_gradient_stays_exact():
    inputs = _inputs(n_q=3, n_kv=30)
    keep = torch.rand(2, 1, 3, 30, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True
    masked = Inputs(inputs.args, inputs.kwargs | {"mask": keep})
    assert_accurate("decode", masked, registry.get("decode", "memory_efficient"))
    leaves = inputs.with_grad()
    out = leaves.call(registry.get("decode", "memory_efficient").fn)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in leaves.args)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (Params(seq_len=8, seq_len_kv=4), "cannot exceed seq_len_kv"),
        (Params(seq_len=1), "decode needs seq_len_kv"),
        (Params(heads=8, kv_heads=3, seq_len=1, seq_len_kv=16), "kv_heads must divide heads"),
        (Params(seq_len=1, seq_len_kv=16, causal=True), "causal does not apply to decode"),
        (Params(seq_len=1, seq_len_kv=16, direction="bwd"), "decode is inference"),
    ],
)
def test_impossible_decode_shapes_are_input_errors(params, message):
    with pytest.raises(InputError, match=message):
        DECODE.normalize(params)


@pytest.mark.slow
def test_a_suite_with_an_impossible_decode_shape_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "decode_bad.yaml"
    path.write_text(
        "name: bad\nvariants: [decode]\nimplementations: [naive]\n"
        "sweep: {heads: [4], seq_len: [8], seq_len_kv: [4], head_dim: [16]}\n"
    )
    done = subprocess.run([sys.executable, "-m", "harness", "run", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert str(path) in done.stderr and "cannot exceed seq_len_kv" in done.stderr
    assert "Traceback" not in done.stderr


def test_decode_work_is_the_whole_cache_read_once():
    p = Params(batch=2, heads=32, kv_heads=8, seq_len=4, seq_len_kv=4096, head_dim=128, dtype="bfloat16")
    cache = 2 * 2 * 8 * 4096 * 128 * 2  # k and v: B x H_kv x Nkv x D, bf16
    q_and_out = 2 * 2 * 32 * 4 * 128 * 2
    assert DECODE.bytes_moved(DECODE.normalize(p)) == cache + q_and_out
    # query i of 4 sees 4093 + i keys: 4 x 4096 - 6 pairs, two matmuls of 2 x D FLOPs each
    assert DECODE.flops(p) == 4 * 2 * 32 * (4 * 4096 - 6) * 128
    assert DECODE.tokens(p) == 2 * 4  # generated tokens per call
    assert shapes.case_id("decode", "naive", DECODE.normalize(p)) == (
        "decode/naive/b2-h32g8-n4-kv4096-d128-bfloat16-cpu"
    )


@pytest.mark.slow
def test_a_decode_run_records_bandwidth_and_plots_it_against_the_cache_length(tmp_path):
    suite = tmp_path / "decode_tiny.yaml"
    suite.write_text(
        "name: decode_tiny\nvariants: [decode]\nimplementations: [naive, memory_efficient]\n"
        "sweep: {batch: [1], heads: [4], kv_heads: [2], seq_len: [1, 2], seq_len_kv: [64, 200], head_dim: [16],"
        " threads: [1]}\n"
        "timing: {warmup: 1, min_time_s: 0.01, min_samples: 3, max_time_s: 0.5, min_sample_time_s: 0}\n"
    )
    out = tmp_path / "run"
    command = [sys.executable, "-m", "harness", "run", str(suite), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["status"] == "ok" and r["accurate"] for r in records)
    for r in records:
        params = replace(Params(), **{k: v for k, v in r["params"].items()})
        assert r["bytes_moved"] == DECODE.bytes_moved(params)
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / r["time_s"]["median"] / 1e9)
    plots = sorted(p.name for p in (out / "plots").glob("decode-*.png"))
    # One plot per Nq (1 and 2) with Nkv along the x axis, not one per Nkv.
    assert len(plots) == 2, plots
    assert "GB/s" in (out / "report.html").read_text()


def test_the_decode_suites_load_and_expand():
    from harness.suite import expand, load_suite

    cases = expand(load_suite(ROOT / "suites" / "decode.yaml"))
    assert {c.params.kv_heads for c in cases} == {None, 8, 1}  # 32 kv heads of 32 is plain multi-head
    assert {c.params.seq_len for c in cases} == {1, 4}
    assert max(c.params.seq_len_kv for c in cases) == 32768
    assert any(c.skip_reason for c in cases)  # B=8 with 32 kv heads stops at 16k
    parse_text((ROOT / "suites" / "decode_cuda.yaml").read_text(), "decode_cuda.yaml")


def test_chatbot_generation_with_a_kv_cache_matches_recomputing_the_prefix():
    from harness.tasks import chatbot
    from harness.tasks.common import Attention

    torch.manual_seed(0)
    prefill, decode = Attention("causal"), Attention("decode")
    model = chatbot.GPT(prefill).eval()
    prompts = torch.randint(0, len(chatbot.VOCAB), (3, 10))
    with torch.inference_mode():
        cache = chatbot.KVCache(model, 3)
        chatbot.cached_logits(model, prompts, cache, prefill)
        step = torch.randint(0, len(chatbot.VOCAB), (3, 1))
        cached = chatbot.cached_logits(model, step, cache, decode)[:, -1]
        full = model(torch.cat([prompts, step], dim=1))[:, -1]
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
        assert cache.length == 11
        tokens = chatbot.generate(model, prompts, 4, prefill, decode)
        decode.use("memory_efficient")
        assert torch.equal(chatbot.generate(model, prompts, 4, prefill, decode), tokens)


def test_a_row_sampled_check_keeps_decode_bottom_right(monkeypatch):
    """Long caches are checked on a subset of query rows; that subset must keep decode's alignment,
    or every correct kernel would be judged wrong (the check fails a top-left kernel still)."""
    import harness.accuracy as accuracy

    monkeypatch.setattr(accuracy, "FULL_CHECK_ELEMENTS", 100)
    inputs = _inputs(batch=1, heads=2, kv_heads=1, n_q=16, n_kv=40)
    base = accuracy.baseline(DECODE, inputs, registry.get("decode", "naive").fn)
    assert base.rows is not None and base.rows.step > 1
    for name in _impls(compiling=False):
        assert base.judge(inputs.call(registry.get("decode", name).fn)).accurate, name
    assert not base.judge(inputs.call(registry.get("causal", "naive").fn)).accurate
