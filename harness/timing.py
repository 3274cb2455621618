"""How one callable is timed, on CPU and on CUDA.

CPU: after warm-up, calls are grouped into samples that last at least `min_sample_time_s` (as
torch.utils.benchmark's blocked_autorange does, so timer resolution and loop overhead vanish for
microsecond kernels), and samples are taken until both a minimum measuring time and a minimum
sample count are reached. CUDA: one call per sample between CUDA events, with the L2 cache
flushed before each (triton's do_bench), so kernels are not timed on a warm cache; the first
(compiling, autotuning) calls are never timed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.suite.schema import Timing

# triton.testing.do_bench flushes with a 256 MB buffer: larger than any current GPU's L2.
L2_FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class TimingStats:
    """Seconds per call: summary statistics and the raw per-call samples (kept for compare)."""

    median: float
    iqr: float
    min: float
    mean: float
    n: int
    samples: tuple[float, ...]
    calls_per_sample: int = 1

    @classmethod
    def from_samples(cls, samples: list[float], calls_per_sample: int = 1) -> TimingStats:
        if not samples:
            raise ValueError("no timing samples")
        if len(samples) >= 2:
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
            iqr = q3 - q1
        else:
            iqr = 0.0
        return cls(
            median=statistics.median(samples),
            iqr=iqr,
            min=min(samples),
            mean=statistics.fmean(samples),
            n=len(samples),
            samples=tuple(samples),
            calls_per_sample=calls_per_sample,
        )

    def as_record(self) -> dict:
        return {
            "median": self.median,
            "iqr": self.iqr,
            "min": self.min,
            "mean": self.mean,
            "n": self.n,
            "calls_per_sample": self.calls_per_sample,
            "samples": list(self.samples),
        }


# The one timing model: the suite schema's `timing` block, defaults included (harness.suite.schema).
TimingSettings = Timing


def _enough(n: int, elapsed: float, s: TimingSettings) -> bool:
    if n >= s.max_samples or elapsed >= s.max_time_s:
        return True
    return n >= s.min_samples and elapsed >= s.min_time_s


def time_cpu(fn: Callable[[], object], settings: TimingSettings) -> TimingStats:
    """Time `fn` on the CPU (see module docstring)."""
    last = 0.0
    for _ in range(max(1, settings.warmup)):
        start = time.perf_counter()
        fn()
        last = time.perf_counter() - start
    calls = max(1, math.ceil(settings.min_sample_time_s / last)) if last > 0 else 1
    samples: list[float] = []
    began = time.perf_counter()
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
        if _enough(len(samples), time.perf_counter() - began, settings):
            return TimingStats.from_samples(samples, calls)


def time_cuda(fn: Callable[[], object], settings: TimingSettings, device: str = "cuda") -> TimingStats:
    """Time `fn` on a CUDA device with events, flushing L2 before every call."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if settings.flush_l2 else None
    for _ in range(max(1, settings.warmup)):
        fn()
    torch.cuda.synchronize(device)
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    began = time.perf_counter()
    while True:
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
        # Synchronising every few samples bounds the queue without serialising every call.
        if len(events) % 10 == 0:
            torch.cuda.synchronize(device)
        if _enough(len(events), time.perf_counter() - began, settings):
            break
    torch.cuda.synchronize(device)
    return TimingStats.from_samples([s.elapsed_time(e) / 1e3 for s, e in events])


def time_callable(fn: Callable[[], object], settings: TimingSettings, device: str = "cpu") -> TimingStats:
    if str(device).startswith("cuda"):
        return time_cuda(fn, settings, device)
    return time_cpu(fn, settings)
