"""Runs the cases of a suite in worker processes and writes one record per case as it ends.

A case that raises, runs past its timeout, exhausts memory or kills its worker becomes a record
with status error/timeout/oom/crash and a reason; the parent starts a fresh worker and the sweep
goes on. Records are flushed to disk one by one, so an interrupted run loses no finished case and
`--resume` runs only the missing ones.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import InputError
from harness.results import JSONL, RunFolder, case_key, environment, new_record, read_records, write_csv
from harness.suite import Case, Suite, expand

POLL_S = 0.05
STARTUP_TIMEOUT_S = 180.0
# A worker whose resident memory grew this much over its first case is replaced before the next
# case, so that a kernel that leaks cannot make the cases after it fail or measure differently.
LEAK_LIMIT_BYTES = 512 << 20

# glibc adapts its mmap threshold to the sizes a process has freed, so two processes running the
# same kernel can end in different regimes: one reusing heap pages, the other page-faulting fresh
# mmaps on every call (measured here: sdpa.math at N=1024, 12 ms in one worker, 23 ms in its twin).
# Fixing the thresholds puts every worker in the same regime; a user's own settings win.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _rss(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None or exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


class Worker:
    """One spawned worker process, replaced whenever a case kills it or must be stopped."""

    def __init__(self, tree: str | Path | None = None) -> None:
        self.tree = None if tree is None else str(Path(tree).resolve())
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._baseline_rss = 0

    def _start(self) -> dict | None:
        """Start a worker and wait until it is ready; a worker that dies on the way is a result."""
        from harness.worker import serve

        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=serve, args=(child, self.tree), daemon=True, name="harness-worker")
        added = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
        os.environ.update(added)  # the spawned interpreter inherits the environment at start
        try:
            self._proc.start()
        finally:
            for key in added:
                os.environ.pop(key, None)
        child.close()
        self._conn = parent
        if parent.poll(STARTUP_TIMEOUT_S):
            try:
                ready = parent.recv()
                self._baseline_rss = ready.get("rss", 0)
                return None
            except (EOFError, OSError):
                pass
        code = self._proc.exitcode
        self.stop(kill=True)
        return {"status": "crash", "reason": f"worker failed to start ({_signal_name(code)})"}

    def stop(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        if not kill and self._conn is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(5)
            except (OSError, BrokenPipeError):
                pass
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._baseline_rss = 0

    def _check_leak(self, result: dict) -> dict:
        rss = result.pop("worker_rss", 0) if isinstance(result, dict) else 0
        if rss and self._baseline_rss and rss - self._baseline_rss > LEAK_LIMIT_BYTES:
            grown = (rss - self._baseline_rss) / 2**20
            self.stop()
            note = (
                f"the worker held {grown:.0f} MiB more (malloc in use) after this case than when it started; "
                "worker replaced"
            )
            result = result | {"leak_note": note}
        return result

    def names(self) -> dict[str, list[str]]:
        """The implementations registered in this worker's source tree, per variant."""
        result = self.run({"kind": "names"}, timeout_s=120, memory_limit=None)
        if "status" in result:
            raise InputError(f"cannot list implementations in {self.tree or 'this tree'}: {result['reason']}")
        return result

    def run(self, task: dict, timeout_s: float, memory_limit: int | None) -> dict:
        if self._proc is None or not self._proc.is_alive():
            failed = self._start()
            if failed is not None:
                return failed
        self._conn.send(task)
        started = time.monotonic()
        peak = 0
        while True:
            if self._conn.poll(POLL_S):
                try:
                    result = self._conn.recv()
                except (EOFError, OSError):
                    pass  # the worker died while sending; fall through to the liveness check
                else:
                    return self._check_leak(result)
            if not self._proc.is_alive():
                code = self._proc.exitcode
                self.stop(kill=True)
                if code == -signal.SIGKILL:
                    return {"status": "oom", "reason": "worker killed by SIGKILL (most likely the OOM killer)"}
                return {"status": "crash", "reason": f"worker died with {_signal_name(code)}"}
            if time.monotonic() - started > timeout_s:
                self.stop(kill=True)
                return {"status": "timeout", "reason": f"still running after the {timeout_s:g} s limit"}
            if memory_limit:
                rss = _rss(self._proc.pid)
                peak = max(peak, rss)
                if rss > memory_limit:
                    self.stop(kill=True)
                    return {
                        "status": "oom",
                        "reason": f"worker memory reached {rss / 2**30:.2f} GiB, over the "
                        f"{memory_limit / 2**30:g} GiB limit",
                    }


def default_out_dir(suite: Suite, root: str | Path = "results") -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(root) / f"{suite.name}-{stamp}"


def skip_reason(case: Case) -> str:
    """Why a case cannot run on this machine at all (excluded, no such device), or ''.

    Whether the implementation has a kernel for the case's dtype is the worker's to say.
    """
    if case.skip_reason:
        return case.skip_reason
    device = case.params.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device on this machine"
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"{device} does not exist (this machine has {torch.cuda.device_count()} CUDA devices)"
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            return "no MPS device on this machine"
    return ""


@dataclass
class RunResult:
    out_dir: Path
    records: list[dict] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] in ("error", "timeout", "oom", "crash")]

    @property
    def inaccurate(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "ok" and r.get("accurate") is False]


TASK_CACHE = Path("results") / "task-cache"


def task_for(case: Case, suite: Suite) -> dict:
    if case.task:
        return {
            "kind": "task",
            "task": case.task,
            "variant": case.variant,
            "implementation": case.implementation,
            "cache_dir": str(TASK_CACHE),
            "threads": (suite.sweeps[0].threads[0] if suite.sweeps else None),
        }
    return {
        "variant": case.variant,
        "implementation": case.implementation,
        "params": case.params.as_dict(),
        "measure": list(suite.measure),
        "timing": suite.timing.model_dump(),
        "seed": suite.seed,
    }


def records_of(suite: str, case: Case, outcome: dict) -> list[dict]:
    """The records of one case: one, or for a task one per metric (DESIGN's task record keys)."""
    if not case.task:
        return [new_record(suite, case.variant, case.implementation, case.case_id, case.params.as_dict(), **outcome)]
    metrics = outcome.pop("task_metrics", None)
    common = {"task": case.task, "task_case": case.case_id}
    if not metrics:
        return [new_record(suite, case.variant, case.implementation, case.case_id, {}, **common, **outcome)]
    return [
        new_record(
            suite, case.variant, case.implementation, f"{case.case_id}/{m['metric']}", {}, **common, **outcome, **m
        )
        for m in metrics
    ]


def measure_cases(
    suite: Suite,
    cases: list[Case],
    emit: Callable[[Case, list[dict]], None],
    on_start: Callable[[Case], None] | None = None,
) -> None:
    """Measure `cases` one after another in a worker process, handing each case's records to `emit`."""
    memory_limit = int(suite.limits.memory_gib * 2**30) if suite.limits.memory_gib else None
    worker = Worker()
    interrupted = False
    try:
        for case in cases:
            if on_start is not None:
                on_start(case)
            why = skip_reason(case)
            if why:
                outcome: dict = {"status": "skipped", "reason": why}
            else:
                outcome = worker.run(task_for(case, suite), suite.limits.timeout_s, memory_limit)
            emit(case, records_of(suite.name, case, outcome))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        worker.stop(kill=interrupted)


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
    result = RunResult(out)
    with RunFolder(out) as folder:
        from harness.executors import merge_shards

        merge_shards(out, folder)  # records a distributed run's jobs wrote after its parent stopped
        done = {case_key(r): r for r in read_records(out)} if (out / JSONL).exists() else {}
        if resume is None or not (out / "env.json").exists():
            env = environment() | {
                "suite": suite.name,
                "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "pid": os.getpid(),
            }
            folder.write_json("env.json", env)
        folder.write_json("suite.json", suite.model_dump(mode="json"))
        result.records.extend(read_records(out) if done else [])
        todo = [c for c in cases if c.case_id not in done]
        if progress is not None:
            progress.start(len(todo), already=len(done))

        def emit(case: Case, records: list[dict]) -> None:
            for record in records:
                folder.append(record)
                result.records.append(record)
            if progress is not None and records:
                progress.case_finished(case, records[-1])

        try:
            if executor == "local":
                measure_cases(suite, todo, emit, on_start=progress.case_started if progress is not None else None)
            else:
                from harness.executors import run_distributed

                run_distributed(suite, todo, out, emit, executor=executor, workers=workers, options=options)
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            if progress is not None:
                progress.stop()
        write_csv(result.records, out / "results.csv")
    return result
