"""The self-contained HTML report of a run: environment, plots, "which one should I use",
failures and a sortable table of every case. One file, plots embedded, opens offline.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from harness.compare import ratio_with_interval
from harness.errors import InputError
from harness.report.plots import FAILED, plot_modifiers, plot_rooflines, plot_tasks, plottable_groups, write_plots
from harness.results import latest_records, read_records, to_frame, write_csv
from harness.shapes import SHAPE_KEYS

# The table of every case: what it is (its shape keys), then what was measured.
TABLE_COLUMNS = [
    "variant",
    "implementation",
    *SHAPE_KEYS[1:],
    "status",
    "time_median",
    "time_iqr",
    "time_n",
    "tflops",
    "roofline_fraction",
    "roofline_bound",
    "gbps",
    "tokens_per_s",
    "density",
    "first_call_s",
    "setup_s",
    "gpu_clock_mhz",
    "peak_memory_bytes",
    "saved_bytes",
    "max_abs_err",
    "tolerance",
    "accurate",
    "reason",
]


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _mib(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{float(value) / 2**20:.1f}"


def _within_noise(best: Any, other: Any, records: dict[str, Any]) -> bool:
    """Whether the stored samples cannot tell `other` from `best` (compare's 95% interval contains 1)."""
    a, b = records.get(best["case_id"]), records.get(other["case_id"])
    if (
        a is None
        or b is None
        or not (a.get("time_s") or {}).get("samples")
        or not (b.get("time_s") or {}).get("samples")
    ):
        return False
    fast, slow = a["time_s"]["samples"], b["time_s"]["samples"]
    # Exact shortcuts before a bootstrap (thousands of them in a large report): samples that do not
    # overlap give every resampled median ratio > 1, and two identical constant sets give exactly 1.
    if max(fast) < min(slow):
        return False
    if min(fast) == max(fast) == min(slow) == max(slow):
        return True
    _, low, high = ratio_with_interval(a, b)
    return low <= 1.0 <= high


def _given(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _setup_per_batch(row: Any) -> bool:
    """Whether a user pays the case's setup with every call: packed documents change every batch (their
    dense or block mask is rebuilt per step), and a server's batch layout changes every decode step (every
    request's cache grows: FlashInfer is planned again, a paged block mask rebuilt); a window or ALiBi is
    fixed for the model's life."""
    per_step = _given(row.get("documents")) or _given(row.get("page_size")) or row.get("ragged") is True
    return bool(per_step) and _given(row.get("setup_s"))


def _per_call_cost(row: Any) -> float:
    """What one call costs the user: the median, plus the setup where it is paid per batch."""
    return float(row["time_median"]) + (float(row["setup_s"]) if _setup_per_batch(row) else 0.0)


def best_per_shape(frame: pd.DataFrame, records: dict[str, Any] | None = None) -> list[dict]:
    """For each shape: the fastest accurate implementation (or the ones the noise cannot separate from it),
    its margin, how close it came to the roofline, and the leanest in memory."""
    records = records or {}
    keys = [k for k in SHAPE_KEYS if k in frame]
    rows = []
    if "time_median" not in frame:
        return rows
    usable = frame[(frame["status"] == "ok") & frame["time_median"].notna()]
    if "accurate" in usable:
        usable = usable[usable["accurate"].astype(object) != False]  # noqa: E712 - None means "not checked"
    usable = usable.assign(cost=usable.apply(_per_call_cost, axis=1))
    for key, group in usable.groupby(keys, sort=False, dropna=False):
        ranked = group.sort_values("cost")
        best = ranked.iloc[0]
        second = ranked.iloc[1] if len(ranked) > 1 else None
        lean = group.dropna(subset=["peak_memory_bytes"]) if "peak_memory_bytes" in group else group.iloc[0:0]
        leanest = lean.sort_values("peak_memory_bytes").iloc[0] if len(lean) else None
        shape = dict(zip(keys, key, strict=True))
        tied = [r["implementation"] for _, r in ranked.iloc[1:].iterrows() if _within_noise(best, r, records)]
        fraction = best.get("roofline_fraction")
        rows.append(
            {
                "shape": ", ".join(f"{k}={_fmt(v)}" for k, v in shape.items() if _fmt(v) and k != "variant"),
                "variant": shape["variant"],
                "best": " ≈ ".join([best["implementation"], *tied]),
                "tie": bool(tied),
                "roofline": None if fraction is None or pd.isna(fraction) else float(fraction),
                "bound": best.get("roofline_bound") if isinstance(best.get("roofline_bound"), str) else "",
                "time_ms": best["time_median"] * 1e3,
                "tflops": best.get("tflops"),
                "gbps": best.get("gbps"),
                # Compilation and lazy set-up are paid once per shape: beside a kernel that wins by
                # a few percent, seconds of compiling can matter more.
                "first_call_s": best.get("first_call_s"),
                "setup_s": best.get("setup_s") if _given(best.get("setup_s")) else None,
                "setup_counted": _setup_per_batch(best),
                "runner_up": second["implementation"] if second is not None else "",
                "margin": second["cost"] / best["cost"] if second is not None else None,
                "leanest": leanest["implementation"] if leanest is not None else "",
                "leanest_mib": _mib(leanest["peak_memory_bytes"]) if leanest is not None else "",
                "candidates": len(group),
            }
        )
    return rows


def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("harness.report", "templates"),
        autoescape=True,  # every string from suites and records is escaped
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = _fmt
    env.filters["mib"] = _mib
    return env.get_template("report.html.j2")


def write_report(run_dir: str | Path) -> Path:
    """Write plots/*.png, results.csv and report.html into `run_dir`; returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a run folder")
    records = latest_records(read_records(run_dir))
    env_path = run_dir / "env.json"
    try:
        env = json.loads(env_path.read_text()) if env_path.exists() else {}
    except json.JSONDecodeError:
        env = {"env.json": "unreadable"}
    frame = to_frame(records)
    write_csv(records, run_dir / "results.csv")
    kernel_frame = frame[frame["task"].isna()] if "task" in frame else frame
    figures = write_plots(kernel_frame, run_dir / "plots") if len(kernel_frame) else []
    task_figures = plot_tasks(frame) if len(frame) else []
    roofline_figures = plot_rooflines(kernel_frame) if len(kernel_frame) else []
    modifier_figures = plot_modifiers(kernel_frame) if len(kernel_frame) else []
    for figure in [*roofline_figures, *modifier_figures]:
        (run_dir / "plots").mkdir(exist_ok=True)
        (run_dir / "plots" / figure.path.name).write_bytes(figure.png)
    for figure in task_figures:
        (run_dir / "plots").mkdir(exist_ok=True)
        (run_dir / "plots" / figure.path.name).write_bytes(figure.png)
    table = [{c: r.get(c) for c in TABLE_COLUMNS} for r in kernel_frame.to_dict("records")] if len(kernel_frame) else []
    failures = [r for r in table if r["status"] in FAILED or (r["status"] == "ok" and r["accurate"] is False)]
    counts = frame["status"].value_counts().to_dict() if len(frame) else {}
    tasks = [r for r in records if r.get("task")]
    profile_path = run_dir / "profile.json"
    try:
        profiles = (
            [p for p in json.loads(profile_path.read_text()) if p.get("status") == "ok"]
            if profile_path.exists()
            else []
        )
    except (json.JSONDecodeError, AttributeError):
        profiles = []
    html = _template().render(
        title=f"{env.get('suite', run_dir.name)} — attention harness report",
        run=run_dir.name,
        env=env,
        counts=counts,
        total=len(records),
        figures=[{"title": f.title, "data": base64.b64encode(f.png).decode()} for f in figures],
        figures_omitted=max(0, len(plottable_groups(kernel_frame)) - len(figures)) if len(kernel_frame) else 0,
        task_figures=[{"title": f.title, "data": base64.b64encode(f.png).decode()} for f in task_figures],
        best=best_per_shape(kernel_frame, {r["case_id"]: r for r in records}) if len(kernel_frame) else [],
        roofline_figures=[{"title": f.title, "data": base64.b64encode(f.png).decode()} for f in roofline_figures],
        modifier_figures=[{"title": f.title, "data": base64.b64encode(f.png).decode()} for f in modifier_figures],
        failures=failures,
        # The SM clock column only where a GPU ran something.
        columns=[c for c in TABLE_COLUMNS if c != "gpu_clock_mhz" or "gpu_clock_mhz" in frame],
        table=table,
        tasks=tasks,
        profiles=profiles,
    )
    path = run_dir / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
