"""Records and the run folder: one JSON object per case, appended and flushed as each case ends.

A run folder is locked while a run writes into it, so two runs cannot interleave their records.
Reading tolerates a torn last line (a run killed mid-write) and drops it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.errors import InputError

RECORD_KEYS = (
    "suite",
    "variant",
    "implementation",
    "case_id",
    "params",
    "status",
    "reason",
    "time_s",
    "tflops",
    "tokens_per_s",
    "peak_memory_bytes",
    "max_abs_err",
    "max_rel_err",
    "tolerance",
    "accurate",
)
# 1: the unversioned records of the first release (read as they are); 2: `schema_version` written.
SCHEMA_VERSION = 2
JSONL = "results.jsonl"
MIN_FREE_BYTES = 16 << 20
# Where runs, gates, profiles and the task cache go unless told otherwise (relative to the cwd).
RESULTS_ROOT = Path("results")
TASK_CACHE = RESULTS_ROOT / "task-cache"


class Status(str, Enum):
    """How a case ended. `ok` may still be inaccurate (see `accurate`)."""

    ok = "ok"
    skipped = "skipped"
    error = "error"
    timeout = "timeout"
    oom = "oom"
    crash = "crash"

    def __str__(self) -> str:
        return self.value


STATUSES = tuple(s.value for s in Status)
FAILED = frozenset({Status.error, Status.timeout, Status.oom, Status.crash})


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf; store them as strings so every line stays valid JSON."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class Outcome(BaseModel):
    """What measuring one case produced: the record's measured fields, status first.

    A worker sends one back per request; the parent makes one when the worker crashed, hung or
    ran out of memory, or when a case was skipped before reaching a worker.
    """

    model_config = ConfigDict(extra="allow")

    status: Status = Status.ok
    reason: str = ""

    @classmethod
    def failure(cls, status: Status | str, reason: str) -> Outcome:
        return cls(status=Status(status), reason=reason)

    @property
    def fields(self) -> dict[str, Any]:
        return self.model_dump()


class Record(BaseModel):
    """One line of results.jsonl: a case's params and what was measured (DESIGN's record keys).

    Task records and later releases add keys; they are kept (extra="allow"), and old files without
    `schema_version` load as version 1. Readers index a record like the JSON object it is stored as
    (`record["time_s"]["median"]`, `record.get("accurate")`), which the report's tables use.
    """

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    suite: str = ""
    variant: str = ""
    implementation: str = ""
    case_id: str
    params: dict[str, Any] = Field(default_factory=dict)
    status: Status = Status.ok
    reason: str = ""
    time_s: dict[str, Any] | None = None
    tflops: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    tolerance: float | None = None
    accurate: bool | None = None
    first_call_s: float | None = None
    threads_used: int | None = None
    source_file: str | None = None
    leak_note: str | None = None
    gpu_clock_mhz: int | None = None
    saved_bytes: int | None = None
    grad_max_abs_err: dict[str, float] | None = None
    grad_tolerance: dict[str, float] | None = None
    bytes_moved: float | None = None
    gbps: float | None = None
    roofline: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _version(cls, data: Any) -> Any:
        if isinstance(data, dict) and "schema_version" not in data:
            data = {**data, "schema_version": 1}
        return data

    @property
    def failed(self) -> bool:
        return self.status in FAILED

    def as_dict(self) -> dict[str, Any]:
        """The JSON object this record is stored as (NaN/Inf as strings; unset optional keys left out)."""
        return _clean({k: getattr(self, k) for k in self.keys()})

    # The mapping view: readers treat a record as the JSON object it is stored as.
    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        """Like dict.get on the stored JSON object: an unset optional key gives `default`."""
        value = getattr(self, key, None)
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def keys(self) -> list[str]:
        """The stored keys: every design key, and the optional ones that are set."""
        names = [*type(self).model_fields, *(self.model_extra or {})]
        return [k for k in names if k in RECORD_KEYS or getattr(self, k) is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __iter__(self):  # type: ignore[override] - a mapping iterates its keys (dict(record) works)
        return iter(self.keys())


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it and a rename: a reader, or another process
    writing the same file, sees the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def new_record(suite: str, variant: str, implementation: str, case_id: str, params: dict, **fields: Any) -> Record:
    fields["schema_version"] = SCHEMA_VERSION  # written now, whatever the outcome carried
    return Record(suite=suite, variant=variant, implementation=implementation, case_id=case_id, params=params, **fields)


def as_record(data: dict | Record) -> Record:
    """A stored JSON object (any schema version) as a Record."""
    return data if isinstance(data, Record) else Record.model_validate(data)


class RunFolder:
    """The folder a run writes into, held under an exclusive lock for the run's lifetime."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise InputError(f"{self.path}: results folder is not writable: {exc.strerror}") from None
        free = shutil.disk_usage(self.path).free
        if free < MIN_FREE_BYTES:
            raise InputError(
                f"{self.path}: only {free / 2**20:.1f} MiB free on this disk; a run needs at least "
                f"{MIN_FREE_BYTES >> 20} MiB for its records and report"
            )
        self._lock = open(self.path / ".lock", "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise InputError(
                f"{self.path}: another run ({holder}) is writing into this folder; wait for it to end "
                "or choose another --out"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}")
        self._lock.flush()
        self._jsonl = open(self.path / JSONL, "a", encoding="utf-8")  # noqa: SIM115
        if self._jsonl.tell() > 0:
            self._repair_tail()

    def _repair_tail(self) -> None:
        """A run killed mid-line leaves a torn last line; cut it so appends start on a fresh line."""
        path = self.path / JSONL
        data = path.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        self._jsonl.seek(0, os.SEEK_END)

    def append(self, record: Record | dict) -> None:
        line = json.dumps(as_record(record).as_dict(), allow_nan=False)
        try:
            self._jsonl.write(line + "\n")
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        except OSError as exc:
            # Earlier records are on disk; stop with a clear message rather than measure on blind.
            raise InputError(
                f"{self.path / JSONL}: cannot write the record of {record.get('case_id')}: "
                f"{exc.strerror}; records written so far are kept"
            ) from None

    def write_json(self, name: str, data: dict) -> None:
        write_atomically(self.path / name, json.dumps(_clean(data), indent=2, allow_nan=False))

    def close(self) -> None:
        self._jsonl.close()
        self._lock.close()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_records(lines: Iterable[str | bytes]) -> list[Record]:
    """The records among JSONL lines; a torn or corrupt line is dropped, not fatal."""
    records = []
    for line in lines:
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if isinstance(data, dict) and "case_id" in data:
                records.append(Record.model_validate(data))
        except (json.JSONDecodeError, ValidationError):
            continue
    return records


def read_records(path: str | Path) -> list[Record]:
    """Records of a run folder (or a .jsonl file); a torn or corrupt line is dropped, not fatal."""
    path = Path(path)
    file = path / JSONL if path.is_dir() else path
    if not file.exists():
        raise InputError(f"{path}: no {JSONL} here; is this a run folder?")
    return parse_records(file.read_text(encoding="utf-8", errors="replace").splitlines())


def read_environment(path: str | Path) -> dict[str, Any]:
    """A run folder's env.json ({} when there is none, e.g. a bare .jsonl file)."""
    file = Path(path) / "env.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def case_key(record: Record | dict) -> str:
    """The case a record belongs to: a task case writes one record per metric under one key."""
    return record.get("task_case") or record["case_id"]


def latest_records(records: list[Record]) -> list[Record]:
    """One record per case_id, the last one written (a resumed run may repeat none, but be safe)."""
    by_id: dict[str, Record] = {}
    for record in records:
        by_id[record["case_id"]] = record
    return list(by_id.values())


def to_frame(records: list[Record] | list[dict]):
    """A flat pandas DataFrame: params.* and time_s.* become columns; samples are left out."""
    import pandas as pd

    rows = []
    for r in (as_record(r).as_dict() for r in records):
        row = {k: v for k, v in r.items() if k not in ("params", "time_s", "roofline")}
        if r.get("params"):
            # Records from before these axes: the forward, every head with its own k and v.
            row["direction"], row["kv_heads"] = "fwd", None
        row.update(r.get("params") or {})
        for key, value in (r.get("time_s") or {}).items():
            if key not in ("samples", "round_medians"):
                row[f"time_{key}"] = value
        for key, value in (r.get("roofline") or {}).items():
            row[f"roofline_{key}"] = value
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("max_abs_err", "max_rel_err", "tolerance", "tflops", "tokens_per_s", "gbps", "roofline_fraction"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def write_csv(records: list[Record], path: str | Path) -> None:
    to_frame(records).to_csv(path, index=False)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What the numbers of a run depend on: versions, devices, threads, commit."""
    import torch

    import harness
    from harness.gpu import gpu_state

    env = {
        "harness_version": harness.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "gpu_state": gpu_state(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    return env
