"""Both ends of the worker pipe: the parent's `Worker` (spawn, watch, kill, replace) and the child's `serve`.

A case runs in a spawned process so that a kernel that crashes, hangs or exhausts memory takes only
the worker down: the parent turns what happened into an outcome (crash, timeout, oom) and starts a
fresh worker for the next case. What a request means is the handler's business (harness.measure);
this module only moves requests and replies and watches the process.
"""

from __future__ import annotations

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
# A worker whose malloc'd memory grew this much is replaced before the next case, so that a kernel
# that leaks cannot make the cases after it fail or measure differently. Growth is counted from the
# end of the worker's first case, not from its start: the CUDA context, cuBLAS/cuDNN handles and
# compiled-kernel caches are one-time host allocations of 0.5-0.8 GiB (measured on an H100), and
# counting them replaced the worker after nearly every CUDA case. A kernel that leaks on every call
# is caught within its own case (harness.measure compares its calls with its first call).
LEAK_LIMIT_BYTES = 512 << 20

# glibc adapts its mmap threshold to the sizes a process has freed, so two processes running the
# same kernel can end in different regimes: one reusing heap pages, the other page-faulting fresh
# mmaps on every call (measured here: sdpa.math at N=1024, 12 ms in one worker, 23 ms in its twin).
# Fixing the thresholds puts every worker in the same regime; a user's own settings win.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}

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

    def __init__(self, handler: Handler, on_start: Callable[[], None] | None = None, tree: str | Path | None = None):
        self.handler, self.on_start = handler, on_start
        self.tree = None if tree is None else str(Path(tree).resolve())
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._baseline_rss = 0  # malloc'd bytes after the first case of this process (0: none yet)
        self.starts = 0  # processes started over this worker's life (a replaced worker counts again)

    def _start(self) -> Outcome | None:
        """Start a worker and wait until it is ready; a worker that dies on the way is an outcome."""
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=serve, args=(child, self.handler, self.on_start, self.tree), daemon=True, name="harness-worker"
        )
        added = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
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
                parent.recv()  # the ready handshake
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
        self._baseline_rss = 0

    def _check_leak(self, reply: Any, rss: int) -> Any:
        if isinstance(reply, Outcome) and reply.fields.get("leak_note"):
            self.stop()  # the case itself saw its calls leak
            return reply
        if not self._baseline_rss:
            self._baseline_rss = rss  # devices and libraries are initialised by now
            return reply
        if rss and rss - self._baseline_rss > LEAK_LIMIT_BYTES:
            grown = (rss - self._baseline_rss) / 2**20
            self.stop()
            note = (
                f"the worker held {grown:.0f} MiB more (malloc in use) after this case than after its first "
                "case; worker replaced"
            )
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
                    return self._check_leak(reply, rss)
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


def serve(conn: Any, handler: Handler, on_start: Callable[[], None] | None = None, tree: str | None = None) -> None:
    """Worker main loop: receive a request, send back (reply, malloc'd bytes); None stops the worker.

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
    conn.send({"ready": True})
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        reply = handler(request)
        conn.send((reply, settled_rss()))
