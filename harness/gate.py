"""The pull-request gate: two commits measured interleaved, case by case, then compared.

Each side runs in its own worker process on its own source tree (a temporary git worktree), with
this harness measuring both: the method of measuring is the same on both sides, only the kernels
differ. Per case, round 0 checks accuracy and memory; rounds 1..R time the sides in alternating
order (A B, B A, ...) on the same cores, so the machine's drift falls on both, and the verdict uses
the paired per-round ratios (harness.compare).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.compare import Comparison, compare_runs, markdown
from harness.errors import InputError
from harness.executors import measure_one, new_worker, request_for, worker_names
from harness.machine import environment, git
from harness.messages import CaseRequest
from harness.results import RESULTS_ROOT, Outcome, Record, RunFolder, Status, new_record
from harness.shapes import Case
from harness.suite import Suite, expand, load_suite
from harness.suite.schema import Timing

SIDES = ("base", "head")
MIN_ROUNDS = 6


def round_timing(timing: Timing, rounds: int) -> Timing:
    """Each round's share of the suite's timing budget (at least 3 samples and 20 ms a round)."""
    per_round = max(timing.min_time_s / rounds, 0.02)
    return timing.model_copy(
        update={
            "min_time_s": per_round,
            "max_time_s": max(timing.max_time_s / rounds, per_round),
            "min_samples": max(3, math.ceil(timing.min_samples / rounds)),
            "max_samples": max(3, math.ceil(timing.max_samples / rounds)),
        }
    )


def merge_rounds(first: Outcome, rounds: list[Outcome]) -> Outcome:
    """One side's outcome: the checks of round 0, all samples of the timing rounds, and their medians."""
    from harness.timing import TimingStats

    if first.status != Status.ok:
        return first
    bad = next((r for r in rounds if r.status != Status.ok), None)
    if bad is not None:
        return bad
    if not rounds:
        return first
    fields = first.fields
    samples = [s for r in rounds for s in r.fields["time_s"]["samples"]]
    timing = TimingStats.from_samples(samples, mode=rounds[0].fields["time_s"].get("mode", "events")).as_record()
    timing["round_medians"] = [r.fields["time_s"]["median"] for r in rounds]
    fields["time_s"] = timing
    one = rounds[0].fields
    for key in ("tflops", "tokens_per_s"):
        if one.get(key) is not None:
            fields[key] = one[key] * one["time_s"]["median"] / timing["median"]
    return Outcome(**fields)


def round_cpus(threads: int | None, round_index: int) -> list[int]:
    """The cores both sides of round `round_index` run on: the same for A and B, rotating per round."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not available:
        return []
    width = min(len(available), threads or len(available))
    start = (round_index * width) % len(available)
    return [available[(start + j) % len(available)] for j in range(width)]


@contextmanager
def worktrees(root: str, shas: dict[str, str | None]) -> Iterator[dict[str, str]]:
    """A source tree per side: a temporary git worktree of its commit, or the working tree (None)."""
    scratch = Path(tempfile.mkdtemp(prefix="harness-gate-"))
    trees: dict[str, str] = {}
    try:
        for side, sha in shas.items():
            if sha is None:
                trees[side] = root
            else:
                git("worktree", "add", "--detach", str(scratch / side), sha, repo=root)
                trees[side] = str(scratch / side)
        yield trees
    finally:
        for side in shas:
            if (scratch / side).exists():
                git("worktree", "remove", "--force", str(scratch / side), repo=root)
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class _Sides:
    """The two workers of a gate and what they have recorded."""

    suite: Suite
    workers: dict[str, Any]
    rounds: int

    def measure(self, case: Case) -> dict[str, Outcome]:
        """Both sides' outcomes for one case: checks first, then interleaved timing rounds."""
        request = request_for(case, self.suite)
        assert isinstance(request, CaseRequest)
        request = request.model_copy(update={"timing": round_timing(self.suite.timing, self.rounds)})
        checks = [m for m in self.suite.measure if m != "time"]
        first = {
            side: measure_one(
                self.workers[side], case, request.model_copy(update={"measure": checks}), self.suite.limits
            )
            for side in SIDES
        }
        per_round: dict[str, list[Outcome]] = {side: [] for side in SIDES}
        for i in range(self.rounds if "time" in self.suite.measure else 0):
            cpus = round_cpus(case.params.threads, i)
            timed = request.model_copy(update={"measure": ["time"], "fresh_inputs": True, "cpus": cpus})
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                if first[side].status == Status.ok:  # a side that failed is not measured again
                    per_round[side].append(measure_one(self.workers[side], case, timed, self.suite.limits))
        return {side: merge_rounds(first[side], per_round[side]) for side in SIDES}


def gate(
    suite_path: str,
    base_ref: str,
    head_ref: str | None = None,
    *,
    threshold: float = 0.05,
    rounds: int = 15,
    out_dir: str | None = None,
    repo: str = ".",
    progress: Any = None,
) -> tuple[list[Comparison], str]:
    """Measure `base_ref` and `head_ref` (default: the working tree) interleaved, then compare."""
    if rounds < MIN_ROUNDS:
        raise InputError(f"--rounds must be at least {MIN_ROUNDS} for a 95% paired interval, got {rounds}")
    root = git("rev-parse", "--show-toplevel", repo=repo)
    shas = {
        "base": git("rev-parse", "--verify", f"{base_ref}^{{commit}}", repo=root),
        "head": git("rev-parse", "--verify", f"{head_ref}^{{commit}}", repo=root) if head_ref else None,
    }
    with worktrees(root, shas) as trees:
        workers = {side: new_worker(tree) for side, tree in trees.items()}
        try:
            names: dict[str, list[str]] = {}
            for worker in workers.values():
                for variant, listed in worker_names(worker).items():
                    names[variant] = sorted(set(names.get(variant, [])) | set(listed))
            suite = load_suite(suite_path, known=names)
            cases = expand(suite, names=names)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            out = Path(out_dir) if out_dir else RESULTS_ROOT / f"gate-{suite.name}-{stamp}"
            commits = {side: sha or git("rev-parse", "HEAD", repo=root) for side, sha in shas.items()}
            records = _measure_sides(suite, cases, _Sides(suite, workers, rounds), out, commits, trees, progress)
        finally:
            for worker in workers.values():
                worker.stop()
    comparisons = compare_runs(records["base"], records["head"], threshold)
    (out / "comparison.md").write_text(markdown(comparisons, threshold))
    return comparisons, str(out)


def _measure_sides(
    suite: Suite,
    cases: list[Case],
    sides: _Sides,
    out: Path,
    commits: dict[str, str],
    trees: dict[str, str],
    progress: Any,
) -> dict[str, list[Record]]:
    """Every case on both sides, each side's records in its own run folder (out/base, out/head)."""
    folders = {side: RunFolder(out / side) for side in SIDES}
    records: dict[str, list[Record]] = {side: [] for side in SIDES}
    try:
        for side, folder in folders.items():
            folder.write_json(
                "env.json",
                environment(suite.timing.allocator)
                | {"suite": suite.name, "gate_side": side, "git_commit": commits[side], "source_tree": trees[side]},
            )
        if progress is not None:
            progress.start(cases, timing=suite.timing)
        for case in cases:
            if progress is not None:
                progress.case_started(case)
            outcomes = sides.measure(case)
            for side, outcome in outcomes.items():
                record = new_record(
                    suite.name, case.variant, case.implementation, case.case_id, case.params.as_dict(), **outcome.fields
                )
                folders[side].append(record)
                records[side].append(record)
            if progress is not None:
                progress.case_finished(case, records["head"][-1])
    finally:
        if progress is not None:
            progress.stop()
        for folder in folders.values():
            folder.close()
    return records
