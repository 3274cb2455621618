"""The suite file's schema: what keys exist, their types and allowed values (pydantic, torch-free).

`Timing` is also the one timing model: harness.timing measures with it, the worker request
carries it, and its defaults are written here only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.errors import did_you_mean
from harness.shapes import PARAM_AXES, Params

DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")

Positive = Annotated[int, Field(strict=True, gt=0, le=1 << 24)]
DType = Literal["float32", "bfloat16", "float16", "float64"]
Measure = Literal["time", "memory", "accuracy"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sweep(_Strict):
    """Axes of a sweep; every axis is a non-empty list and the cases are their product.

    `variants` narrows a sweep to some of the suite's variants (cross_attention's seq_len_kv, say,
    means nothing to the others); without it a sweep applies to all of them.
    """

    variants: list[str] | None = Field(default=None, min_length=1)
    batch: list[Positive] = Field(default=[1], min_length=1)
    heads: list[Positive] = Field(default=[1], min_length=1)
    kv_heads: list[Positive | None] = Field(default=[None], min_length=1)
    seq_len: list[Positive] = Field(min_length=1)
    seq_len_kv: list[Positive | None] = Field(default=[None], min_length=1)
    head_dim: list[Positive] = Field(default=[64], min_length=1)
    dtype: list[DType] = Field(default=["float32"], min_length=1)
    device: list[str] = Field(default=["cpu"], min_length=1)
    threads: list[Annotated[int, Field(strict=True, gt=0, le=1024)] | None] = Field(default=[None], min_length=1)
    causal: list[Annotated[bool, Field(strict=True)]] = Field(default=[False], min_length=1)
    direction: list[Literal["fwd", "bwd", "fwd_bwd"]] = Field(default=["fwd"], min_length=1)

    @field_validator("device")
    @classmethod
    def _known_devices(cls, devices: list[str]) -> list[str]:
        for device in devices:
            if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
                raise ValueError(f"unknown device {device!r}; allowed: cpu, cuda, cuda:N, mps")
        return devices

    def size(self) -> int:
        return math.prod(len(getattr(self, axis)) for axis in PARAM_AXES)


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


class ExcludeRule(_Strict):
    """Cases matching every given key are skipped (and recorded as skipped, with the reason)."""

    variant: list[str] | str | None = None
    implementation: list[str] | str | None = None
    batch: Condition = None
    heads: Condition = None
    kv_heads: Condition = None
    seq_len: Condition = None
    seq_len_kv: Condition = None
    head_dim: Condition = None
    dtype: list[str] | str | None = None
    device: list[str] | str | None = None
    threads: Condition = None
    causal: bool | None = None
    direction: list[str] | str | None = None
    reason: str = ""

    def matches(self, variant: str, implementation: str, params: Params) -> bool:
        from harness.suite.expand import name_matches

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
