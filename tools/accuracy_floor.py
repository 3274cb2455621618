"""Where the forward accuracy floor stands against real rounding (README, "Accuracy rule").

Runs the float32 decode sweep that once judged torch's SDPA inaccurate (B=2, 8 or 16 query heads over
2 or 1 kv heads, Nq 1 and 3, Nkv 4k/8k/12k, D 64 and 128) over several seeds and prints, per
implementation, how many cases the old floor (one eps) and the current one judge inaccurate, and the
largest error as a share of each tolerance.

    python tools/accuracy_floor.py [--seeds 4]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from harness import registry
from harness.accuracy import NAIVE_FACTOR, baseline, errors, floor
from harness.shapes import Params
from harness.variants import VARIANTS

IMPLEMENTATIONS = ("sdpa", "sdpa.math", "naive", "memory_efficient", "chunked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = VARIANTS["decode"]
    old_bad = dict.fromkeys(IMPLEMENTATIONS, 0)
    new_bad = dict.fromkeys(IMPLEMENTATIONS, 0)
    worst_old = dict.fromkeys(IMPLEMENTATIONS, 0.0)
    worst_new = dict.fromkeys(IMPLEMENTATIONS, 0.0)
    cases = 0
    for seed, (h, hk), nq, nkv, d in itertools.product(
        range(args.seeds), [(8, 2), (16, 1)], [1, 3], [4096, 8192, 12288], [64, 128]
    ):
        p = Params(batch=2, heads=h, kv_heads=hk, seq_len=nq, seq_len_kv=nkv, head_dim=d)
        inputs = spec.make_inputs(p, seed=seed)
        base = baseline(spec, inputs, registry.get("decode", "naive").fn)
        naive_err = errors(base.naive_output, base.reference).max_abs_err
        old_tol = NAIVE_FACTOR * naive_err + floor(torch.float32)
        cases += 1
        for name in IMPLEMENTATIONS:
            judged = base.judge(inputs.call(registry.get("decode", name).fn))
            old_bad[name] += judged.max_abs_err > old_tol
            new_bad[name] += not judged.accurate
            worst_old[name] = max(worst_old[name], judged.max_abs_err / old_tol)
            worst_new[name] = max(worst_new[name], judged.max_abs_err / judged.tolerance)
    print(f"{cases} float32 decode cases ({args.seeds} seeds)")
    print(
        f"{'implementation':18} {'inaccurate, old floor':>22} {'worst/old tol':>14} "
        f"{'inaccurate, now':>16} {'worst/tol':>10}"
    )
    for name in IMPLEMENTATIONS:
        print(f"{name:18} {old_bad[name]:>22} {worst_old[name]:>14.2f} {new_bad[name]:>16} {worst_new[name]:>10.3f}")


if __name__ == "__main__":
    main()
