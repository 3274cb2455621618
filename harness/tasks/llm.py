"""Task `llm`: every implementation inside a Hugging Face transformers model, against `eager`.

A kernel benchmark says which kernel is fastest on a shape; this says what a kernel does to a model:
the same logits and the same generated tokens under the model's real masks (left padding, GQA, a
sliding window, a KV cache), and how much of the model's prefill and decode time it changes.

For each model family (built from a config with random weights: nothing is downloaded), on the same
weights and inputs, in one process:

* **logit error** at real (unpadded) positions against the model run in float64 (transformers' SDPA
  path: its eager one turns padded rows into NaN in float64), judged
  by the harness's accuracy rule with transformers' own `sdpa` in the role of naive;
* **greedy agreement** over `new_tokens` steps, teacher-forced on eager's tokens (so one flip does not
  change every later step), with the smallest top-1/top-2 logit gap of eager's beside it: a flip where
  that gap is below the logit tolerance is a near-tie, reported as such, not a failure;
* **prefill and decode time** as ratios to `eager` (prefill: the prompt with use_cache=False; decode:
  a loop of one-token steps over the cache, not generate()'s overhead), interleaved rounds;
* **attention's share** of a prefill step (the time inside the backend's calls over the step's; the
  calls are also `harness.attention` ranges in a user's torch.profiler traces), so a 2x kernel that
  moves the model by 5% says so.

Compiling implementations (`flex`, `compiled.*`) would recompile on every decode step of a growing
cache, so they are unavailable here with that reason.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any

MIN_TRANSFORMERS = "5.0"
# The families the task builds when no config is given: a Llama-style GQA model, and a Mistral-style
# one whose sliding window is shorter than the prompt (transformers' sliding_window = W lets a query
# see W keys, itself included: the harness's window W - 1). Small enough for seconds on a CPU.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
    },
    "mistral": {
        "model_type": "mistral",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
        "sliding_window": 24,
    },
    # Gemma 2: soft-capped scores (attn_logit_softcapping: 50 in the released models; a randomly initialised
    # tiny model's scores are ~0.01, so 0.05 here is what makes the cap change them), alternating
    # sliding-window and full layers. Not in the default
    # families: sdpa and the flash kernels cannot soft-cap, so it is a model to ask for by name.
    "gemma2": {
        "model_type": "gemma2",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
        "sliding_window": 24,
        "attn_logit_softcapping": 0.05,
    },
}
DEFAULTS: dict[str, Any] = {
    "families": ["llama", "mistral"],
    "config": None,  # a config.json of the user's: run that model instead of the families
    "dtype": "float32",
    "batch": 2,
    "prompt_len": 48,
    "left_pad": 5,  # the last row is left-padded by this many tokens
    "new_tokens": 8,
    "rounds": 3,
    "seed": 0,
}


def unavailable_reason() -> str:
    """Why the task cannot run here ('' when it can): transformers missing or too old."""
    try:
        import transformers
    except ImportError:
        return f"transformers is not installed (pip install -e '.[transformers]', >= {MIN_TRANSFORMERS})"
    major = int(transformers.__version__.split(".")[0])
    if major < int(MIN_TRANSFORMERS.split(".")[0]):
        return f"transformers {transformers.__version__} has no AttentionInterface; >= {MIN_TRANSFORMERS} needed"
    return ""


def load_config(source: str | dict[str, Any]) -> Any:
    """A transformers config from a family name, a dict of config keys, or a config.json path."""
    from transformers import AutoConfig

    if isinstance(source, str) and source in FAMILIES:
        data = dict(FAMILIES[source])
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{source}: the config has no model_type (llama, mistral, qwen2, ...)")
    data.pop("architectures", None)
    return AutoConfig.for_model(model_type, **data)


def _inputs(config: Any, options: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(options["seed"])
    batch, length = options["batch"], options["prompt_len"]
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and options["left_pad"]:
        mask[-1, : options["left_pad"]] = 0  # left padding, as a batch of prompts of different lengths has
    return ids, mask


def _model(config: Any, attn: str, dtype: Any, seed: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # the same random weights for every backend
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.to(dtype).eval()


def _logits(model: Any, ids: Any, mask: Any) -> Any:
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _step(model: Any, ids: Any, mask: Any, cache: Any = None) -> tuple[Any, Any]:
    """One forward with a KV cache: (last-position logits in float32, the cache). transformers renamed
    `past_key_values` to `cache` (5.x), so whichever the model takes is used."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits[:, -1].float(), getattr(out, "cache", None) or out.past_key_values


def _teacher_forced(model: Any, ids: Any, mask: Any, tokens: list[Any]) -> list[Any]:
    """Last-position logits of the prompt and of each step fed `tokens` (eager's greedy choices)."""
    import torch

    out = []
    with torch.inference_mode():
        logits, cache = _step(model, ids, mask)
        out.append(logits)
        for token in tokens[:-1]:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = _step(model, token[:, None], mask, cache)
            out.append(logits)
    return out


def _greedy(model: Any, ids: Any, mask: Any, steps: int) -> tuple[list[Any], list[Any]]:
    """Eager's greedy tokens and its logits at each step."""
    import torch

    tokens, logits = [], []
    with torch.inference_mode():
        last, cache = _step(model, ids, mask)
        for i in range(steps):
            logits.append(last)
            tokens.append(last.argmax(dim=-1))
            if i + 1 == steps:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last, cache = _step(model, tokens[-1][:, None], mask, cache)
    return tokens, logits


def _prefill_s(model: Any, ids: Any, mask: Any) -> float:
    started = time.perf_counter()
    _logits(model, ids, mask)
    return time.perf_counter() - started


def _decode_s(model: Any, ids: Any, mask: Any, steps: int) -> float:
    """Seconds per one-token step over the cache (the prefill that fills it is not timed)."""
    import torch

    with torch.inference_mode():
        logits, cache = _step(model, ids, mask)
        started = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = _step(model, logits.argmax(dim=-1)[:, None], mask, cache)
        return (time.perf_counter() - started) / steps


def _attention_share(model: Any, ids: Any, mask: Any, rounds: int) -> float:
    """Attention's share of a prefill step: the time inside the backend's calls over the step's (the
    median of `rounds` steps)."""
    from harness.integrations.transformers import attention_clock

    shares = []
    for _ in range(rounds):
        with attention_clock() as clock:
            started = time.perf_counter()
            _logits(model, ids, mask)
            step = time.perf_counter() - started
        shares.append(clock.seconds / step)
    return statistics.median(shares)


def evaluate(implementation: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task outcome of one implementation: metrics per model family (see the module doc)."""
    import torch

    from harness import registry
    from harness.accuracy import tolerance
    from harness.integrations.transformers import register

    options = DEFAULTS | dict(options or {})
    why = unavailable_reason()
    if why:
        return {"status": "skipped", "reason": why}
    impl = registry.get("multi_head", implementation)
    if impl.compiles:
        return {
            "status": "skipped",
            "reason": f"{implementation} compiles per shape: a decode loop over a growing cache would recompile "
            "every step (a static cache is not wired yet)",
        }
    dtype = getattr(torch, options["dtype"])
    ok, why = impl.available("cpu", options["dtype"])
    if not ok:
        return {"status": "skipped", "reason": why}
    (backend,) = register(implementation) or [None]
    if backend is None:
        return {"status": "skipped", "reason": f"{implementation} is not available as a transformers backend"}
    sources = [options["config"]] if options["config"] else list(options["families"])
    metrics, extra = [], {}
    for source in sources:
        family = Path(str(source)).stem if options["config"] else str(source)
        config = load_config(source)
        ids, mask = _inputs(config, options)
        real = mask.bool()
        # transformers' eager in float64 turns a fully padded row into NaN (its float32 softmax meets a
        # finfo(float64).min mask as -inf), which then reaches every row through the values; its SDPA
        # path takes a boolean mask and stays finite.
        reference = _model(config, "sdpa", torch.float64, options["seed"])
        ref_logits = _logits(reference, ids, mask)
        del reference
        eager = _model(config, "eager", dtype, options["seed"])
        sdpa = _model(config, "sdpa", dtype, options["seed"])
        model = _model(config, backend, dtype, options["seed"])
        naive_err = (_logits(sdpa, ids, mask).double() - ref_logits)[real].abs().max().item()
        err = (_logits(model, ids, mask).double() - ref_logits)[real].abs().max().item()
        bound = tolerance(dtype, naive_err, magnitude=ref_logits[real].abs().max().item(), terms=1)

        tokens, eager_steps = _greedy(eager, ids, mask, options["new_tokens"])
        forced = _teacher_forced(model, ids, mask, tokens)
        flips, near_ties, gaps = 0, 0, []
        for want, theirs, mine in zip(tokens, eager_steps, forced, strict=True):
            top2 = theirs.topk(2, dim=-1).values
            gap = top2[:, 0] - top2[:, 1]
            gaps.append(float(gap.min()))
            differ = mine.argmax(dim=-1) != want
            flips += int(differ.sum())
            near_ties += int((differ & (gap < bound)).sum())
        total = len(tokens) * ids.shape[0]

        prefill = {"eager": [], "mine": []}
        decode = {"eager": [], "mine": []}
        for _ in range(options["rounds"]):  # interleaved: a busy moment falls on both sides
            for side, m in (("eager", eager), ("mine", model)):
                prefill[side].append(_prefill_s(m, ids, mask))
                decode[side].append(_decode_s(m, ids, mask, options["new_tokens"]))
        prefill_s = {side: statistics.median(times) for side, times in prefill.items()}
        decode_s = {side: statistics.median(times) for side, times in decode.items()}
        share = _attention_share(model, ids, mask, options["rounds"])

        metrics += [
            _metric(f"{family}.max_logit_err", err, bound, "tolerance", naive_err, higher_is_better=False),
            _metric(f"{family}.token_agreement", 1 - (flips - near_ties) / total, 1.0, "eager", None),
            _metric(
                f"{family}.prefill_time_vs_eager",
                prefill_s["mine"] / prefill_s["eager"],
                1.0,
                "eager",
                None,
                higher_is_better=False,
            ),
            _metric(
                f"{family}.decode_time_vs_eager",
                decode_s["mine"] / decode_s["eager"],
                1.0,
                "eager",
                None,
                higher_is_better=False,
            ),
            _metric(f"{family}.attention_share", share, None, None, None, higher_is_better=False),
        ]
        extra[family] = {
            "accurate": err <= bound,
            "flips": flips,
            "near_ties": near_ties,
            "tokens": total,
            "min_top2_gap": min(gaps),
            "prefill_s": prefill_s,
            "decode_step_s": decode_s,
            "config": {k: v for k, v in config.to_dict().items() if isinstance(v, int | float | str | bool)},
        }
        del eager, sdpa, model
    problems = []
    for family, e in extra.items():
        wrong = [] if e["accurate"] else ["logit error beyond the rule"]
        if e["flips"] > e["near_ties"]:
            wrong.append(f"{e['flips'] - e['near_ties']} token flips that are not near-ties")
        if wrong:
            problems.append(f"{family}: {', '.join(wrong)}")
    flat_agreement = [m["value"] for m in metrics if m["metric"].endswith("token_agreement")]
    return {
        "status": "ok",
        "reason": "; ".join(problems),
        "accurate": not problems,
        "task_metrics": metrics,
        "agreement": min(flat_agreement) if flat_agreement else None,
        "task_extra": {"families": extra, "backend": backend, "dtype": options["dtype"], "transformers": _version()},
    }


def _metric(
    name: str,
    value: float,
    baseline: float | None,
    baseline_name: str | None,
    naive: float | None,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    return {
        "metric": name,
        "value": value,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "naive_value": naive,
        "higher_is_better": higher_is_better,
    }


def _version() -> str:
    import transformers

    return transformers.__version__
