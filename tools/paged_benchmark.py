"""The paged-cache issue's CPU targets, side by side in one process (README, "Paged KV caches").

Decode float32, B=8 requests, 32 query heads over 8 kv heads of 128, one new token, ragged lengths up to
32k (seeded; the first request exactly 32k): memory_efficient and naive on one contiguous cache per
request and on paged caches of 16 and 256 tokens, GB/s counted as the bytes each must read (the pages
read when paged). First, what a page gather costs in eager PyTorch: index_select of every request's pages
into one contiguous copy. Implementations alternate in every round; medians are printed.

    python tools/paged_benchmark.py [--seq-len-kv 32768] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness.prepare import prepare
from harness.shapes import Case, Params
from harness.variants import VARIANTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len-kv", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = VARIANTS["decode"]
    base = spec.normalize(
        Params(batch=8, heads=32, kv_heads=8, head_dim=128, seq_len=1, seq_len_kv=args.seq_len_kv, ragged=True)
    )
    cases = {}
    for page in (None, 16, 256):
        for name in ("memory_efficient", "naive"):
            params = spec.normalize(Params(**{**base.as_dict(), "page_size": page}))
            cases[f"{name}, {'contiguous' if page is None else f'pages of {page}'}"] = (params, name)
    with torch.inference_mode():
        prepared = {label: prepare(Case("paged", "decode", name, p), seed=0) for label, (p, name) in cases.items()}
        pool = prepared["memory_efficient, pages of 16"].inputs
        gather_s = _gather_cost(pool)
        times: dict[str, list[float]] = {label: [] for label in prepared}
        for case in prepared.values():
            case.call()  # warm-up
        for _ in range(args.rounds):
            for label, case in prepared.items():
                started = time.perf_counter()
                case.call()
                times[label].append(time.perf_counter() - started)
    lens = pool.kwargs["cache_lens"].tolist()
    print(f"decode float32 B=8 H=32/8 D=128 Nq=1, cache lengths {lens}, {args.threads} threads")
    cache_gb = prepared["memory_efficient, pages of 16"].bytes_moved / 1e9
    rate = cache_gb / gather_s
    print(f"eager page gather (index_select of every page, P=16): {gather_s * 1e3:.1f} ms = {rate:.1f} GB/s")
    gbps = {}
    print(f"{'case':<34} {'time ms':>8} {'GB/s':>8}")
    for label, case in prepared.items():
        median = statistics.median(times[label])
        gbps[label] = case.bytes_moved / median / 1e9
        print(f"{label:<34} {median * 1e3:8.1f} {gbps[label]:8.2f}")
    own = gbps["memory_efficient, contiguous"]
    for page, target in ((16, 0.5), (256, 0.8)):
        mine, naive = gbps[f"memory_efficient, pages of {page}"], gbps[f"naive, pages of {page}"]
        print(
            f"pages of {page}: memory_efficient at {mine / own:.2f}x its contiguous GB/s (target >= {target}x), "
            f"{mine / naive:.1f}x naive's"
        )


def _gather_cost(inputs, rounds: int = 5) -> float:
    """Median seconds of gathering every request's pages (k and v) into contiguous copies."""
    _, k, v = inputs.args
    table, lens = inputs.kwargs["block_table"], inputs.kwargs["cache_lens"].tolist()
    page = k.shape[1]
    ids = torch.cat([table[b, : -(-n // page)] for b, n in enumerate(lens)])
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        k.index_select(0, ids), v.index_select(0, ids)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
