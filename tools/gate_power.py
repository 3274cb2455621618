"""How often the gate raises a false alarm (A/A) and how often it catches a real slow-down, on real timings.

This is a benchmark, not a test: on a shared machine a neighbour's load can disturb any one run, so
the figures belong in a report with the machine they came from. It builds a throw-away git repository
whose only kernel spins for a fixed fraction of its own time (the slow-down is a constant in the
source, as a pull request would change it), then gates base against base and base against the slow
commit, REPEATS times each.

    python tools/gate_power.py [--repeats 5] [--slowdown 0.25] [--rounds 15]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KERNEL = '''
import time

import torch

from harness import register

SLOWDOWN = {slowdown}


@register("tunable", variants=("multi_head",))
def tunable(q, k, v, *, causal=False, scale=None, mask=None):
    """SDPA, then a spin for SLOWDOWN times its own duration."""
    start = time.perf_counter()
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    deadline = start + (time.perf_counter() - start) * (1 + SLOWDOWN)
    while time.perf_counter() < deadline:
        pass
    return out
'''

SUITE = textwrap.dedent("""\
    name: gate-power
    variants: [multi_head]
    implementations: [tunable]
    sweep: {batch: [1], heads: [4], seq_len: [256], head_dim: [64], threads: [1]}
    measure: [time]
    timing: {warmup: 1, min_time_s: 0.35, min_samples: 14, max_time_s: 2, min_sample_time_s: 0}
    """)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, slowdown: float) -> str:
    (repo / "implementations" / "tunable.py").write_text(KERNEL.format(slowdown=slowdown))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", f"slowdown {slowdown}")
    return _git(repo, "rev-parse", "HEAD")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slowdown", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    from harness.compare import SLOWER
    from harness.gate import gate

    with tempfile.TemporaryDirectory(prefix="gate-power-") as scratch:
        repo = Path(scratch) / "repo"
        (repo / "implementations").mkdir(parents=True)
        (repo / "implementations" / "__init__.py").write_text("")
        (repo / "suite.yaml").write_text(SUITE)
        _git(repo, "init", "-q")
        _git(repo, "config", "user.email", "t@example.com")
        _git(repo, "config", "user.name", "t")
        base, slow = _commit(repo, 0.0), _commit(repo, args.slowdown)
        rows = []
        for label, head in (("A/A", base), (f"A/B +{args.slowdown:.0%}", slow)):
            for i in range(args.repeats):
                started = time.perf_counter()
                (c,), _ = gate(
                    str(repo / "suite.yaml"),
                    base,
                    head,
                    repo=str(repo),
                    out_dir=str(Path(scratch) / f"{label[:3]}-{i}"),
                    rounds=args.rounds,
                )
                rows.append((label, c, time.perf_counter() - started))
                print(
                    f"{label:12s} run {i + 1}: {c.verdict:24s} ratio {c.ratio:.3f} "
                    f"CI [{c.ci_low:.3f}, {c.ci_high:.3f}]  {rows[-1][2]:.0f} s",
                    flush=True,
                )
    false_alarms = sum(c.regression for label, c, _ in rows if label == "A/A")
    caught = sum(c.verdict == SLOWER for label, c, _ in rows if label != "A/A")
    print(f"false alarms: {false_alarms}/{args.repeats}; slow-downs caught: {caught}/{args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
