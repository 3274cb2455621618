"""Per-case statistics between two runs, and the pull-request gate (interleaved A/B of two commits).

A verdict is only "slower" when the whole 95% confidence interval of the time ratio lies beyond
1 + threshold: we are confident the slow-down is at least the threshold, so noise alone cannot fail
a pull request (pyperf's "not significant" rather than an invented slow-down). A ratio beyond the
threshold whose interval excludes 1 but reaches below 1 + threshold is "possibly slower": shown,
not failing. The interval comes from the stored samples:
the sign-test interval of paired per-round ratios when both sides were measured in interleaved
rounds (the gate), or an independent bootstrap of the two sample sets otherwise (two separate runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.results import latest_records

FAILED = ("error", "timeout", "oom", "crash")
CONFIDENCE = 0.95
BOOTSTRAP = 4000

FASTER, SLOWER, NOISE, SMALL = "faster", "slower", "same within noise", "same within threshold"
MAYBE_SLOWER, MAYBE_FASTER = "possibly slower", "possibly faster"
NEW_FAILURE, INACCURATE, FIXED, ADDED, REMOVED, NOT_TIMED = (
    "newly fails",
    "became inaccurate",
    "fixed",
    "new case",
    "missing in new run",
    "not timed",
)
REGRESSIONS = (SLOWER, NEW_FAILURE, INACCURATE)


@dataclass(frozen=True)
class Comparison:
    case_id: str
    variant: str
    implementation: str
    verdict: str
    ratio: float | None = None  # new median / base median: > 1 is slower
    ci_low: float | None = None
    ci_high: float | None = None
    base_median: float | None = None
    new_median: float | None = None
    memory_ratio: float | None = None
    base_status: str = ""
    new_status: str = ""
    note: str = ""

    @property
    def regression(self) -> bool:
        return self.verdict in REGRESSIONS


def _bootstrap_ratio(base: np.ndarray, new: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile CI of median(new)/median(base) from independent resampling of both sides."""
    b = np.median(rng.choice(base, size=(BOOTSTRAP, base.size)), axis=1)
    n = np.median(rng.choice(new, size=(BOOTSTRAP, new.size)), axis=1)
    ratios = n / b
    alpha = (1 - CONFIDENCE) / 2
    return float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def _sign_test_rank(n: int, confidence: float = CONFIDENCE) -> int:
    """The k for which [x(k), x(n+1-k)] of n sorted values covers their median with `confidence`."""
    best = 1
    for k in range(1, n // 2 + 1):
        tail = sum(math.comb(n, i) for i in range(k)) / 2**n
        if 1 - 2 * tail >= confidence:
            best = k
    return best


def _paired_ratio(base: np.ndarray, new: np.ndarray) -> tuple[float, float, float]:
    """Median per-round ratio and its distribution-free (sign-test) interval.

    The rounds were measured back to back, so drift cancels within each pair; order statistics
    make the interval robust to a round that something else on the machine disturbed, which a
    t-interval on a handful of rounds is not (one outlier widens it enough to hide a 25% slow-down).
    """
    ratios = np.sort(new / base)
    k = _sign_test_rank(ratios.size)
    return float(np.median(ratios)), float(ratios[k - 1]), float(ratios[ratios.size - k])


def ratio_with_interval(base: dict, new: dict, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    base_t, new_t = base.get("time_s") or {}, new.get("time_s") or {}
    base_rounds, new_rounds = base_t.get("round_medians"), new_t.get("round_medians")
    if base_rounds and new_rounds and len(base_rounds) == len(new_rounds) and len(base_rounds) >= 6:
        return _paired_ratio(np.asarray(base_rounds, float), np.asarray(new_rounds, float))
    base_s = np.asarray(base_t.get("samples") or [base_t["median"]], float)
    new_s = np.asarray(new_t.get("samples") or [new_t["median"]], float)
    low, high = _bootstrap_ratio(base_s, new_s, rng)
    return float(np.median(new_s) / np.median(base_s)), low, high


def _timed(record: dict) -> bool:
    return record.get("status") == "ok" and bool((record.get("time_s") or {}).get("median"))


def compare_case(base: dict | None, new: dict | None, threshold: float = 0.05) -> Comparison:
    """The verdict for one case_id present in either run."""
    ref = new or base
    assert ref is not None
    common = {"case_id": ref["case_id"], "variant": ref["variant"], "implementation": ref["implementation"]}
    if base is None:
        return Comparison(**common, verdict=ADDED, new_status=new["status"])  # type: ignore[index]
    if new is None:
        return Comparison(**common, verdict=REMOVED, base_status=base["status"])
    statuses = {"base_status": base["status"], "new_status": new["status"]}
    if new["status"] in FAILED and base["status"] not in FAILED:
        return Comparison(**common, **statuses, verdict=NEW_FAILURE, note=str(new.get("reason", ""))[:200])
    if base["status"] in FAILED and new["status"] not in FAILED:
        return Comparison(**common, **statuses, verdict=FIXED)
    if new.get("accurate") is False and base.get("accurate") is not False:
        return Comparison(**common, **statuses, verdict=INACCURATE, note=str(new.get("reason", ""))[:200])
    memory = None
    if base.get("peak_memory_bytes") and new.get("peak_memory_bytes") is not None:
        memory = new["peak_memory_bytes"] / base["peak_memory_bytes"]
    if not (_timed(base) and _timed(new)):
        return Comparison(**common, **statuses, verdict=NOT_TIMED, memory_ratio=memory)
    ratio, low, high = ratio_with_interval(base, new)
    if low <= 1.0 <= high:
        verdict = NOISE
    elif low > 1 + threshold:
        verdict = SLOWER
    elif high < 1 / (1 + threshold):
        verdict = FASTER
    elif ratio > 1 + threshold:
        verdict = MAYBE_SLOWER
    elif ratio < 1 / (1 + threshold):
        verdict = MAYBE_FASTER
    else:
        verdict = SMALL
    return Comparison(
        **common,
        **statuses,
        verdict=verdict,
        ratio=ratio,
        ci_low=low,
        ci_high=high,
        base_median=base["time_s"]["median"],
        new_median=new["time_s"]["median"],
        memory_ratio=memory,
    )


def compare_runs(base: list[dict], new: list[dict], threshold: float = 0.05) -> list[Comparison]:
    base_by_id = {r["case_id"]: r for r in latest_records(base)}
    new_by_id = {r["case_id"]: r for r in latest_records(new)}
    ids = list(dict.fromkeys([*base_by_id, *new_by_id]))
    results = [compare_case(base_by_id.get(i), new_by_id.get(i), threshold) for i in ids]
    verdicts = [*REGRESSIONS, MAYBE_SLOWER, FASTER, FIXED, MAYBE_FASTER, SMALL, NOISE, ADDED, REMOVED, NOT_TIMED]
    order = {v: i for i, v in enumerate(verdicts)}
    return sorted(results, key=lambda c: (order.get(c.verdict, 99), c.case_id))


def _pct(ratio: float | None) -> str:
    return "" if ratio is None or math.isnan(ratio) else f"{(ratio - 1) * 100:+.1f}%"


def _ci(c: Comparison) -> str:
    return "" if c.ci_low is None else f"[{_pct(c.ci_low)}, {_pct(c.ci_high)}]"


def markdown(comparisons: list[Comparison], threshold: float, title: str = "Attention harness benchmark") -> str:
    """A pull-request comment: the verdict first, regressions and improvements, then the rest folded."""
    regressions = [c for c in comparisons if c.regression]
    head = "❌ regression" if regressions else "✅ no regression"
    lines = [
        f"### {title}: {head}",
        "",
        f"{len(comparisons)} cases · threshold {threshold:.0%} · {CONFIDENCE:.0%} confidence intervals · "
        "time change is new/base median − 1",
        "",
    ]
    header = ["| verdict | case | time change | 95% CI | memory change | note |", "|---|---|---|---|---|---|"]

    def row(c: Comparison) -> str:
        note = c.note.replace("|", "\\|").replace("\n", " ")
        return f"| {c.verdict} | `{c.case_id}` | {_pct(c.ratio)} | {_ci(c)} | {_pct(c.memory_ratio)} | {note} |"

    notable = [c for c in comparisons if c.regression or c.verdict in (MAYBE_SLOWER, FASTER, FIXED)]
    if notable:
        lines += header + [row(c) for c in notable] + [""]
    rest = [c for c in comparisons if c not in notable]
    if rest:
        lines += [
            "<details><summary>all other cases</summary>",
            "",
            *header,
            *[row(c) for c in rest],
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def table(comparisons: list[Comparison]):
    from rich.table import Table

    style = {
        SLOWER: "red",
        NEW_FAILURE: "red",
        INACCURATE: "red",
        MAYBE_SLOWER: "yellow",
        FASTER: "green",
        FIXED: "green",
        NOISE: "dim",
    }
    t = Table(title="compare (new vs base)", title_justify="left")
    for column in ("verdict", "case", "time change", "95% CI", "base ms", "new ms", "memory change"):
        t.add_column(column, justify="left" if column in ("verdict", "case") else "right")
    for c in comparisons:
        s = style.get(c.verdict, "")
        t.add_row(
            f"[{s}]{c.verdict}[/{s}]" if s else c.verdict,
            c.case_id,
            _pct(c.ratio),
            _ci(c),
            "" if c.base_median is None else f"{c.base_median * 1e3:.3f}",
            "" if c.new_median is None else f"{c.new_median * 1e3:.3f}",
            _pct(c.memory_ratio),
        )
    return t


# ----------------------------------------------------------------------------- the gate


def _git(repo: str, *args: str) -> str:
    import subprocess

    from harness.errors import InputError

    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise InputError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _round_timing(suite, rounds: int) -> dict:
    t = suite.timing
    per_round = max(t.min_time_s / rounds, 0.02)
    return t.model_dump() | {
        "min_time_s": per_round,
        "max_time_s": max(t.max_time_s / rounds, per_round),
        "min_samples": max(3, math.ceil(t.min_samples / rounds)),
        "max_samples": max(3, math.ceil(t.max_samples / rounds)),
    }


def _merge_rounds(first: dict, rounds: list[dict]) -> dict:
    """One record's outcome: the checks of round 0, all samples of the timing rounds, and their medians."""
    from harness.timing import TimingStats

    if first.get("status") != "ok":
        return first
    bad = next((r for r in rounds if r.get("status") != "ok"), None)
    if bad is not None:
        return bad
    merged = dict(first)
    if not rounds:
        return merged
    samples = [s for r in rounds for s in r["time_s"]["samples"]]
    timing = TimingStats.from_samples(samples).as_record()
    timing["round_medians"] = [r["time_s"]["median"] for r in rounds]
    merged["time_s"] = timing
    for key in ("tflops", "tokens_per_s"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            merged[key] = values[0] * rounds[0]["time_s"]["median"] / timing["median"]
    return merged


def _round_cpus(threads: int | None, round_index: int) -> list[int]:
    """The cores both sides of round `round_index` run on: the same for A and B, rotating per round."""
    import os

    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not available:
        return []
    width = min(len(available), threads or len(available))
    start = (round_index * width) % len(available)
    return [available[(start + j) % len(available)] for j in range(width)]


def gate(
    suite_path: str,
    base_ref: str,
    head_ref: str | None = None,
    *,
    threshold: float = 0.05,
    rounds: int = 15,
    out_dir: str | None = None,
    repo: str = ".",
    progress=None,
) -> tuple[list[Comparison], str]:
    """Measure `base_ref` and `head_ref` (default: the working tree) interleaved, then compare.

    Each side runs in its own worker process on its own source tree (a temporary git worktree),
    with this harness measuring both. Per case the rounds go A B, B A, A B, ... so the machine's
    drift falls on both sides, and the verdict uses the paired per-round ratios.
    """
    import shutil
    import tempfile
    from datetime import datetime, timezone
    from pathlib import Path

    from harness.errors import InputError
    from harness.results import RunFolder, environment, new_record
    from harness.runner import Worker, skip_reason, task_for
    from harness.suite import expand, load_suite

    if rounds < 6:
        raise InputError(f"--rounds must be at least 6 for a 95% paired interval, got {rounds}")
    root = _git(repo, "rev-parse", "--show-toplevel")
    base_sha = _git(root, "rev-parse", "--verify", f"{base_ref}^{{commit}}")
    head_sha = _git(root, "rev-parse", "--verify", f"{head_ref}^{{commit}}") if head_ref else None
    scratch = Path(tempfile.mkdtemp(prefix="harness-gate-"))
    trees: dict[str, str] = {}
    workers: dict[str, Worker] = {}
    try:
        for side, sha in (("base", base_sha), ("head", head_sha)):
            if sha is None:
                trees[side] = root
                continue
            _git(root, "worktree", "add", "--detach", str(scratch / side), sha)
            trees[side] = str(scratch / side)
        workers = {side: Worker(tree=tree) for side, tree in trees.items()}
        names: dict[str, list[str]] = {}
        for worker in workers.values():
            for variant, listed in worker.names().items():
                names[variant] = sorted(set(names.get(variant, [])) | set(listed))
        suite = load_suite(suite_path, known=names)
        cases = expand(suite, names=names)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = Path(out_dir) if out_dir else Path("results") / f"gate-{suite.name}-{stamp}"
        memory_limit = int(suite.limits.memory_gib * 2**30) if suite.limits.memory_gib else None
        timing = _round_timing(suite, rounds)
        folders = {side: RunFolder(out / side) for side in workers}
        records: dict[str, list[dict]] = {side: [] for side in workers}
        try:
            for side, folder in folders.items():
                sha = base_sha if side == "base" else (head_sha or _git(root, "rev-parse", "HEAD"))
                folder.write_json(
                    "env.json",
                    environment()
                    | {"suite": suite.name, "gate_side": side, "git_commit": sha, "source_tree": trees[side]},
                )
            if progress is not None:
                progress.start(len(cases))
            for case in cases:
                if progress is not None:
                    progress.case_started(case)
                why = skip_reason(case)
                outcomes: dict[str, dict] = {}
                if why:
                    outcomes = {side: {"status": "skipped", "reason": why} for side in workers}
                else:
                    task = task_for(case, suite) | {"timing": timing}
                    # Round 0 checks accuracy and memory; rounds 1..R time, in alternating order.
                    checks = [m for m in suite.measure if m != "time"]
                    first = {
                        side: workers[side].run(task | {"measure": checks}, suite.limits.timeout_s, memory_limit)
                        for side in ("base", "head")
                    }
                    per_round: dict[str, list[dict]] = {side: [] for side in workers}
                    timed = "time" in suite.measure
                    for i in range(rounds if timed else 0):
                        order = ("base", "head") if i % 2 == 0 else ("head", "base")
                        cpus = _round_cpus(case.params.threads, i)
                        for side in order:
                            if first[side].get("status") != "ok":
                                continue  # a side that failed is not measured again
                            round_task = task | {"measure": ["time"], "fresh_inputs": True, "cpus": cpus}
                            per_round[side].append(workers[side].run(round_task, suite.limits.timeout_s, memory_limit))
                    outcomes = {side: _merge_rounds(first[side], per_round[side]) for side in workers}
                for side, outcome in outcomes.items():
                    record = new_record(
                        suite.name, case.variant, case.implementation, case.case_id, case.params.as_dict(), **outcome
                    )
                    folders[side].append(record)
                    records[side].append(record)
                if progress is not None:
                    progress.case_finished(
                        case,
                        new_record(suite.name, case.variant, case.implementation, case.case_id, {}, **outcomes["head"]),
                    )
        finally:
            if progress is not None:
                progress.stop()
            for folder in folders.values():
                folder.close()
        comparisons = compare_runs(records["base"], records["head"], threshold)
        (out / "comparison.md").write_text(markdown(comparisons, threshold))
        return comparisons, str(out)
    finally:
        for worker in workers.values():
            worker.stop()
        for side in ("base", "head"):
            if (scratch / side).exists():
                _git(root, "worktree", "remove", "--force", str(scratch / side))
        shutil.rmtree(scratch, ignore_errors=True)
