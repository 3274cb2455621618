"""The five tasks the attention variants come from, each small enough to train on a CPU in a minute.

`run_task(name, implementation)` trains the task's model once (cached in the harness's cache folder),
evaluates it with `naive` and with `implementation` on the same weights, and returns the records'
task fields: metric, value, baseline, agreement with naive's predictions, and samples/s.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from harness.errors import unknown_name

TASKS: dict[str, str] = {
    "text_classification": "self_attention",
    "captioning": "multi_head",
    "segmentation": "attention_gate",
    "retrieval": "cross_attention",
    "chatbot": "causal",
    # Not one of the article's: every implementation inside a transformers model (harness.tasks.llm).
    "llm": "causal",
}
# The article's five tasks, one per variant (suites/tasks.yaml runs them).
ARTICLE_TASKS: tuple[str, ...] = ("text_classification", "captioning", "segmentation", "retrieval", "chatbot")
# The tasks that take options (a suite's `task_options`), declared with their defaults as the module's
# DEFAULTS; listed so that validating a suite imports no other task module (they import torch).
TASKS_WITH_OPTIONS = frozenset({"llm"})


def variant_of(task: str) -> str:
    if task not in TASKS:
        raise unknown_name("task", task, TASKS)
    return TASKS[task]


def task_defaults(task: str) -> dict:
    """The options `task` takes with their defaults ({} for a task that takes none)."""
    return dict(importlib.import_module(f"harness.tasks.{task}").DEFAULTS) if task in TASKS_WITH_OPTIONS else {}


def run_task(task: str, implementation: str, cache_dir: str | Path | None = None, options: dict | None = None) -> dict:
    """Evaluate one implementation on one task; the outcome the worker sends back."""
    import torch

    variant_of(task)
    module = importlib.import_module(f"harness.tasks.{task}")
    if hasattr(module, "evaluate"):  # a task that compares against its own reference (llm: eager)
        return module.evaluate(implementation, options)
    torch.manual_seed(0)
    evaluation, reference, info = module.run(implementation, cache_dir)
    same = evaluation.predictions == reference.predictions
    agreement = float(same.float().mean()) if same.numel() else 1.0
    return {
        "status": "ok",
        "reason": "",
        "task_metrics": [
            {
                "metric": m.name,
                "value": m.value,
                "baseline": m.baseline,
                "baseline_name": m.baseline_name,
                "naive_value": next(r.value for r in reference.metrics if r.name == m.name),
                "higher_is_better": m.higher_is_better,
            }
            for m in evaluation.metrics
        ],
        "agreement": agreement,
        "samples_per_s": evaluation.samples / evaluation.seconds if evaluation.seconds else None,
        # Generation tasks: tokens generated per second through the decode kernel (chatbot).
        "tokens_per_s": evaluation.extra.get("generated_tokens_per_s"),
        "eval_seconds": evaluation.seconds,
        "train_seconds": info.get("train_seconds"),
        "cached_weights": info.get("cached", False),
        "task_extra": evaluation.extra | {k: v for k, v in info.items() if k not in ("cached",)},
    }
