"""The worker pipe's messages: what the parent asks of a worker (typed, validated on both ends).

A worker answers a case or a task request with a `harness.results.Outcome`, and a names request with
the implementations its source tree registers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harness.cache import task_cache_dir
from harness.suite.schema import Timing


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CaseRequest(_Message):
    """Measure one kernel case in the worker."""

    kind: Literal["case"] = "case"
    variant: str
    implementation: str
    params: dict[str, Any]
    measure: list[str] = Field(default_factory=lambda: ["time", "memory", "accuracy"])
    timing: Timing = Timing()
    seed: int = 0
    # The gate pins both sides of a round to the same cores and asks for new allocations per round.
    cpus: list[int] = Field(default_factory=list)
    fresh_inputs: bool = False


class TaskRequest(_Message):
    """Evaluate one implementation on an application task (harness.tasks)."""

    kind: Literal["task"] = "task"
    task: str
    variant: str
    implementation: str
    cache_dir: str = Field(default_factory=lambda: str(task_cache_dir()))
    threads: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # the suite's task_options for this task


class NamesRequest(_Message):
    """The implementations registered in the worker's source tree, per variant."""

    kind: Literal["names"] = "names"


Request = CaseRequest | TaskRequest | NamesRequest
