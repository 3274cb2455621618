"""The masks issue's targets, side by side in one process (README, "Score modifiers and packed documents").

Causal float32, B=1, H=8, D=64, N=8192 on this CPU: memory_efficient with window 512 against itself
without a window and against sdpa with the equivalent dense mask (its setup timed apart); the same
shape packed as 16 documents (seed 0) against one document. Implementations alternate in every round,
so a busy neighbour slows all of them alike; medians of the rounds are printed with each case's density.

    python tools/masks_benchmark.py [--seq-len 8192] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from harness.prepare import prepare
from harness.shapes import Case, Params
from harness.variants import VARIANTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = VARIANTS["causal"]
    base = spec.normalize(Params(batch=1, heads=8, seq_len=args.seq_len, head_dim=64))
    cases = {
        "memory_efficient, causal": (base, "memory_efficient"),
        f"memory_efficient, window {args.window}": (replace(base, window=args.window), "memory_efficient"),
        f"sdpa, window {args.window} (dense mask)": (replace(base, window=args.window), "sdpa"),
        "memory_efficient, 1 document": (replace(base, documents=1), "memory_efficient"),
        f"memory_efficient, {args.documents} documents": (replace(base, documents=args.documents), "memory_efficient"),
        f"sdpa, {args.documents} documents (dense mask)": (replace(base, documents=args.documents), "sdpa"),
    }
    prepared, times = {}, {}
    with torch.inference_mode():
        for label, (params, name) in cases.items():
            prepared[label] = prepare(Case("masks", "causal", name, params), seed=0)
            prepared[label].call()  # warm-up
            times[label] = []
        for _ in range(args.rounds):
            for label, case in prepared.items():
                started = time.perf_counter()
                case.call()
                times[label].append(time.perf_counter() - started)
    medians = {label: statistics.median(t) for label, t in times.items()}
    print(f"causal float32 B=1 H=8 D=64 N={args.seq_len}, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'case':<40} {'density':>8} {'time_s':>8} {'setup_s':>8} {'TFLOP/s':>8}")
    for label, case in prepared.items():
        params = cases[label][0]
        setup = f"{case.setup_s:.3f}" if case.setup_s is not None else "-"
        density = spec.density(params, seed=0)
        print(f"{label:<40} {density:8.4f} {medians[label]:8.3f} {setup:>8} {case.flops / medians[label] / 1e12:8.4f}")
    window, plain = medians[f"memory_efficient, window {args.window}"], medians["memory_efficient, causal"]
    sdpa = medians[f"sdpa, window {args.window} (dense mask)"]
    one, many = medians["memory_efficient, 1 document"], medians[f"memory_efficient, {args.documents} documents"]
    print(f"window {args.window}: {plain / window:.2f}x faster than no window (target >= 3x, stretch 5x); "
          f"{sdpa / window:.2f}x faster than sdpa with the mask (target >= 2x)")  # fmt: skip
    print(f"{args.documents} documents: {one / many:.2f}x faster than one document (target >= 3x)")


if __name__ == "__main__":
    main()
