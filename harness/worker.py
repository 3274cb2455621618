"""The worker process: builds inputs, checks accuracy, measures memory and time for one case.

It runs in its own process (spawned by harness.runner) so that a kernel that crashes, hangs or
exhausts memory takes only the worker down; the parent records what happened and starts another.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import time
import traceback
from typing import Any

import torch

from harness import registry
from harness.accuracy import Baseline, baseline
from harness.memory import peak_memory
from harness.timing import TimingSettings, time_callable
from harness.variants import Params, get_variant

OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return any(marker in str(exc).lower() for marker in OOM_MARKERS)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"


class CaseRunner:
    """Runs cases one after another, reusing the reference of a shape across its implementations."""

    def __init__(self) -> None:
        self._baseline_key: tuple | None = None
        self._inputs = None
        self._baseline: Baseline | None = None

    def _prepare(self, variant: str, params: Params, seed: int, with_accuracy: bool):
        key = (variant, params, seed)
        if key != self._baseline_key:
            self._inputs = self._baseline = None  # free the previous shape's tensors first
            self._inputs = get_variant(variant).make_inputs(params, seed=seed)
            self._baseline_key = key
        if with_accuracy and self._baseline is None:
            self._baseline = baseline(get_variant(variant), self._inputs, registry.get(variant, "naive").fn)
        return self._inputs, self._baseline if with_accuracy else None

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        try:
            with torch.inference_mode():
                return self._run(task)
        except BaseException as exc:  # a kernel's failure is a result, not the worker's end
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            self._baseline_key = self._inputs = self._baseline = None
            status = "oom" if _is_oom(exc) else "error"
            message = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
            return {"status": status, "reason": f"{type(exc).__name__}: {message}{_where(exc)}"}

    def run_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """A task case: train (or load) the task's model, evaluate `implementation` against naive."""
        try:
            impl = registry.get(task["variant"], task["implementation"])
            ok, why = impl.available("cpu", "float32")
            if not ok:
                return {"status": "skipped", "reason": why}
            from harness.tasks import run_task

            if task.get("threads"):
                torch.set_num_threads(task["threads"])
            return run_task(task["task"], task["implementation"], task.get("cache_dir"))
        except Exception as exc:
            status = "oom" if _is_oom(exc) else "error"
            message = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
            return {"status": status, "reason": f"{type(exc).__name__}: {message}{_where(exc)}"}

    def _run(self, task: dict[str, Any]) -> dict[str, Any]:
        params = Params(**task["params"])
        variant, measure = task["variant"], set(task["measure"])
        if params.threads is not None:
            torch.set_num_threads(params.threads)
        if task["implementation"] not in registry.names(variant):
            return {"status": "skipped", "reason": f"no implementation {task['implementation']!r} in this source tree"}
        impl = registry.get(variant, task["implementation"])
        ok, why = impl.available_for(params)
        if not ok:
            return {"status": "skipped", "reason": why}
        if task.get("cpus") and hasattr(os, "sched_setaffinity"):
            # The gate pins both sides of a round to the same cores: on a shared VM one core can be
            # slower than another for minutes, and that must fall on both sides of a pair.
            os.sched_setaffinity(0, task["cpus"])
        if task.get("fresh_inputs"):
            # New allocations, new addresses: a layout that happens to suit (or hurt) one process
            # must not persist through every round of an A/B comparison.
            self._baseline_key = self._inputs = self._baseline = None
        inputs, base = self._prepare(variant, params, task["seed"], "accuracy" in measure)

        def call() -> torch.Tensor:
            return inputs.call(impl.fn)

        result: dict[str, Any] = {
            "status": "ok",
            "reason": "",
            "threads_used": torch.get_num_threads(),
            "source_file": inspect.getsourcefile(impl.fn),  # which tree's kernel was measured
        }
        started = time.perf_counter()
        output = call()  # first call: never timed (lazy init, compilation, autotuning)
        if params.device.startswith("cuda"):
            torch.cuda.synchronize(params.device)
        # What a user pays once per shape (compilation above all): reported, never mixed into time_s.
        result["first_call_s"] = time.perf_counter() - started
        if not isinstance(output, torch.Tensor):
            return {"status": "error", "reason": f"returned {type(output).__name__}, expected a torch.Tensor"}
        expected = tuple(inputs.args[0].shape)
        if tuple(output.shape) != expected:
            return {"status": "error", "reason": f"wrong output shape {tuple(output.shape)}, expected {expected}"}
        if base is not None:
            accuracy = base.judge(output)
            result.update(accuracy.as_record())
            if not accuracy.accurate:
                result["reason"] = accuracy.reason
        del output
        if "memory" in measure:
            result["peak_memory_bytes"] = peak_memory(call, params.device)
        if "time" in measure:
            stats = time_callable(call, TimingSettings(**task["timing"]), params.device)
            spec = get_variant(variant)
            result["time_s"] = stats.as_record()
            result["tflops"] = spec.flops(params) / stats.median / 1e12
            result["tokens_per_s"] = spec.tokens(params) / stats.median
        return result


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def settled_rss() -> int:
    """Bytes the process really holds in malloc'd memory (glibc's mallinfo2: in use + mmapped).

    Unlike RSS this ignores freed pages that glibc keeps for reuse, and unlike trimming the heap to
    read RSS it leaves the allocator's state alone, so the next measurement is not disturbed.
    """
    from harness.memory import _libc, _status_bytes

    libc = _libc()  # no gc.collect(): tensors die by reference count, and a collection per round is slow
    if libc is not None and hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)
    try:
        return _status_bytes("VmRSS")
    except (OSError, RuntimeError):
        return 0


def names() -> dict[str, list[str]]:
    from harness.variants import VARIANTS

    return {variant: registry.names(variant) for variant in VARIANTS}


def serve(conn: Any, tree: str | None = None) -> None:
    """Worker main loop: receive a task, send back its result; None stops the worker.

    `tree` is a source tree (e.g. a git worktree of another commit) whose `implementations`
    package this worker measures, with the parent's harness: the method of measuring stays the
    same on both sides of a comparison, only the kernels differ.
    """
    if tree is not None:
        import sys

        sys.path.insert(0, tree)
        for name in [m for m in sys.modules if m == "implementations" or m.startswith("implementations.")]:
            del sys.modules[name]
    runner = CaseRunner()
    registry.load()
    conn.send({"ready": True, "rss": settled_rss()})
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        if task.get("kind") == "names":
            conn.send(names())
            continue
        result = runner.run_task(task) if task.get("kind") == "task" else runner.run(task)
        result["worker_rss"] = settled_rss()
        conn.send(result)
