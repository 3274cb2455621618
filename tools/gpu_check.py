"""The GPU checks in one command, for a machine with an NVIDIA GPU.

1. Timing: the harness's CUDA timing against triton.testing on the same kernels and inputs,
   interleaved over rounds in one process: `events` mode against `do_bench`, `cudagraph` mode
   against `do_bench_cudagraph`. The medians must agree within 5% at N=1024 and 4096.
2. Throughput: TFLOP/s of every available implementation at multi_head B=4, H=16, N=4096, D=128
   (bfloat16, the shape of flash-attention's published H100 benchmarks); pass --published-tflops
   with the figure you compare sdpa.flash against.
3. Memory: the harness's CUDA peak against what each kernel must allocate: naive holds B*H*N^2
   scores twice (scores and softmax), so its peak / (B*H*N^2*itemsize) must lie in [2, 4); O(N)
   kernels must grow by less than 2.5x when N doubles, naive by more than 3.5x.
4. Decode: GB/s of every decode implementation at B=64, 32 query heads over 8 kv heads, D=128,
   one new token against an 8k cache (bfloat16), as a share of the measured copy bandwidth; pass
   --published-decode-gbps with the figure to set beside it (FA3's paged decode: about 1800 on H100).

An implementation that fails is a row with its reason, and the check goes on. With --reference,
the reference sweeps follow (suites/self_attn_cuda.yaml, then multi_head, causal, training (fwd, bwd,
fwd_bwd), decode and masks (windows 256/1024/4096, 1-16 packed documents: triton against flex and the
SDPA backends) and paged decode (page sizes 16/64/256, ragged lengths to 32k: triton against
memory_efficient, flash_attn and FlashInfer) in bfloat16) into results/reference/<gpu>-<date>/, with
this check's output beside them. Exit 0 when every check passes, 1 when one fails, 2 without a CUDA
device (or triton).

    python tools/gpu_check.py [--rounds 3] [--published-tflops 335] [--published-decode-gbps 1800] [--reference]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

O_N = ("sdpa.flash", "sdpa.efficient", "sdpa.cudnn", "memory_efficient", "flash_attn", "xformers", "flex", "triton")
REFERENCE_SUITES = (
    "suites/self_attn_cuda.yaml",
    "suites/multi_head_cuda.yaml",
    "suites/causal_cuda.yaml",
    "suites/training_cuda.yaml",
    "suites/decode_cuda.yaml",
    "suites/masks_cuda.yaml",
    "suites/paged_cuda.yaml",
)


@dataclass
class Row:
    """One implementation's line of a check: its figures, or why it has none."""

    name: str
    value: Any = None
    error: str = ""


def each(names: Iterable[str], measure: Callable[[str], Any]) -> Iterator[Row]:
    """`measure(name)` for every name; an implementation that raises is a row with its reason."""
    from harness.errors import first_line

    for name in names:
        try:
            yield Row(name, measure(name))
        except Exception as exc:
            yield Row(name, error=f"{type(exc).__name__}: {first_line(exc, 160)}")


def _available(dtype: str, **case: Any) -> list[str]:
    from harness import registry

    return [i.name for i in registry.implementations("multi_head") if i.available("cuda", dtype, **case)[0]]


def _prepared(name: str, n: int, dtype: str, batch: int = 4, heads: int = 16, head_dim: int = 128):
    from harness.prepare import prepare
    from harness.shapes import Case, Params

    params = Params(batch=batch, heads=heads, seq_len=n, head_dim=head_dim, dtype=dtype, device="cuda")
    return prepare(Case("gpu_check", "multi_head", name, params))


def check_timing(rounds: int, dtype: str) -> bool:
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    from harness.timing import TimingSettings, time_cuda, time_cudagraph

    settings = TimingSettings(warmup=5, min_time_s=0.3, min_samples=20, max_time_s=3.0)
    ok = True
    modes = (
        ("events", time_cuda, lambda f: do_bench(f, warmup=25, rep=300, return_mode="median")),
        ("cudagraph", time_cudagraph, lambda f: do_bench_cudagraph(f, rep=300, return_mode="median")),
    )
    print(f"{'implementation':26s} {'N':>6s} {'mode':>9s} {'harness ms':>11s} {'triton ms':>10s} {'ratio':>6s}")
    for n in (1024, 4096):
        for mode, ours_timer, theirs_timer in modes:

            def measure(name: str, n: int = n, ours_timer=ours_timer, theirs_timer=theirs_timer) -> tuple:
                case = _prepared(name, n, dtype)
                ours, theirs = [], []
                with torch.inference_mode():
                    case.call()  # compile / autotune outside both timings
                    for _ in range(rounds):
                        ours.append(ours_timer(case.call, settings).median * 1e3)
                        theirs.append(theirs_timer(case.call))
                return statistics.median(ours), statistics.median(theirs)

            for row in each(_available(dtype, head_dim=128), measure):
                if row.error:
                    print(f"{row.name:26s} {n:6d} {mode:>9s}  failed: {row.error}")
                    continue
                ours, theirs = row.value
                ratio = ours / theirs
                bad = abs(ratio - 1) > 0.05
                ok &= not bad
                flag = "  <-- more than 5% apart" if bad else ""
                print(f"{row.name:26s} {n:6d} {mode:>9s} {ours:11.4f} {theirs:10.4f} {ratio:6.3f}{flag}")
    return ok


def report_tflops(dtype: str, published: float | None) -> None:
    import torch

    from harness.timing import TimingSettings, time_cuda

    settings = TimingSettings(warmup=5, min_time_s=0.5, min_samples=20, max_time_s=5.0)
    print(f"\nmulti_head {dtype} B=4 H=16 N=4096 D=128 on {torch.cuda.get_device_name()}")

    def measure(name: str) -> tuple[float, float]:
        case = _prepared(name, 4096, dtype)
        with torch.inference_mode():
            case.call()
            median = time_cuda(case.call, settings).median
        return median, case.flops / median / 1e12

    for row in each(_available(dtype, head_dim=128), measure):
        if row.error:
            print(f"  {row.name:26s} failed: {row.error}")
            continue
        median, tflops = row.value
        versus = (
            f"  ({tflops / published:.2f} of the published {published:g})"
            if published and row.name == "sdpa.flash"
            else ""
        )
        print(f"  {row.name:26s} {median * 1e3:9.3f} ms {tflops:8.1f} TFLOP/s{versus}")


def report_decode(dtype: str, published_gbps: float | None) -> None:
    import torch

    from harness import registry
    from harness.ceilings import ceilings_for
    from harness.prepare import prepare
    from harness.shapes import Case, Params
    from harness.timing import TimingSettings, time_cuda

    settings = TimingSettings(warmup=10, min_time_s=0.5, min_samples=50, max_time_s=5.0)
    params = Params(
        batch=64, heads=32, kv_heads=8, seq_len=1, seq_len_kv=8192, head_dim=128, dtype=dtype, device="cuda"
    )
    bandwidth = ceilings_for("cuda", None)[0].bandwidth / 1e9
    print(f"\ndecode {dtype} B=64 H=32/8 kv Nq=1 Nkv=8192 D=128 (measured copy bandwidth {bandwidth:.0f} GB/s)")

    def measure(name: str) -> tuple[float, float]:
        case = prepare(Case("gpu_check", "decode", name, params))
        with torch.inference_mode():
            case.call()
            median = time_cuda(case.call, settings).median
        return median, case.bytes_moved / median / 1e9

    names = [i.name for i in registry.implementations("decode") if i.available_for(params)[0]]
    for row in each(names, measure):
        if row.error:
            print(f"  {row.name:26s} failed: {row.error}")
            continue
        median, gbps = row.value
        versus = f", {gbps / published_gbps:.2f} of the published {published_gbps:g}" if published_gbps else ""
        print(f"  {row.name:26s} {median * 1e6:9.1f} us {gbps:8.0f} GB/s ({gbps / bandwidth:.0%} of copy{versus})")


def check_memory(dtype: str) -> bool:
    import torch

    from harness.memory import peak_cuda

    ok = True
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    peaks: dict[str, dict[int, int]] = {}
    for n in (2048, 4096):

        def measure(name: str, n: int = n) -> int:
            case = _prepared(name, n, dtype, batch=1, heads=8)
            with torch.inference_mode():
                case.call()
                return peak_cuda(case.call)

        for row in each(_available(dtype, head_dim=128), measure):
            if row.error:
                print(f"  {row.name:26s} N={n} failed: {row.error}")
            else:
                peaks.setdefault(row.name, {})[n] = row.value
        scores = 8 * n * n * itemsize
        if n in peaks.get("naive", {}):
            share = peaks["naive"][n] / scores
            good = 2 <= share < 4
            ok &= good
            print(
                f"naive N={n}: peak {peaks['naive'][n] / 2**20:.1f} MiB = {share:.2f} x scores{'' if good else '  <--'}"
            )
    for name, by_n in sorted(peaks.items()):
        if len(by_n) < 2:
            continue
        growth = by_n[4096] / max(1, by_n[2048])
        good = growth < 2.5 if name in O_N else (growth > 3.5 if name == "naive" else True)
        ok &= good
        print(
            f"  {name:26s} {by_n[2048] / 2**20:9.1f} -> {by_n[4096] / 2**20:9.1f} MiB (x{growth:.2f})"
            f"{'' if good else '  <--'}"
        )
    return ok


def reference_dir() -> Path:
    import torch

    gpu = torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "-")
    return ROOT / "results" / "reference" / f"{gpu}-{datetime.now(timezone.utc):%Y-%m-%d}"


def run_reference(out: Path) -> int:
    """The reference sweeps, each into its own run folder under `out` (records, env.json, report)."""
    worst = 0
    for suite in REFERENCE_SUITES:
        name = Path(suite).stem
        done = subprocess.run([sys.executable, "-m", "harness", "run", suite, "--out", str(out / name)], cwd=ROOT)
        worst = max(worst, done.returncode)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--published-tflops", type=float, help="the published sdpa/flash TFLOP/s for this GPU")
    parser.add_argument("--published-decode-gbps", type=float, help="a published decode GB/s for this GPU")
    parser.add_argument("--reference", action="store_true", help="then run the reference sweeps into results/reference")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("tools/gpu_check.py needs a CUDA device; this machine has none", file=sys.stderr)
        return 2
    try:
        import triton.testing  # noqa: F401
    except ImportError:
        print("tools/gpu_check.py needs triton (pip install -e '.[gpu]')", file=sys.stderr)
        return 2
    captured = io.StringIO()
    with contextlib.redirect_stdout(Tee(sys.stdout, captured)):
        timing_ok = check_timing(args.rounds, args.dtype)
        report_tflops(args.dtype, args.published_tflops)
        memory_ok = check_memory(args.dtype)
        report_decode(args.dtype, args.published_decode_gbps)
    code = 0 if timing_ok and memory_ok else 1
    if args.reference:
        out = reference_dir()
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.txt").write_text(captured.getvalue())
        code = max(code, run_reference(out))
        print(f"reference runs: {out}")
    return code


class Tee(io.TextIOBase):
    """Writes to several streams: the console and the copy kept beside the reference runs."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


if __name__ == "__main__":
    sys.exit(main())
