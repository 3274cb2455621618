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

They are cached in results/ceilings/<machine>-<device>-t<threads>.json: measured once per machine,
device and thread count (`python -m harness ceilings` measures again).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

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


def _time(fn, device: str) -> float:
    from harness.suite.schema import Timing
    from harness.timing import time_callable

    settings = Timing(warmup=2, min_time_s=0.3, min_samples=5, max_time_s=3.0, min_sample_time_s=0.0)
    return time_callable(fn, settings, device).median


def measure(device: str = "cpu", threads: int | None = None) -> Ceilings:
    """Measure the matmul and copy ceilings of `device` with `threads` CPU threads (see module doc)."""
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
            seconds = _time(lambda a=a, b=b: a @ b, device)
            result.flops[dtype] = 2.0 * n**3 / seconds
            result.method[f"matmul_{dtype}"] = f"{n}x{n} @ {n}x{n}, 2n^3 FLOP, median of timed calls"
        size = (1 << 30) if device.startswith("cuda") else (256 << 20)
        src = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        seconds = _time(lambda: dst.copy_(src), device)
        result.bandwidth = 2.0 * size / seconds
        result.method["bandwidth"] = f"copy of {size >> 20} MiB, bytes read + written, median of timed calls"
    return result


def save(ceilings: Ceilings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(ceilings), indent=2))
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
