"""Check harness.timing against torch.utils.benchmark and measure its run-to-run spread.

For each kernel and size, in one process: the harness's median and Timer.blocked_autorange's
median, interleaved over several rounds (so drift falls on both), and the coefficient of variation
of the harness's median across those rounds. Prints a table; exits 1 when agreement is worse than
10% or CV is above 5% at N >= 1024.

    python tools/validate_timing.py [--rounds 5] [--sizes 256 1024 4096]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.utils.benchmark as tb

from harness import registry
from harness.timing import TimingSettings, time_cpu
from harness.variants import VARIANTS, Params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--impls", nargs="+", default=["sdpa", "memory_efficient", "naive"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = TimingSettings(warmup=2, min_time_s=0.5, min_samples=5, max_time_s=10)
    failed = False
    print(f"{'impl':18s} {'N':>5s} {'harness ms':>11s} {'torch ms':>9s} {'ratio':>6s} {'CV %':>5s}")
    for n in args.sizes:
        inputs = VARIANTS["multi_head"].make_inputs(Params(batch=1, heads=8, seq_len=n, head_dim=64))
        for name in args.impls:
            fn = registry.get("multi_head", name).fn

            def call(fn=fn, inputs=inputs):
                return inputs.call(fn)

            ours, theirs = [], []
            with torch.inference_mode():
                for _ in range(args.rounds):
                    ours.append(time_cpu(call, settings).median)
                    timer = tb.Timer("call()", globals={"call": call}, num_threads=args.threads)
                    theirs.append(timer.blocked_autorange(min_run_time=0.5).median)
            ratio = statistics.median(ours) / statistics.median(theirs)
            cv = statistics.stdev(ours) / statistics.fmean(ours) * 100
            bad = abs(ratio - 1) > 0.10 or (n >= 1024 and cv > 5)
            failed |= bad
            print(
                f"{name:18s} {n:5d} {statistics.median(ours) * 1e3:11.3f} {statistics.median(theirs) * 1e3:9.3f} "
                f"{ratio:6.3f} {cv:5.1f}{'  <-- out of bounds' if bad else ''}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
