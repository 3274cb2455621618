"""Both ends of the worker pipe: the parent's `Worker` (spawn, watch, kill, replace) and the child's `serve`.

A case runs in a spawned process so that a kernel that crashes, hangs or exhausts memory takes only
the worker down: the parent turns what happened into an outcome (crash, timeout, oom) and starts a
fresh worker for the next case. What a request means is the handler's business (harness.case_runner);
this module only moves requests and replies and watches the process.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.results import Outcome, Status

POLL_S = 0.05
STARTUP_TIMEOUT_S = 180.0
# A worker whose malloc'd memory grew this much through one implementation is replaced before the next
# case, so that a kernel that leaks cannot make the cases after it fail or measure differently. Growth
# is judged per implementation: what an implementation's first case in a worker adds is its one-time
# set-up (a CUDA context, cuBLAS/cuDNN handles, a library's workspace, compiled kernels: 0.5-0.8 GiB
# of host memory on an H100), whichever case of the worker that is; what its later cases add is a
# leak. A kernel that leaks on every call is caught within its own case (harness.case_runner compares
# its calls with its first call). The harness's own inputs and references are not counted (`held`).
LEAK_LIMIT_BYTES = 512 << 20

# glibc adapts its mmap threshold to the sizes a process has freed, so two processes running the
# same kernel can end in different regimes: one reusing heap pages, the other page-faulting fresh
# mmaps on every call (measured here: sdpa.math at N=1024, 12 ms in one worker, 23 ms in its twin).
# Fixing the thresholds puts every worker in the same regime; a user's own settings win. That regime is
# not a user's process's, and it moves rankings by 10-25% on some shapes (README, "Allocator"), so a
# suite may choose `timing: {allocator: default}`: glibc as a plain process has it.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
ALLOCATORS = ("fixed", "default")


def allocator_env(allocator: str) -> dict[str, str]:
    """The variables a worker starts with for `allocator` that this process does not already set."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; allowed: {', '.join(ALLOCATORS)}")
    return {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ} if allocator == "fixed" else {}


def allocator_settings(allocator: str = "fixed") -> dict[str, Any]:
    """What env.json says of the workers' allocator: the regime and the glibc variables in force there."""
    inherited = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    return {"regime": allocator, "glibc_env": inherited | allocator_env(allocator)}


Handler = Callable[[Any], Any]


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
    """One spawned worker process running `handler` on each request; replaced when a case kills it."""

    def __init__(
        self,
        handler: Handler,
        on_start: Callable[[], None] | None = None,
        tree: str | Path | None = None,
        held: Callable[[], int] | None = None,
        allocator: str = "fixed",
    ):
        """`held` (run in the worker) says how many of its bytes are the harness's own (inputs, references),
        so that they are not counted as a kernel's growth."""
        self.handler, self.on_start, self.held = handler, on_start, held
        self.tree = None if tree is None else str(Path(tree).resolve())
        self.allocator = allocator
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._last_rss = 0  # the worker's malloc'd bytes (less `held`) after its last reply
        self._growth: dict[str, int] = {}  # per implementation: what its cases after its first one added
        self.starts = 0  # processes started over this worker's life (a replaced worker counts again)

    def _start(self) -> Outcome | None:
        """Start a worker and wait until it is ready; a worker that dies on the way is an outcome."""
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=serve,
            args=(child, self.handler, self.on_start, self.tree, self.held),
            daemon=True,
            name="harness-worker",
        )
        added = allocator_env(self.allocator)
        os.environ.update(added)  # the spawned interpreter inherits the environment at start
        try:
            self._proc.start()
        finally:
            for key in added:
                os.environ.pop(key, None)
        self.starts += 1
        child.close()
        self._conn = parent
        if parent.poll(STARTUP_TIMEOUT_S):
            try:
                ready = parent.recv()  # the ready handshake, with the worker's memory after its start
                self._last_rss = int(ready.get("rss", 0))
                return None
            except (EOFError, OSError):
                pass
        code = self._proc.exitcode
        self.stop(kill=True)
        return Outcome.failure(Status.crash, f"worker failed to start ({_signal_name(code)})")

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
        self._last_rss = 0
        self._growth = {}

    def _check_leak(self, request: Any, reply: Any, rss: int) -> Any:
        """Attribute what this case added to its implementation: set-up on its first case in this worker,
        a leak once its later cases have added more than LEAK_LIMIT_BYTES."""
        if isinstance(reply, Outcome) and reply.leak_note:
            self.stop()  # the case itself saw its calls leak
            return reply
        grown, self._last_rss = rss - self._last_rss, rss
        name = getattr(request, "implementation", None)
        if name is None or not rss:
            return reply
        if name not in self._growth:
            self._growth[name] = 0  # its first case here: one-time set-up, whichever case of the worker it is
            return reply
        self._growth[name] += grown
        if self._growth[name] > LEAK_LIMIT_BYTES:
            note = (
                f"the worker held {self._growth[name] / 2**20:.0f} MiB more (malloc in use) after the later cases "
                f"of {name} than after its first one in this worker; worker replaced"
            )
            self.stop()
            if isinstance(reply, Outcome):
                reply = reply.model_copy(update={"leak_note": note})
        return reply

    def run(self, request: Any, timeout_s: float, memory_limit: int | None) -> Any:
        """The handler's reply to `request`, or an Outcome saying how the worker failed."""
        if self._proc is None or not self._proc.is_alive():
            failed = self._start()
            if failed is not None:
                return failed
        self._conn.send(request)
        started = time.monotonic()
        while True:
            if self._conn.poll(POLL_S):
                try:
                    reply, rss = self._conn.recv()
                except (EOFError, OSError):
                    pass  # the worker died while sending; fall through to the liveness check
                else:
                    return self._check_leak(request, reply, rss)
            if not self._proc.is_alive():
                code = self._proc.exitcode
                self.stop(kill=True)
                if code == -signal.SIGKILL:
                    return Outcome.failure(Status.oom, "worker killed by SIGKILL (most likely the OOM killer)")
                return Outcome.failure(Status.crash, f"worker died with {_signal_name(code)}")
            if time.monotonic() - started > timeout_s:
                self.stop(kill=True)
                return Outcome.failure(Status.timeout, f"still running after the {timeout_s:g} s limit")
            if memory_limit:
                rss = _rss(self._proc.pid)
                if rss > memory_limit:
                    self.stop(kill=True)
                    return Outcome.failure(
                        Status.oom,
                        f"worker memory reached {rss / 2**30:.2f} GiB, over the {memory_limit / 2**30:g} GiB limit",
                    )


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


def serve(
    conn: Any,
    handler: Handler,
    on_start: Callable[[], None] | None = None,
    tree: str | None = None,
    held: Callable[[], int] | None = None,
) -> None:
    """Worker main loop: receive a request, send back (reply, malloc'd bytes less `held()`); None stops it.

    `tree` is a source tree (e.g. a git worktree of another commit) whose `implementations`
    package this worker measures, with the parent's harness: the method of measuring stays the
    same on both sides of a comparison, only the kernels differ.
    """
    if tree is not None:
        sys.path.insert(0, tree)
        for name in [m for m in sys.modules if m == "implementations" or m.startswith("implementations.")]:
            del sys.modules[name]
    if on_start is not None:
        on_start()

    def rss() -> int:
        return settled_rss() - (held() if held is not None else 0)

    conn.send({"ready": True, "rss": rss()})
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            # Everything the worker owes was sent through the pipe. The exit handlers run (multiprocessing's
            # release the semaphores a compile pool registered: 0.04 s), the rest of the interpreter's
            # teardown does not (1.3 s with torch loaded, paid by the parent's join after every run).
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        reply = handler(request)
        conn.send((reply, rss()))
