"""Records and the run folder: one JSON object per case, appended and flushed as each case ends.

A run folder is locked while a run writes into it, so two runs cannot interleave their records.
Reading tolerates a torn last line (a run killed mid-write) and drops it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any, Literal

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
# 1: the unversioned records of the first release; 2: `schema_version` written; 3: typed nested values,
# every axis in `params`; 4: the score-modifier and paging axes, FLOPs over visible pairs (see MIGRATIONS).
SCHEMA_VERSION = 4
JSONL = "results.jsonl"
MIN_FREE_BYTES = 16 << 20
# Where runs, gates and profiles go unless told otherwise (relative to the cwd: a run's results are the
# user's, beside their work; what the harness learns about the machine goes to harness.cache).
RESULTS_ROOT = Path("results")


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


class _Stored(BaseModel):
    """A typed model read like the JSON object it is stored as (`m["median"]`, `m.get("note")`), so
    the report's and compare's readers index nested values as they index a record. A key that is not
    declared is refused: a misspelt key must fail where it is written, not become an extra field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """Like dict.get on the stored JSON object: an unset optional key gives `default`."""
        value = getattr(self, key, None) if key in type(self).model_fields else None
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def keys(self) -> list[str]:
        """The stored keys: the required ones, and the optional ones that are set."""
        return [k for k, f in type(self).model_fields.items() if f.is_required() or getattr(self, k) is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __iter__(self):  # type: ignore[override] - a mapping iterates its keys (dict(model) works)
        return iter(self.keys())


class TimeS(_Stored):
    """Seconds per call of a timed case (harness.timing.TimingStats); the gate adds its rounds' medians."""

    median: float
    iqr: float
    min: float
    mean: float
    n: int
    calls_per_sample: int = 1
    mode: str = "wall"
    samples: list[float] = Field(default_factory=list)
    round_medians: list[float] | None = None


class Roofline(_Stored):
    """A timed case against the machine's measured ceilings (harness.roofline)."""

    bound: Literal["compute", "memory"]
    fraction: float
    peak_tflops: float
    peak_gbps: float
    note: str | None = None


class _TaskMetricKeys(_Stored):
    """The keys of one metric of an application task (harness.tasks): an implementation's value beside
    the task's baseline and naive's; a task's record carries one metric's."""

    metric: str | None = None
    value: float | None = None
    baseline: float | None = None
    baseline_name: str | None = None
    naive_value: float | None = None
    higher_is_better: bool | None = None


class TaskMetric(_TaskMetricKeys):
    metric: str


class Measured(_Stored):
    """What measuring a case produced: the keys a worker fills (the record keys, less the case's identity)."""

    status: Status = Status.ok
    reason: str = ""
    time_s: TimeS | None = None
    tflops: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    tolerance: float | None = None
    accurate: bool | None = None
    first_call_s: float | None = None
    setup_s: float | None = None  # an implementation's per-shape set-up (registry `setup`), apart from calls
    threads_used: int | None = None
    source_file: str | None = None
    leak_note: str | None = None
    gpu_clock_mhz: int | None = None
    saved_bytes: int | None = None
    grad_max_abs_err: dict[str, float] | None = None
    grad_tolerance: dict[str, float] | None = None
    bytes_moved: float | None = None
    gbps: float | None = None
    roofline: Roofline | None = None
    density: float | None = None  # visible (query, key) pairs / (Nq · Nkv)
    doc_lens: list[list[int]] | None = None  # packed documents per batch row
    cache_lens: list[int] | None = None  # each request's KV cache length
    # Application tasks (harness.tasks)
    agreement: float | None = None
    samples_per_s: float | None = None
    eval_seconds: float | None = None
    train_seconds: float | None = None
    cached_weights: bool | None = None
    task_extra: dict[str, Any] | None = None


class Outcome(Measured):
    """What measuring one case produced, as the worker sends it back (a task's metrics still together).

    The parent makes one too when the worker crashed, hung or ran out of memory, or when a case was
    skipped before reaching a worker.
    """

    task_metrics: list[TaskMetric] | None = None

    @classmethod
    def failure(cls, status: Status | str, reason: str) -> Outcome:
        return cls(status=Status(status), reason=reason)

    @property
    def fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 only started writing `schema_version`."""
    return data


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 writes every axis in `params`: older kernel records get the axes they predate at their
    defaults (direction fwd, kv_heads None: every head with its own k and v)."""
    from harness.shapes import DEFAULTS

    if data.get("params"):
        data["params"] = DEFAULTS | data["params"]
    return data


def _v3_to_v4(data: dict[str, Any]) -> dict[str, Any]:
    """Version 4 adds the axes window, softcap, alibi, documents, page_size and ragged (older records: off)
    and counts FLOPs over visible pairs (a causal record's tflops is now N(N+1)/2 pairs, 1/N above N²/2;
    older records keep the figure they were measured with)."""
    return _v2_to_v3(data)


# How a record of each older version becomes one of the next (pyperf keeps its format history so).
MIGRATIONS = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}


class Record(Measured, _TaskMetricKeys):
    """One line of results.jsonl: a case's identity, params and what was measured (the record keys).

    Older files load through MIGRATIONS (no `schema_version`: version 1). Readers index a record like
    the JSON object it is stored as (`record["time_s"]["median"]`, `record.get("accurate")`).
    """

    schema_version: int = SCHEMA_VERSION
    suite: str = ""
    variant: str = ""
    implementation: str = ""
    case_id: str
    params: dict[str, Any] = Field(default_factory=dict)
    # Task records (one per metric; `task_case` is the case they share)
    task: str | None = None
    task_case: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {version!r}: written by a newer harness (this one reads up to {SCHEMA_VERSION})"
            )
        data = dict(data)
        while version < SCHEMA_VERSION:
            data = MIGRATIONS[version](data)
            version += 1
        data["schema_version"] = version
        return data

    @property
    def failed(self) -> bool:
        return self.status in FAILED

    def keys(self) -> list[str]:
        """The stored keys, the case's identity first: every design key, and the optional ones that are set."""
        identity = ("schema_version", "suite", "variant", "implementation", "case_id", "params", "task", "task_case")
        names = [*identity, *(k for k in type(self).model_fields if k not in identity)]
        return [k for k in names if k in RECORD_KEYS or getattr(self, k) is not None]

    def as_dict(self) -> dict[str, Any]:
        """The JSON object this record is stored as (NaN/Inf as strings; unset optional keys left out)."""
        return _clean({k: _plain(getattr(self, k)) for k in self.keys()})


def _plain(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it and a rename: a reader, or another process
    writing the same file, sees the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def new_record(suite: str, variant: str, implementation: str, case_id: str, params: dict, **fields: Any) -> Record:
    fields["schema_version"] = SCHEMA_VERSION  # written now, whatever the outcome carried
    return Record(suite=suite, variant=variant, implementation=implementation, case_id=case_id, params=params, **fields)


def jsonl_line(record: Record | dict) -> str:
    """One line of results.jsonl (and of a shard file): the record's stored JSON object."""
    return json.dumps(as_record(record).as_dict(), allow_nan=False) + "\n"


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
        try:
            self._jsonl.write(jsonl_line(record))
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        except OSError as exc:
            # Earlier records are on disk; stop with a clear message rather than measure on blind.
            raise InputError(
                f"{self.path / JSONL}: cannot write the record of {record.get('case_id')}: "
                f"{exc.strerror}; records written so far are kept"
            ) from None

    def rewrite(self, records: list[Record]) -> None:
        """Replace every record at once (a run re-judged against raised ceilings): atomically, so a reader
        sees the old file or the new one, and later appends go to the new file."""
        path = self.path / JSONL
        write_atomically(path, "".join(jsonl_line(r) for r in records))
        self._jsonl.close()
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run's lifetime

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
    """A flat pandas DataFrame: `params.*` become plain columns (`batch`), `time_s.*` `time_*`, and any
    other nested value (`roofline`, the gradient errors) `<key>_<field>`; raw samples are left out
    (compare reads them from the records)."""
    import pandas as pd

    frame = pd.DataFrame([as_record(record).as_dict() for record in records])
    for key in [c for c in frame.columns if frame[c].map(lambda v: isinstance(v, dict)).any()]:
        nested = pd.json_normalize([v if isinstance(v, dict) else {} for v in frame.pop(key)], max_level=0)
        nested = nested.drop(columns=[c for c in ("samples", "round_medians") if key == "time_s" and c in nested])
        nested.columns = [_column(f"{key}.{c}") for c in nested.columns]
        frame = frame.join(nested.set_index(frame.index))
    for column in ("max_abs_err", "max_rel_err", "tolerance", "tflops", "tokens_per_s", "gbps", "roofline_fraction"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _column(name: str) -> str:
    prefix, _, key = name.partition(".")
    return {"params": key, "time_s": f"time_{key}"}.get(prefix, name.replace(".", "_")) if key else name


def write_csv(records: list[Record], path: str | Path) -> None:
    to_frame(records).to_csv(path, index=False)
