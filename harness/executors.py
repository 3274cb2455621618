"""Where cases run: here (`LocalExecutor`), or spread over GPUs and nodes by submitit (SLURM, or its
local executor) or Ray. Each is an object with `run(cases, emit)`; no scheduler of ours.

For the distributed ones, the parent splits the cases into shards of whole shape groups (every
implementation of one shape in one job, so that they share the float64 reference and are measured
side by side on one device) and balances the shards by FLOPs. Each shard is one submitit job or Ray
task: it measures its cases one at a time in the harness's own worker processes (so a crash, hang or
OOM is still a record) and hands each case's records on as the case ends — a submitit job through its
own shard file, a Ray task through a queue actor. The parent copies them into the run's results.jsonl
as they land; records a submitit job wrote after the parent stopped are merged by `--resume`.

One case per device at a time: a SLURM job asks for one GPU (gpus_per_node=1 by default when the
suite runs on CUDA) and runs its cases sequentially; submitit's local executor gets one GPU per job
(visible_gpus), or on a CPU machine a disjoint set of cores per job; a Ray task holds num_gpus=1.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import InputError, describe
from harness.machine import skip_reason
from harness.messages import CaseRequest, NamesRequest, TaskRequest
from harness.results import (
    JSONL,
    Outcome,
    Record,
    RunFolder,
    Status,
    as_record,
    case_key,
    jsonl_line,
    new_record,
    parse_records,
    read_records,
)
from harness.shapes import Case
from harness.suite.schema import Limits, Suite
from harness.worker import Worker

Emit = Callable[[Case, list[Record]], None]

CLUSTERS = ("local", "slurm")
SHARDS = "shards"
POLL_S = 0.5


def shard_cases(cases: list[Case], workers: int) -> list[list[Case]]:
    """At most `workers` shards of whole shape groups, balanced by FLOPs (longest group first)."""
    from harness.variants import get_variant

    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        key = (case.task, case.variant, case.params) if not case.task else (case.task, case.implementation)
        groups.setdefault(key, []).append(case)

    def cost(group: list[Case]) -> float:
        case = group[0]
        if case.task:
            return 1e12  # a task trains a small model: seconds, like a large kernel sweep point
        return get_variant(case.variant).flops(case.params) * len(group)

    shards: list[list[Case]] = [[] for _ in range(max(1, min(workers, len(groups))))]
    loads = [0.0] * len(shards)
    for group in sorted(groups.values(), key=cost, reverse=True):
        lightest = loads.index(min(loads))
        shards[lightest].extend(group)
        loads[lightest] += cost(group)
    return [s for s in shards if s]


def run_shard(
    suite: Suite,
    cases: list[Case],
    shard_file: str | None = None,
    cpus: list[int] | None = None,
    sink: Any = None,
) -> list[list[dict]]:
    """A job's body: measure `cases`, handing each case's records on as soon as the case ends.

    They go to `shard_file` (submitit: the run folder is on a shared filesystem) and/or `sink` (Ray:
    a queue actor, for nodes that share no filesystem); all of them are also returned.
    """
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)  # the job's worker processes inherit it
    made: list[list[dict]] = []
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(shard_file, "a", encoding="utf-8")) if shard_file else None

        def emit(case: Case, made_records: list[Record]) -> None:
            records = [record.as_dict() for record in made_records]
            made.append(records)
            if f is not None:
                # One write per case, so that the parent never reads half of a task's metric records.
                f.write("".join(jsonl_line(record) for record in made_records))
                f.flush()
                os.fsync(f.fileno())
            if sink is not None:
                sink.put(records)

        LocalExecutor(suite).run(cases, emit)
    return made


class _Tail:
    """Complete lines appended to a shard file since the last read (a line being written waits)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return parse_records(data[:end].splitlines())


def _by_case(records: list[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(case_key(record), []).append(record)
    return groups


def merge_shards(out: Path, folder: RunFolder) -> int:
    """Copy into results.jsonl the cases that shard files hold and it lacks (jobs that outlived their parent)."""
    shard_dir = Path(out) / SHARDS
    if not shard_dir.is_dir():
        return 0
    have = {case_key(r) for r in read_records(out)} if (Path(out) / JSONL).exists() else set()
    fresh: dict[str, list[Record]] = {}
    for path in sorted(shard_dir.glob("*.jsonl")):  # named by start time: a later attempt wins
        fresh.update({k: v for k, v in _by_case(_Tail(path).records()).items() if k not in have})
    for records in fresh.values():
        for record in records:
            folder.append(record)
    return len(fresh)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """`--executor-option KEY=VALUE` pairs; values are read as YAML (numbers, lists, strings)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--executor-option {pair!r}: expected KEY=VALUE, e.g. slurm_partition=gpu")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def _uses_cuda(cases: list[Case]) -> bool:
    return any(c.params.device.startswith("cuda") for c in cases if not c.task)


def _threads(cases: list[Case]) -> int:
    return max((c.params.threads or 1 for c in cases if not c.task), default=1)


def _executor(out: Path, options: dict[str, Any], cases: list[Case], shards: list[list[Case]], suite: Suite):
    try:
        import submitit
    except ImportError:
        raise InputError("--executor submitit needs the submitit package: pip install -e '.[cluster]'") from None
    options = dict(options)
    cluster = options.pop("cluster", None)
    if cluster is not None and cluster not in CLUSTERS:
        raise InputError(f"--executor-option cluster={cluster!r}: allowed values are {', '.join(CLUSTERS)}")
    try:
        executor = submitit.AutoExecutor(folder=out / "submitit", cluster=cluster)
    except RuntimeError as exc:
        raise InputError(f"--executor submitit: {exc}") from None
    longest = max(len(s) for s in shards)
    defaults: dict[str, Any] = {
        # Every case may use its whole timeout; submitit's local default (2 minutes) would kill the job.
        "timeout_min": math.ceil(longest * suite.limits.timeout_s / 60) + 10,
        "name": f"harness-{suite.name}",
    }
    if _uses_cuda(cases):
        defaults["gpus_per_node"] = 1
    if executor.cluster != "local":
        defaults["cpus_per_task"] = _threads(cases)  # the cores the cases ask for, no fewer
    try:
        executor.update_parameters(**(defaults | options))
    except Exception as exc:  # submitit names the unknown parameter and lists the valid ones
        raise InputError(f"--executor-option: {exc}") from None
    return executor


# ----------------------------------------------------------------------------- here, in worker processes


def request_for(case: Case, suite: Suite) -> CaseRequest | TaskRequest:
    if case.task:
        return TaskRequest(
            task=case.task,
            variant=case.variant,
            implementation=case.implementation,
            threads=suite.sweeps[0].threads[0] if suite.sweeps else None,
            options=suite.task_options.get(case.task, {}),
        )
    return CaseRequest(
        variant=case.variant,
        implementation=case.implementation,
        params=case.params.as_dict(),
        measure=list(suite.measure),
        timing=suite.timing,
        seed=suite.seed,
    )


def records_of(suite: str, case: Case, outcome: Outcome) -> list[Record]:
    """The records of one case: one, or for a task one per metric (harness.results.Record's task keys)."""
    fields = outcome.fields
    if not case.task:
        return [new_record(suite, case.variant, case.implementation, case.case_id, case.params.as_dict(), **fields)]
    metrics = fields.pop("task_metrics", None)
    common = {"task": case.task, "task_case": case.case_id}
    if not metrics:
        return [new_record(suite, case.variant, case.implementation, case.case_id, {}, **common, **fields)]
    return [
        new_record(
            suite, case.variant, case.implementation, f"{case.case_id}/{m['metric']}", {}, **common, **fields, **m
        )
        for m in metrics
    ]


def new_worker(tree: str | Path | None = None, allocator: str = "fixed") -> Worker:
    """A worker process (started on first use) that measures with harness.case_runner's handler."""
    from harness.case_runner import handle, held_bytes, start_worker

    return Worker(handle, start_worker, tree=tree, held=held_bytes, allocator=allocator)


def worker_names(worker: Any) -> dict[str, list[str]]:
    """The implementations registered in a worker's source tree, per variant."""
    reply = worker.run(NamesRequest(), timeout_s=120, memory_limit=None)
    if isinstance(reply, Outcome):
        raise InputError(f"cannot list implementations in {worker.tree or 'this tree'}: {reply.reason}")
    return reply


def measure_one(worker: Any, case: Case, request: CaseRequest | TaskRequest, limits: Limits) -> Outcome:
    """One case's outcome: a skip decided here, or the worker's reply (a failure of the worker included)."""
    why = skip_reason(case)
    if why:
        return Outcome.failure(Status.skipped, why)
    return worker.run(request, limits.timeout_s, limits.memory_bytes)


class LocalExecutor:
    """Here, one case at a time, in the harness's worker processes."""

    def __init__(self, suite: Suite, on_start: Callable[[Case], None] | None = None) -> None:
        self.suite, self.on_start = suite, on_start
        self.worker_starts = 0  # 1 a run unless a case crashed, hung or leaked

    def run(self, cases: list[Case], emit: Emit) -> None:
        """Measure `cases` one after another in a worker process, handing each case's records to `emit`."""
        suite = self.suite
        worker = new_worker(allocator=suite.timing.allocator)
        interrupted = False
        try:
            for case in cases:
                if self.on_start is not None:
                    self.on_start(case)
                outcome = measure_one(worker, case, request_for(case, suite), suite.limits)
                emit(case, records_of(suite.name, case, outcome))
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            worker.stop(kill=interrupted)
            self.worker_starts += worker.starts


class _Distributed:
    """Shards of whole shape groups, one job or task each; records reach `emit` as they land."""

    def __init__(self, suite: Suite, out: Path, workers: int = 2, options: dict[str, Any] | None = None) -> None:
        if workers < 1:
            raise InputError(f"--workers must be at least 1, got {workers}")
        self.suite, self.out, self.workers, self.options = suite, Path(out), workers, dict(options or {})

    def run(self, cases: list[Case], emit: Emit) -> None:
        if not cases:
            return
        self._run(shard_cases(cases, self.workers), _Ledger(self.suite, cases, emit))

    def _run(self, shards: list[list[Case]], ledger: _Ledger) -> None:
        raise NotImplementedError


class _Ledger:
    """Which cases are still owed a record; hands each case's records to the run exactly once."""

    def __init__(self, suite: Suite, cases: list[Case], emit: Emit) -> None:
        self.suite, self.emit = suite, emit
        self.by_id = {c.case_id: c for c in cases}
        self.left = set(self.by_id)

    def record(self, records: list[Record] | list[dict]) -> None:
        for case_id, group in _by_case([as_record(r) for r in records]).items():
            if case_id in self.left:
                self.left.discard(case_id)
                self.emit(self.by_id[case_id], group)

    def lost(self, case_ids: set[str], reason: str) -> None:
        """Cases a finished job never recorded (it failed, was cancelled or timed out) become crash records."""
        for case_id in sorted(case_ids & self.left):
            case = self.by_id[case_id]
            self.left.discard(case_id)
            self.emit(case, records_of(self.suite.name, case, Outcome.failure(Status.crash, reason)))


class SubmititExecutor(_Distributed):
    """One submitit job per shard (SLURM, or submitit's local executor); records through shard files."""

    def _run(self, shards: list[list[Case]], ledger: _Ledger) -> None:
        _run_submitit(self.suite, shards, self.out, self.options, ledger)


class RayExecutor(_Distributed):
    """One Ray task per shard; records stream back through a queue actor (no shared filesystem)."""

    def _run(self, shards: list[list[Case]], ledger: _Ledger) -> None:
        _run_ray(self.suite, shards, self.options, ledger)


EXECUTORS: dict[str, type] = {"local": LocalExecutor, "submitit": SubmititExecutor, "ray": RayExecutor}


def make_executor(
    name: str,
    suite: Suite,
    out: Path,
    *,
    workers: int = 2,
    options: dict[str, Any] | None = None,
    on_start: Callable[[Case], None] | None = None,
) -> LocalExecutor | _Distributed:
    """The executor called `name` (local, submitit, ray), set up for one run."""
    if name == "local":
        return LocalExecutor(suite, on_start=on_start)
    if name not in EXECUTORS:
        raise InputError(f"--executor {name!r}: allowed values are {', '.join(EXECUTORS)}")
    return EXECUTORS[name](suite, out, workers, options)


def _run_submitit(suite: Suite, shards: list[list[Case]], out: Path, options: dict[str, Any], ledger: _Ledger) -> None:
    cases = [c for shard in shards for c in shard]
    engine = _executor(out, options, cases, shards, suite)
    local = engine.cluster == "local"
    shard_dir = out / SHARDS
    shard_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per_job = max(1, len(cores) // len(shards)) if cores else 0
    gpus = _local_gpu_count() if local and _uses_cuda(cases) else 0

    pending = []
    for index, shard in enumerate(shards):
        cpus = None
        if local and gpus:
            engine.update_parameters(local_visible_gpus=(index % gpus,), gpus_per_node=1)
        elif local and cores:
            cpus = [cores[(index * per_job + i) % len(cores)] for i in range(per_job)]
        path = shard_dir / f"{stamp}-{index:03d}.jsonl"
        job = engine.submit(run_shard, suite, shard, str(path), cpus)
        pending.append((job, _Tail(path), {c.case_id for c in shard}))
    try:
        while pending:
            for item in list(pending):
                job, tail, owed = item
                finished = job.done()
                ledger.record(tail.records())  # after done(): a finished job's last records are on disk
                if not finished:
                    continue
                pending.remove(item)
                if owed & ledger.left:
                    try:
                        job.result()
                        why = "the job ended without measuring it"
                    except Exception as exc:
                        why = describe(exc, last=True)
                    ledger.lost(owed, f"submitit job {job.job_id} ended before this case: {why}")
            if pending:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        for job, _, _ in pending:
            job.cancel(check=False)
        raise


RAY_OPTIONS = ("address", "num_cpus", "num_gpus")


def _run_ray(suite: Suite, shards: list[list[Case]], options: dict[str, Any], ledger: _Ledger) -> None:
    """One Ray task per shard, each holding one GPU (CUDA suites) and the CPUs its cases' threads need.

    Ray will not start a task before its resources are free, so tasks never share a GPU, and on a
    CPU-only machine never more of them run than the cores hold. Records stream back through a
    queue actor, so worker nodes need no filesystem shared with this one.
    """
    try:
        import ray
        from ray.util.queue import Empty, Queue
    except ImportError:
        raise InputError("--executor ray needs the ray package: pip install -e '.[cluster]'") from None
    unknown = sorted(set(options) - set(RAY_OPTIONS))
    if unknown:
        raise InputError(f"--executor-option {', '.join(unknown)}: ray takes {', '.join(RAY_OPTIONS)}")
    cases = [c for shard in shards for c in shard]
    num_cpus = options.get("num_cpus", _threads(cases))
    num_gpus = options.get("num_gpus", 1 if _uses_cuda(cases) else 0)
    started_here = not ray.is_initialized()
    if started_here:
        env = {k: os.environ[k] for k in ("HARNESS_PLUGINS", "PYTHONPATH") if k in os.environ}
        try:
            ray.init(
                address=options.get("address"),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env} if env else None,
            )
        except Exception as exc:
            raise InputError(
                f"--executor ray: cannot start or reach a Ray cluster: {describe(exc, last=True)}"
            ) from None
    try:
        have = ray.cluster_resources()
        for name, want in (("CPU", num_cpus), ("GPU", num_gpus)):
            if want and have.get(name, 0) < want:
                raise InputError(
                    f"--executor ray: each task needs {want} {name}(s) (num_{name.lower()}s), the Ray cluster "
                    f"has {have.get(name, 0):g}; pass --executor-option num_{name.lower()}s=N"
                )
        queue = Queue()
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(run_shard)
        pending = {task.remote(suite, shard, None, None, queue): {c.case_id for c in shard} for shard in shards}

        def drain() -> None:
            while True:
                try:
                    ledger.record(queue.get_nowait())
                except Empty:
                    return

        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                drain()
                for ref in done:
                    owed = pending.pop(ref)
                    try:
                        for records in ray.get(ref):  # anything the queue did not deliver
                            ledger.record(records)
                    except Exception as exc:
                        ledger.lost(owed, f"Ray task ended before this case: {describe(exc, last=True)}")
                    ledger.lost(owed, "the Ray task ended without measuring it")
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
