"""Issue 8's GPU checks in one command, for a machine with an NVIDIA GPU.

1. Timing: the harness's CUDA timing (events, L2 flushed) against triton.testing.do_bench on the
   same kernels and inputs, interleaved over rounds in one process; the medians must agree within
   5%.
2. Throughput: TFLOP/s of every available implementation at multi_head B=4, H=16, N=4096, D=128
   (bfloat16, the shape of flash-attention's published H100 benchmarks); pass --published-tflops
   with the figure you compare sdpa.flash against (from the paper or vendor page for your GPU).
3. Memory: the harness's CUDA peak against what each kernel must allocate: naive holds B*H*N^2
   scores twice (scores and softmax), so its peak / (B*H*N^2*itemsize) must lie in [2, 4); O(N)
   kernels (sdpa.flash, sdpa.efficient, memory_efficient, flash_attn, xformers) must grow by less
   than 2.5x when N doubles, naive by more than 3.5x.

Exit 0 when every check passes, 1 when one fails, 2 without a CUDA device (or triton).

    python tools/gpu_check.py [--rounds 5] [--published-tflops 335]
Then keep a reference run:
    python -m harness run suites/self_attn_cuda.yaml --out results/reference/self_attn_cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from harness import registry
from harness.memory import peak_cuda
from harness.timing import TimingSettings, time_cuda
from harness.variants import VARIANTS, Params

O_N = ("sdpa.flash", "sdpa.efficient", "memory_efficient", "flash_attn", "xformers")


def _available(dtype: str, **case) -> list[str]:
    return [i.name for i in registry.implementations("multi_head") if i.available("cuda", dtype, **case)[0]]


def _inputs(n: int, dtype: str, batch: int = 4, heads: int = 16, head_dim: int = 128):
    params = Params(batch=batch, heads=heads, seq_len=n, head_dim=head_dim, dtype=dtype, device="cuda")
    return params, VARIANTS["multi_head"].make_inputs(params, seed=0)


def check_timing(rounds: int, dtype: str) -> bool:
    from triton.testing import do_bench

    ok = True
    settings = TimingSettings(warmup=5, min_time_s=0.3, min_samples=20, max_time_s=3.0)
    print(f"{'implementation':26s} {'N':>6s} {'harness ms':>11s} {'do_bench ms':>12s} {'ratio':>6s}")
    for n in (1024, 4096):
        _, inputs = _inputs(n, dtype)
        for name in _available(dtype, head_dim=128):
            fn = registry.get("multi_head", name).fn

            def call(fn=fn, inputs=inputs):
                return inputs.call(fn)

            ours, theirs = [], []
            with torch.inference_mode():
                call()  # compile / autotune outside both timings
                for _ in range(rounds):
                    ours.append(time_cuda(call, settings).median * 1e3)
                    theirs.append(do_bench(call, warmup=25, rep=300, return_mode="median"))
            ratio = statistics.median(ours) / statistics.median(theirs)
            bad = abs(ratio - 1) > 0.05
            ok &= not bad
            print(
                f"{name:26s} {n:6d} {statistics.median(ours):11.3f} {statistics.median(theirs):12.3f} "
                f"{ratio:6.3f}{'  <-- more than 5% apart' if bad else ''}"
            )
    return ok


def report_tflops(dtype: str, published: float | None) -> None:
    params, inputs = _inputs(4096, dtype)
    flops = VARIANTS["multi_head"].flops(params)
    settings = TimingSettings(warmup=5, min_time_s=0.5, min_samples=20, max_time_s=5.0)
    print(f"\nmulti_head {dtype} B=4 H=16 N=4096 D=128 on {torch.cuda.get_device_name()}")
    for name in _available(dtype, head_dim=128):
        fn = registry.get("multi_head", name).fn
        with torch.inference_mode():
            inputs.call(fn)
            median = time_cuda(lambda fn=fn: inputs.call(fn), settings).median
        tflops = flops / median / 1e12
        versus = (
            f"  ({tflops / published:.2f} of the published {published:g})" if published and name == "sdpa.flash" else ""
        )
        print(f"  {name:26s} {median * 1e3:9.3f} ms {tflops:8.1f} TFLOP/s{versus}")


def check_memory(dtype: str) -> bool:
    ok = True
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    peaks: dict[str, dict[int, int]] = {}
    for n in (2048, 4096):
        params, inputs = _inputs(n, dtype, batch=1, heads=8)
        for name in _available(dtype, head_dim=128):
            fn = registry.get("multi_head", name).fn
            with torch.inference_mode():
                inputs.call(fn)
                peaks.setdefault(name, {})[n] = peak_cuda(lambda fn=fn, inputs=inputs: inputs.call(fn))
        scores = params.batch * params.heads * n * n * itemsize
        if "naive" in peaks:
            share = peaks["naive"][n] / scores
            good = 2 <= share < 4
            ok &= good
            print(
                f"naive N={n}: peak {peaks['naive'][n] / 2**20:.1f} MiB = {share:.2f} x scores{'' if good else '  <--'}"
            )
    for name, by_n in sorted(peaks.items()):
        growth = by_n[4096] / max(1, by_n[2048])
        good = growth < 2.5 if name in O_N else (growth > 3.5 if name == "naive" else True)
        ok &= good
        flag = "" if good else "  <--"
        print(f"  {name:26s} {by_n[2048] / 2**20:9.1f} -> {by_n[4096] / 2**20:9.1f} MiB (x{growth:.2f}){flag}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--published-tflops", type=float, help="the published sdpa/flash TFLOP/s for this GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tools/gpu_check.py needs a CUDA device; this machine has none", file=sys.stderr)
        return 2
    try:
        import triton.testing  # noqa: F401
    except ImportError:
        print("tools/gpu_check.py needs triton (pip install -e '.[gpu]')", file=sys.stderr)
        return 2
    timing_ok = check_timing(args.rounds, args.dtype)
    report_tflops(args.dtype, args.published_tflops)
    memory_ok = check_memory(args.dtype)
    return 0 if timing_ok and memory_ok else 1


if __name__ == "__main__":
    sys.exit(main())
