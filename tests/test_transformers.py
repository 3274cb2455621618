"""The harness's implementations inside a Hugging Face transformers model (harness.integrations.transformers,
task `llm`): the same logits and tokens as `eager` under real masks, and clear errors for what a kernel
cannot apply."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from harness import registry  # noqa: E402
from harness.integrations.transformers import (  # noqa: E402
    UnsupportedByBackend,
    attention_forward,
    backend_name,
    register,
)
from harness.tasks import llm  # noqa: E402

TINY = {"batch": 2, "prompt_len": 20, "left_pad": 5, "new_tokens": 4, "rounds": 1}
EXACT_CPU = ["naive", "chunked", "memory_efficient", "sdpa", "sdpa.math"]


def test_backend_names_avoid_the_words_transformers_dispatches_on():
    names = register("*")
    assert "harness-memory_efficient" in names and "harness-torch-sdp.math" in names
    for name in names:
        assert "flash" not in name and "sdpa" not in name
    assert backend_name("flash_attn") == "harness-fa_attn"


def test_only_matching_available_implementations_are_registered():
    names = register(["sdpa.*", "naive"])
    assert "harness-naive" in names and "harness-memory_efficient" not in names
    assert all(n == "harness-naive" or n.startswith("harness-torch-sdp.") for n in names)
    assert "harness-fa_attn" not in register("flash_attn")  # not installed here: not registered


def _llama(attn: str, **overrides):
    config = llm.load_config("llama")
    for key, value in overrides.items():
        setattr(config, key, value)
    return llm._model(config, attn, torch.float32, 0), config


@pytest.mark.parametrize("name", EXACT_CPU)
def test_logits_under_left_padding_and_gqa_match_eager(name):
    (backend,) = register(name)
    eager, config = _llama("eager")
    mine, _ = _llama(backend)
    ids, mask = llm._inputs(config, llm.DEFAULTS | TINY)
    real = mask.bool()
    want, got = llm._logits(eager, ids, mask), llm._logits(mine, ids, mask)
    assert (want - got)[real].abs().max() < 1e-4


def test_a_model_argument_the_kernel_cannot_apply_is_an_error_naming_it():
    forward = attention_forward("memory_efficient")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(UnsupportedByBackend, match="softcap=.*sdpa cannot apply"):
        attention_forward("sdpa")(torch.nn.Module(), q, q, q, None, softcap=50.0)
    with pytest.raises(UnsupportedByBackend, match="attention sinks"):
        forward(torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(2))
    training = torch.nn.Module().train()
    with pytest.raises(UnsupportedByBackend, match="dropout"):
        forward(training, q, q, q, None, dropout=0.1)


def test_the_output_goes_back_in_transformers_layout():
    forward = attention_forward("naive")
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)  # GQA: kv heads unrepeated
    out, weights = forward(torch.nn.Module(), q, k, k, None)
    expected = registry.get("causal", "naive").fn(q, k, k, causal=True)
    assert weights is None and out.shape == (2, 5, 4, 8)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_a_one_token_step_without_a_mask_sees_the_whole_cache():
    forward = attention_forward("memory_efficient")
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 9, 8)
    out, _ = forward(torch.nn.Module(), q, k, k, None)
    expected = registry.get("decode", "naive").fn(q, k, k, causal=False)
    torch.testing.assert_close(out, expected.transpose(1, 2))


@pytest.mark.parametrize("name", [n for n in registry.names("multi_head") if n in EXACT_CPU])
def test_an_additive_mask_at_the_dtype_limit_computes_what_the_reference_computes(name):
    """transformers' eager_mask is 0 / finfo.min: a fully padded row is a uniform average, not zeros."""
    from harness.variants import VARIANTS

    spec = VARIANTS["multi_head"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    keep = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    keep[..., 0, :] = False  # a row with no key at all (a left-padded position)
    keep[..., 3, 4:] = False
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    from harness.variants import Inputs

    inputs = Inputs((q, k, v), {"mask": mask})
    reference = spec.reference(inputs)
    out = inputs.call(registry.get("multi_head", name).fn)
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["memory_efficient", "sdpa"])
def test_the_llm_task_agrees_with_eager_on_both_families(name):
    outcome = llm.evaluate(name, TINY)
    assert outcome["status"] == "ok" and outcome["accurate"], outcome.get("reason")
    values = {m["metric"]: m["value"] for m in outcome["task_metrics"]}
    for family in ("llama", "mistral"):
        assert values[f"{family}.max_logit_err"] <= next(
            m["baseline"] for m in outcome["task_metrics"] if m["metric"] == f"{family}.max_logit_err"
        )
        assert values[f"{family}.token_agreement"] == 1.0
        assert values[f"{family}.prefill_time_vs_eager"] > 0 and 0 < values[f"{family}.attention_share"] < 1


def test_a_compiling_implementation_is_unavailable_with_the_reason():
    outcome = llm.evaluate("flex", TINY)
    assert outcome["status"] == "skipped" and "recompile" in outcome["reason"]


def test_without_transformers_the_task_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(llm, "unavailable_reason", lambda: "transformers is not installed")
    assert llm.evaluate("naive", TINY) == {"status": "skipped", "reason": "transformers is not installed"}


def test_a_task_option_the_task_does_not_take_is_an_input_error():
    from harness.errors import InputError
    from harness.suite import parse_text

    text = "name: t\ntasks: [llm]\ntask_options:\n  llm: {prompt_length: 10}\n"
    with pytest.raises(InputError, match="task 'llm' has no option 'prompt_length' \\(did you mean 'prompt_len'\\?\\)"):
        parse_text(text, "t.yaml")
    with pytest.raises(InputError, match="not among the suite's tasks"):
        parse_text("name: t\ntasks: [chatbot]\ntask_options:\n  llm: {dtype: float32}\n", "t.yaml")


@pytest.mark.slow
def test_the_llm_verb_runs_a_users_config_and_writes_a_report(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from harness.results import read_records

    config = dict(llm.FAMILIES["llama"], num_hidden_layers=1)
    (tmp_path / "my-model.json").write_text(json.dumps(config))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "llm",
            "--config",
            str(tmp_path / "my-model.json"),
            "--only",
            "naive",
            "memory_efficient",
            "--prompt-len",
            "16",
            "--new-tokens",
            "3",
            "--out",
            str(tmp_path / "run"),
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "llm: my-model" in done.stdout and (tmp_path / "run" / "report.html").exists()
    records = read_records(tmp_path / "run")
    assert {r.implementation for r in records} == {"naive", "memory_efficient"}
    assert {r.metric for r in records} >= {"my-model.max_logit_err", "my-model.token_agreement"}
    assert all(r.status == "ok" and r.accurate for r in records)
    bad = subprocess.run(
        [sys.executable, "-m", "harness", "llm", "--config", str(tmp_path / "missing.json")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no such config file" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", ["naive", "memory_efficient"])
def test_gemma2s_soft_capped_scores_match_eager(name):
    """Gemma 2 passes softcap= to its backend: a kernel that soft-caps gets it, and matches eager."""
    (backend,) = register(name)
    config = llm.load_config("gemma2")
    eager, mine = (llm._model(config, attn, torch.float32, 0) for attn in ("eager", backend))
    ids, mask = llm._inputs(config, llm.DEFAULTS | TINY)
    real = mask.bool()
    want, got = llm._logits(eager, ids, mask), llm._logits(mine, ids, mask)
    assert (want - got)[real].abs().max() < 1e-4
    # ... and ignoring the cap would be seen: it changes this model's logits
    uncapped = llm.load_config("gemma2")
    uncapped.attn_logit_softcapping = None
    plain = llm._model(uncapped, "eager", torch.float32, 0)
    assert (want - llm._logits(plain, ids, mask))[real].abs().max() > 1e-3
