"""How one callable is timed, on CPU and on CUDA.

CPU: after warm-up, calls are grouped into samples that last at least `min_sample_time_s` (as
torch.utils.benchmark's blocked_autorange does, so timer resolution and loop overhead vanish for
microsecond kernels), and samples are taken until both a minimum measuring time and a minimum
sample count are reached (recorded as mode "wall"). CUDA, by `timing.mode`:

* `events` (default): one call per sample between CUDA events, the L2 cache flushed before each
  (triton's do_bench), every sample enqueued before one synchronisation so host time stays out;
* `cudagraph`: the call captured once in a CUDA graph and replayed (do_bench_cudagraph), for small
  and decode kernels whose launch costs as much as their work;
* `profiler`: the device time of the call's kernels from torch.profiler, nothing else.

A mode that cannot apply (CPU; a kernel that cannot be captured) is refused with its reason, never
replaced by another. The first (compiling, autotuning) calls are never timed.
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
    mode: str = "events"

    @classmethod
    def from_samples(cls, samples: list[float], calls_per_sample: int = 1, mode: str = "events") -> TimingStats:
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
            mode=mode,
        )

    def as_record(self) -> dict:
        return {
            "median": self.median,
            "iqr": self.iqr,
            "min": self.min,
            "mean": self.mean,
            "n": self.n,
            "calls_per_sample": self.calls_per_sample,
            "mode": self.mode,
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
            return TimingStats.from_samples(samples, calls, mode="wall")


def _iterations(one_s: float, settings: TimingSettings) -> int:
    """Calls to enqueue: enough for min_time_s and min_samples, within max_samples and max_time_s."""
    one_s = max(one_s, 1e-7)
    wanted = max(settings.min_samples, math.ceil(settings.min_time_s / one_s))
    return int(max(1, min(wanted, settings.max_samples, math.floor(settings.max_time_s / one_s) or 1)))


def _enqueue(run: Callable[[], object], flush: torch.Tensor | None, n: int) -> list[float]:
    """Seconds of each of `n` calls between CUDA events, all enqueued before one synchronisation.

    The queue never drains between samples (triton's do_bench does the same): while the GPU zeroes
    the flush buffer and runs the previous call, the host is already launching the next one, so the
    host's dispatch time (Python, guards, launch) stays outside the events whenever the GPU is busier
    than the host. Synchronising every few calls instead let host time land between the events of
    every call shorter than its launch (kernels of 8-50 µs measured 1-8x apart between two sweeps).
    """
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start, end in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()  # outside the events: the kernel is timed on a cold L2
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]


def _estimate(run: Callable[[], object], flush: torch.Tensor | None) -> float:
    """One call's time from a short synchronised burst, to size the enqueued loop (as do_bench)."""
    torch.cuda.synchronize()
    samples = _enqueue(run, flush, 5)
    return statistics.median(samples)


def time_cuda(fn: Callable[[], object], settings: TimingSettings, device: str = "cuda") -> TimingStats:
    """Time `fn` on a CUDA device with events, L2 flushed before every call, the queue kept full."""
    with torch.cuda.device(device):
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if settings.flush_l2 else None
        for _ in range(max(1, settings.warmup)):
            fn()
        n = _iterations(_estimate(fn, flush), settings)
        return TimingStats.from_samples(_enqueue(fn, flush, n), mode="events")


class CaptureError(RuntimeError):
    """The kernel cannot be captured in a CUDA graph (host synchronisation, data-dependent shapes, ...)."""


def time_cudagraph(fn: Callable[[], object], settings: TimingSettings, device: str = "cuda") -> TimingStats:
    """Time replays of `fn` captured in a CUDA graph: no launch overhead at all (do_bench_cudagraph).

    The L2 flush stays outside the graph, between replays, so each replay starts on a cold cache.
    """
    with torch.cuda.device(device):
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if settings.flush_l2 else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs its warm-up on a side stream
            for _ in range(max(1, settings.warmup)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as exc:
            raise CaptureError(f"cannot be captured in a CUDA graph: {type(exc).__name__}: {exc}") from exc
        n = _iterations(_estimate(graph.replay, flush), settings)
        return TimingStats.from_samples(_enqueue(graph.replay, flush, n), mode="cudagraph")


def time_profiler(fn: Callable[[], object], settings: TimingSettings, device: str = "cuda") -> TimingStats:
    """Kernel time only: the device time of the kernels `fn` launches, read from torch.profiler.

    Each call's kernels lie between two flush kernels on the GPU's timeline, so summing the device
    time between consecutive flushes gives one sample per call, host time excluded by construction.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.cuda.device(device):
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        for _ in range(max(1, settings.warmup)):
            fn()
        n = _iterations(_estimate(fn, flush), settings)
        with profile(activities=[ProfilerActivity.CUDA]) as marker:
            flush.zero_()
            torch.cuda.synchronize()
        flush_names = {e.name for e in marker.events() if e.device_type.name == "CUDA"}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _enqueue(fn, flush, n)
    kernels = sorted(
        (e for e in prof.events() if e.device_type.name == "CUDA" and e.name not in ("cudaDeviceSynchronize",)),
        key=lambda e: e.time_range.start,
    )
    samples: list[float] = []
    current: float | None = None
    for kernel in kernels:
        if kernel.name in flush_names:
            if current is not None:
                samples.append(current)
            current = 0.0
        elif current is not None:
            current += kernel.time_range.elapsed_us() / 1e6
    if current is not None:
        samples.append(current)
    if not samples:
        raise RuntimeError("the profiler recorded no kernels for this call")
    return TimingStats.from_samples(samples, mode="profiler")


MODES = ("events", "cudagraph", "profiler")


def mode_refusal(mode: str, device: str) -> str:
    """Why a timing mode cannot apply to a case on `device` ('' when it can); never replaced silently."""
    if mode != "events" and not str(device).startswith("cuda"):
        return f"timing mode {mode!r} needs a CUDA device; this case runs on {device} (use mode: events)"
    return ""


def time_callable(fn: Callable[[], object], settings: TimingSettings, device: str = "cpu") -> TimingStats:
    """Time `fn` on `device` in `settings.mode` (CPU: wall clock; see mode_refusal for what cannot apply)."""
    refusal = mode_refusal(settings.mode, device)
    if refusal:
        raise ValueError(refusal)
    if str(device).startswith("cuda"):
        timer = {"events": time_cuda, "cudagraph": time_cudagraph, "profiler": time_profiler}[settings.mode]
        return timer(fn, settings, device)
    return time_cpu(fn, settings)
