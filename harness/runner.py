"""A run: its folder (lock, env.json, records, CSV), resume, progress, and the executor that measures.

Records are flushed to disk one by one as cases end, so an interrupted run loses no finished case
and `--resume` runs only the missing ones. How a case is measured is harness.case_runner's business;
where it runs (here, submitit jobs, Ray tasks) is the executor's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.ceilings import Ceilings, cache_path, ceilings_for, remeasure
from harness.errors import InputError
from harness.executors import make_executor, merge_shards
from harness.machine import environment, skip_reason
from harness.results import (
    JSONL,
    RESULTS_ROOT,
    Record,
    RunFolder,
    Status,
    case_key,
    read_records,
    write_csv,
)
from harness.roofline import attach
from harness.shapes import Case
from harness.suite import Suite, expand


def default_out_dir(suite: Suite, root: str | Path = RESULTS_ROOT) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(root) / f"{suite.name}-{stamp}"


@dataclass
class RunResult:
    out_dir: Path
    records: list[Record] = field(default_factory=list)
    interrupted: bool = False
    worker_starts: int | None = None  # local runs: worker processes started (1 unless cases crashed or leaked)

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r.failed]

    @property
    def inaccurate(self) -> list[Record]:
        return [r for r in self.records if r.status == Status.ok and r.accurate is False]


def _ceilings(suite: Suite, cases: list[Case], progress: Any) -> tuple[dict[tuple, Ceilings], dict[str, str]]:
    """The ceilings of every (device, threads) the cases time on, measured here on first use.

    Measured before any case and in this process, so they are never timed against a case; the
    files they come from go into env.json.
    """
    found: dict[tuple, Ceilings] = {}
    used: dict[str, str] = {}
    if "time" not in suite.measure:
        return found, used
    for device, threads in sorted({(c.params.device, c.params.threads) for c in cases if not c.task}, key=str):
        if all(skip_reason(c) for c in cases if (c.params.device, c.params.threads) == (device, threads)):
            continue
        label = f"{device}-t{threads or 'default'}"
        path = cache_path(device, threads)
        if not path.exists() and progress is not None:
            progress.console.print(f"measuring the ceilings of {device} with {threads or 'default'} threads (once)")
        try:
            found[(device, threads)], path = ceilings_for(device, threads)
            used[label] = str(path)
        except Exception as exc:  # no roofline is better than no run
            used[label] = f"not measured: {type(exc).__name__}: {exc}"
    return found, used


def run_suite(
    suite: Suite,
    out_dir: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    only: list[str] | None = None,
    progress: Any = None,
    executor: str = "local",
    workers: int = 2,
    options: dict[str, Any] | None = None,
) -> RunResult:
    """Run every case of `suite` not already recorded in the run folder; see module docstring.

    `executor` "local" measures here, one case at a time; "submitit" and "ray" spread shape groups
    over `workers` jobs or tasks (harness.executors) and merge their records here as they land.
    """
    if resume is not None:
        out = Path(resume)
        if not (out / JSONL).exists():
            raise InputError(f"--resume {out}: no {JSONL} there; nothing to resume")
    else:
        out = Path(out_dir) if out_dir is not None else default_out_dir(suite)
    cases = expand(suite, only)
    on_start = progress.case_started if progress is not None else None
    engine = make_executor(executor, suite, out, workers=workers, options=options, on_start=on_start)
    result = RunResult(out)
    with RunFolder(out) as folder:
        merge_shards(out, folder)  # records a distributed run's jobs wrote after its parent stopped
        done = {case_key(r): r for r in read_records(out)} if (out / JSONL).exists() else {}
        todo = [c for c in cases if c.case_id not in done]
        ceilings, used = _ceilings(suite, todo, progress)
        raised: set[tuple] = set()

        def _judge(record: Record, key: tuple) -> None:
            """The record's roofline; one that beats its ceiling has the ceiling measured again (once a run),
            since a ceiling cached in a busy moment is the likelier error than a kernel above the peak."""
            attach(record, ceilings.get(key))
            if record.roofline is None or record.roofline.note is None or key in raised:
                return
            raised.add(key)
            if progress is not None:
                progress.console.print(f"{record.case_id} beat the cached ceilings of {key[0]}: measuring them again")
            ceilings[key] = remeasure(ceilings[key], cache_path(*key))
            attach(record, ceilings[key])

        if resume is None or not (out / "env.json").exists():
            env = environment(suite.timing.allocator) | {
                "suite": suite.name,
                "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "pid": os.getpid(),
                "ceilings": used,
            }
            folder.write_json("env.json", env)
        folder.write_json("suite.json", suite.model_dump(mode="json"))
        result.records.extend(read_records(out) if done else [])
        if progress is not None:
            progress.start(todo, already=len(done), timing=suite.timing)

        def emit(case: Case, records: list[Record]) -> None:
            for record in records:
                if not case.task:
                    _judge(record, (case.params.device, case.params.threads))
                folder.append(record)
                result.records.append(record)
            if progress is not None and records:
                progress.case_finished(case, records[-1])

        try:
            engine.run(todo, emit)
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            result.worker_starts = getattr(engine, "worker_starts", None)
            if progress is not None:
                progress.stop()
        if raised:
            # Records written before a ceiling was raised were judged against the low one: judge them
            # again and rewrite the file whole.
            for record in result.records:
                key = (record.params.get("device"), record.params.get("threads"))
                if key in raised:
                    attach(record, ceilings[key])
            folder.rewrite(result.records)
        write_csv(result.records, out / "results.csv")
    return result
