"""Helpers the tests share (conftest holds the fixtures)."""

from __future__ import annotations

from typing import Any

from harness.timing import TimingStats


def timed(median: float | None = None, samples: list[float] | None = None) -> dict[str, Any]:
    """A record's `time_s` as the harness writes it, from samples (or one sample at `median`)."""
    values = list(samples) if samples is not None else [median]
    return TimingStats.from_samples(values, mode="wall").as_record()
