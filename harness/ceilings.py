"""What this machine can do, measured: dense matmul throughput per dtype and memory bandwidth.

Every record's roofline is computed against these (harness.roofline). They are measured, not taken
from a datasheet, because what a kernel can reach is what the machine delivers with this torch and
these threads: a 2-core VM's "peak" is nowhere near its CPU model's, and a GPU's depends on its
clocks and power limit.

* matmul: a square GEMM (`a @ b`, n = 4096 on CUDA; on a CPU the largest of 512…2048 whose call
  takes at least 20 ms), 2n³ FLOP a call, the median of repeated calls after warm-up, timed the way
  the harness times kernels (harness.timing).
* bandwidth: a device-to-device copy of a buffer far larger than the caches (256 MiB on a CPU,
  1 GiB on CUDA), counting the bytes read plus the bytes written.

Each is the best of TRIALS interleaved trials, and a run that sees a record beat a ceiling (an
impossible fraction) measures again and keeps the higher value (runner), so a busy moment cannot
leave a ceiling too low. They are cached in the harness's cache folder (harness.cache):
ceilings/<machine>-<device>-t<threads>.json, measured once per machine, device and thread count
(`python -m harness ceilings` measures again).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.cache import ceilings_dir
from harness.machine import cpu_name

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Ceilings:
    """Peak FLOP/s per dtype and peak bytes/s of one device at one thread count."""

    machine: str
    device: str
    threads: int | None
    flops: dict[str, float] = field(default_factory=dict)  # FLOP/s per dtype
    bandwidth: float = 0.0  # bytes/s, read + written
    method: dict[str, str] = field(default_factory=dict)
    measured_utc: str = ""
    torch: str = ""

    def peak_flops(self, dtype: str) -> float | None:
        return self.flops.get(dtype)


def machine_name(device: str) -> str:
    """The device's model: the GPU's name on CUDA, the CPU's model name otherwise."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_name(index)
    return cpu_name()


def cache_path(device: str, threads: int | None, root: Path | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine_name(device)).strip("-").lower()
    return Path(root or ceilings_dir()) / f"{slug}-{device.replace(':', '')}-t{threads or 'default'}.json"


# A ceiling is the best the machine can do, so a busy moment must not lower it: each is measured in
# this many interleaved trials and the fastest trial's median kept. A pip install beside a first run
# once cached 66.8 GFLOP/s where a quiet run of the same machine gave 177.8, and every record after it
# claimed 2x its roofline.
TRIALS = 3


def _time(fn, device: str) -> float:
    from harness.suite.schema import Timing
    from harness.timing import time_callable

    settings = Timing(warmup=2, min_time_s=0.2, min_samples=5, max_time_s=2.0, min_sample_time_s=0.0)
    return time_callable(fn, settings, device).median


def measure(device: str = "cpu", threads: int | None = None, trials: int = TRIALS) -> Ceilings:
    """Measure the matmul and copy ceilings of `device` with `threads` CPU threads (see module doc): the
    best of `trials` interleaved trials of each."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    result = Ceilings(
        machine=machine_name(device),
        device=device,
        threads=threads,
        measured_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
    )
    work: dict[str, tuple[Any, float]] = {}  # what each ceiling times, and the work of one call
    with torch.inference_mode():
        for dtype in DTYPES:
            torch_type = getattr(torch, dtype)
            n = 4096 if device.startswith("cuda") else 512
            while True:
                a = torch.randn(n, n, device=device).to(torch_type)
                b = torch.randn(n, n, device=device).to(torch_type)
                a @ b  # the first call pays for set-up; the size is chosen by the second
                started = time.perf_counter()
                a @ b
                if device.startswith("cuda") or time.perf_counter() - started >= 0.02 or n >= 2048:
                    break
                n *= 2
            work[dtype] = (lambda a=a, b=b: a @ b), 2.0 * n**3
            result.method[f"matmul_{dtype}"] = f"{n}x{n} @ {n}x{n}, 2n^3 FLOP, best of {trials} trials' medians"
        size = (1 << 30) if device.startswith("cuda") else (256 << 20)
        src = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        work["bandwidth"] = (lambda: dst.copy_(src)), 2.0 * size
        result.method["bandwidth"] = f"copy of {size >> 20} MiB, bytes read + written, best of {trials} trials' medians"
        best = {key: math.inf for key in work}
        for _ in range(trials):  # interleaved: a busy moment falls on one trial of each, not on every trial of one
            for key, (fn, _amount) in work.items():
                best[key] = min(best[key], _time(fn, device))
    result.flops = {dtype: work[dtype][1] / best[dtype] for dtype in DTYPES}
    result.bandwidth = work["bandwidth"][1] / best["bandwidth"]
    return result


def raised(old: Ceilings, new: Ceilings) -> Ceilings:
    """The higher of two measurements of each ceiling: a ceiling only ever goes up."""
    merged = Ceilings(**asdict(new))
    merged.flops = {d: max(old.flops.get(d, 0.0), new.flops.get(d, 0.0)) for d in {*old.flops, *new.flops}}
    merged.bandwidth = max(old.bandwidth, new.bandwidth)
    return merged


def remeasure(old: Ceilings, path: Path) -> Ceilings:
    """Measure again because a record beat `old` (an impossible fraction): keep the higher of each and
    save them where `old` came from."""
    merged = raised(old, measure(old.device, old.threads))
    save(merged, path)
    return merged


def save(ceilings: Ceilings, path: Path) -> Path:
    from harness.results import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(asdict(ceilings), indent=2))
    return path


def load(path: Path) -> Ceilings | None:
    try:
        data = json.loads(Path(path).read_text())
        return Ceilings(**data)
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def ceilings_for(
    device: str, threads: int | None, root: Path | None = None, refresh: bool = False
) -> tuple[Ceilings, Path]:
    """The cached ceilings of this machine's `device` at `threads`, measured first when there are none."""
    path = cache_path(device, threads, root)
    cached = None if refresh else load(path)
    if cached is not None:
        return cached, path
    return (result := measure(device, threads)), save(result, path)


def cross_check(ceilings: Ceilings) -> dict[str, float]:
    """The same GEMMs and copy timed by torch.utils.benchmark (blocked_autorange), for comparison."""
    import torch
    from torch.utils.benchmark import Timer

    device, out = ceilings.device, {}
    if ceilings.threads:
        torch.set_num_threads(ceilings.threads)
    with torch.inference_mode():
        for dtype in ceilings.flops:
            n = int(ceilings.method[f"matmul_{dtype}"].split("x")[0])
            a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
            timer = Timer("a @ b", globals={"a": a, "b": a.clone()}, num_threads=ceilings.threads or 1)
            out[f"matmul_{dtype}"] = 2.0 * n**3 / timer.blocked_autorange(min_run_time=0.5).median
        size = (1 << 30) if device.startswith("cuda") else (256 << 20)
        src = torch.ones(size // 4, device=device)
        timer = Timer("d.copy_(s)", globals={"d": torch.empty_like(src), "s": src}, num_threads=ceilings.threads or 1)
        out["bandwidth"] = 2.0 * size / timer.blocked_autorange(min_run_time=0.5).median
    return out
