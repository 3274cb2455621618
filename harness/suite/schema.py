"""The suite file's schema: what keys exist, their types and allowed values (pydantic, torch-free).

`Timing` is also the one timing model: harness.timing measures with it, the worker request
carries it, and its defaults are written here only.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from harness.errors import did_you_mean
from harness.shapes import AXES, DEFAULTS, PARAM_AXES, Axis, Params
from harness.worker import ALLOCATORS

Measure = Literal["time", "memory", "accuracy"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _value_type(declared: Axis) -> Any:
    """The pydantic type of one value of an axis, from its declaration."""
    if declared.kind is bool:
        value: Any = Annotated[bool, Field(strict=True)]
    elif declared.kind is int:
        value = Annotated[int, Field(strict=True, gt=declared.gt, le=declared.le)]
    elif declared.kind is float:  # an integer is a float here (softcap: 50), a boolean is not
        value = Annotated[float, Field(gt=declared.gt, le=declared.le), AfterValidator(_not_bool)]
    elif declared.choices:
        value = Literal[declared.choices]  # type: ignore[valid-type]
    else:
        value = str
    if declared.pattern:
        value = Annotated[value, AfterValidator(functools.partial(_match, declared))]
    return value | None if declared.optional else value


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


def _match(declared: Axis, value: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(declared.pattern, value):
        raise ValueError(f"unknown value {value!r}; allowed: {declared.allowed or declared.pattern}")
    return value


class _SweepBase(_Strict):
    """Axes of a sweep; every axis is a non-empty list and the cases are their product.

    `variants` narrows a sweep to some of the suite's variants (cross_attention's seq_len_kv, say,
    means nothing to the others); without it a sweep applies to all of them. The axes are the fields
    of `Params` (harness.shapes), each with its declared type and bounds.
    """

    variants: list[str] | None = Field(default=None, min_length=1)

    def size(self) -> int:
        return math.prod(len(getattr(self, axis)) for axis in PARAM_AXES)

    def points(self) -> Iterator[Params]:
        """The sweep's product, in the axes' declared order."""
        for values in itertools.product(*(getattr(self, axis) for axis in PARAM_AXES)):
            yield Params(**dict(zip(PARAM_AXES, values, strict=True)))


def _sweep_field(name: str, declared: Axis) -> tuple[Any, Any]:
    if declared.required:
        return list[_value_type(declared)], Field(min_length=1, description=declared.doc)
    return list[_value_type(declared)], Field(default=[DEFAULTS[name]], min_length=1, description=declared.doc)


Sweep = create_model(
    "Sweep", __base__=_SweepBase, **{name: _sweep_field(name, declared) for name, declared in AXES.items()}
)


class Timing(_Strict):
    """How long to measure each case (see harness.timing); the defaults every caller shares."""

    warmup: int = Field(default=2, ge=1, le=1000)
    min_time_s: float = Field(default=0.5, gt=0, le=600)
    min_samples: int = Field(default=5, ge=1, le=100_000)
    max_samples: int = Field(default=500, ge=1, le=1_000_000)
    max_time_s: float = Field(default=10.0, gt=0, le=3600)
    min_sample_time_s: float = Field(default=0.002, ge=0, le=10)
    flush_l2: bool = True
    # CUDA only: events (default), cudagraph or profiler (harness.timing); CPU cases time wall clock.
    mode: Literal["events", "cudagraph", "profiler"] = "events"
    # The workers' glibc allocator: `fixed` mmap/trim thresholds (repeatable samples), or `default` as a
    # user's own process has it; the regime moves some rankings by 10-25% (README, "Allocator").
    allocator: Literal[ALLOCATORS] = "fixed"  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _consistent(self) -> Timing:
        if self.max_samples < self.min_samples:
            raise ValueError(f"max_samples ({self.max_samples}) must be >= min_samples ({self.min_samples})")
        if self.max_time_s < self.min_time_s:
            raise ValueError(f"max_time_s ({self.max_time_s}) must be >= min_time_s ({self.min_time_s})")
        return self


class Limits(_Strict):
    """Per-case limits: a case past them is recorded as `timeout` or `oom` and the sweep goes on."""

    timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    memory_gib: float | None = Field(default=None, gt=0, le=1 << 20)

    @property
    def memory_bytes(self) -> int | None:
        return int(self.memory_gib * 2**30) if self.memory_gib else None


class Range(_Strict):
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def matches(self, value: Any) -> bool:
        if value is None:
            return False
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )


Scalar = str | int | float | bool | None
Condition = Range | list[Scalar] | Scalar


def _condition_type(declared: Axis) -> Any:
    """What an exclude rule may say of an axis: a value, a list of values, or (numbers) a range."""
    if declared.kind is bool:
        return bool | None
    if declared.kind is str:
        return list[str] | str | None
    return Condition


class _ExcludeBase(_Strict):
    """Cases matching every given key are skipped (and recorded as skipped, with the reason)."""

    variant: list[str] | str | None = None
    implementation: list[str] | str | None = None
    reason: str = ""

    def matches(self, variant: str, implementation: str, params: Params) -> bool:
        from harness.registry import name_matches

        values = params.as_dict() | {"variant": variant, "implementation": implementation}
        # A sweep's `kv_heads: 32` with 32 heads normalises to None (plain multi-head); a rule means the count.
        values["kv_heads"] = params.kv_head_count
        for key in ("variant", "implementation", *PARAM_AXES):
            want = getattr(self, key)
            if want is None:
                continue
            have = values[key]
            if key == "implementation":
                if not name_matches(have, [want] if isinstance(want, str) else want):
                    return False
            elif isinstance(want, Range):
                if not want.matches(have):
                    return False
            elif isinstance(want, list):
                if have not in want:
                    return False
            elif have != want:
                return False
        return True

    def describe(self) -> str:
        if self.reason:
            return self.reason
        parts = [f"{k}={v}" for k, v in self.model_dump(exclude_none=True, exclude={"reason"}).items()]
        return "excluded by the suite: " + ", ".join(parts)


ExcludeRule = create_model(
    "ExcludeRule",
    __base__=_ExcludeBase,
    **{name: (_condition_type(declared), None) for name, declared in AXES.items()},
)


class QuickOverrides(_Strict):
    """What `--quick` changes; without this block: seq_len <= 1024 (at most 3 sizes), short timing."""

    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    timing: dict[str, Any] = Field(default_factory=dict)


def _known(kind: str, names: list[str], allowed: Iterable[str]) -> list[str]:
    """Validator body: every name must be one of `allowed`; say which is closest when not."""
    allowed = list(allowed)
    for name in names:
        if name not in allowed:
            raise ValueError(
                f"unknown {kind} {name!r}{did_you_mean(name, allowed, inline=True)}; allowed: {', '.join(allowed)}"
            )
    return names


class Suite(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    variants: list[str] = Field(default_factory=list)
    implementations: Literal["all"] | list[str] = "all"
    sweep: Sweep | list[Sweep] | None = None
    tasks: list[str] = Field(default_factory=list)
    # Per task, its options (harness.tasks: only `llm` takes any): {llm: {families: [llama], dtype: bfloat16}}
    task_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    measure: list[Measure] = Field(default=["time", "memory", "accuracy"], min_length=1)
    timing: Timing = Timing()
    limits: Limits = Limits()
    exclude: list[ExcludeRule] = Field(default_factory=list)
    quick: QuickOverrides | None = None
    seed: int = Field(default=0, ge=0, le=2**31)

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        from harness.variants import VARIANTS

        return _known("variant", variants, VARIANTS)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from harness.tasks import TASKS

        return _known("task", tasks, TASKS)

    @model_validator(mode="after")
    def _known_task_options(self) -> Suite:
        from harness.tasks import task_defaults

        for task, options in self.task_options.items():
            if task not in self.tasks:
                raise ValueError(f"task_options names task {task!r}, which is not among the suite's tasks")
            allowed = task_defaults(task)
            for key in options:
                if key not in allowed:
                    raise ValueError(
                        f"task {task!r} has no option {key!r}{did_you_mean(key, allowed, inline=True)}; "
                        f"allowed: {', '.join(allowed) or 'none'}"
                    )
        return self

    @model_validator(mode="after")
    def _something_to_run(self) -> Suite:
        if not self.tasks and not (self.variants and self.sweep):
            raise ValueError("a suite needs `variants` and `sweep` (kernel cases), or `tasks` (task cases), or both")
        if self.variants and self.sweep is None:
            raise ValueError("`variants` needs a `sweep` of shapes to run them at")
        return self

    @model_validator(mode="after")
    def _sweep_variants(self) -> Suite:
        for sweep in self.sweeps:
            for variant in sweep.variants or []:
                if variant not in self.variants:
                    raise ValueError(
                        f"a sweep names variant {variant!r}, which is not among the suite's variants "
                        f"({', '.join(self.variants) or 'none'})"
                    )
        return self

    @property
    def sweeps(self) -> list[Sweep]:
        if self.sweep is None:
            return []
        return self.sweep if isinstance(self.sweep, list) else [self.sweep]

    def variants_of(self, sweep: Sweep) -> list[str]:
        """The suite's variants a sweep applies to, in the suite's order."""
        return [v for v in self.variants if sweep.variants is None or v in sweep.variants]


FIELD_NAMES = frozenset(
    name for model in (Suite, Sweep, Timing, Limits, ExcludeRule, Range, QuickOverrides) for name in model.model_fields
)
# The model each top-level key of a suite holds, to list the allowed keys inside it.
SECTIONS: dict[str, type[BaseModel]] = {
    "sweep": Sweep,
    "timing": Timing,
    "limits": Limits,
    "exclude": ExcludeRule,
    "quick": QuickOverrides,
}
