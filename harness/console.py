"""Terminal output of a run: a rich progress bar with the current case and ETA, and a summary table."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from harness.shapes import Case
from harness.suite.schema import Timing

STATUS_STYLE = {"ok": "green", "skipped": "dim", "error": "red", "timeout": "magenta", "oom": "red", "crash": "red"}


# What the ETA assumes before the first case ends: one call's FLOP rate per device kind, the cost
# of starting a case (worker round trip, inputs), and a first call that compiles (measured on a
# 2-core EPYC: flex 4 s per shape with a cold inductor cache, 0.3 s warm; compiled.* 0.2-1 s). The
# ETA then learns the real pace: main suite predicted 185 s, measured 156 s with a cold cache.
ASSUMED_FLOPS = {"cpu": 100e9, "cuda": 100e12}
# Decode is memory-bound: its FLOPs alone would predict a call hundreds of times too short.
ASSUMED_BANDWIDTH = {"cpu": 10e9, "cuda": 2e12}
CASE_OVERHEAD_S = 0.15
COMPILE_S = 2.0
# Seconds of prior belief in the prediction: the pace learned from finished cases takes over
# gradually, so one fast or slow first case does not swing the ETA.
PRIOR_S = 15.0


def predicted_seconds(case: Case, timing: Timing) -> float:
    """How long measuring `case` should take: the untimed calls, the checks and the timing loop."""
    if case.skip_reason:
        return 0.0
    if case.task:
        return 20.0  # a task trains a small model or loads it from the cache
    from harness import registry
    from harness.variants import get_variant

    device = "cuda" if case.params.device.startswith("cuda") else "cpu"
    spec = get_variant(case.variant)
    call = max(
        spec.flops(case.params) / ASSUMED_FLOPS[device], spec.bytes_moved(case.params) / ASSUMED_BANDWIDTH[device]
    )
    try:
        impl = registry.get(case.variant, case.implementation)
    except Exception:  # a name only another tree has (the gate): no compile assumed
        compiles = False
    else:
        # Forward availability only: a backward probe compiles (torch.compile, flex) and belongs in the
        # worker, not in the parent before the first case.
        if not impl.available_for(replace(case.params, direction="fwd"))[0]:
            return CASE_OVERHEAD_S / 4  # the worker only says why not
        compiles = impl.compiles
    first = COMPILE_S if compiles else call
    sampling = max(timing.min_time_s, timing.min_samples * max(call, timing.min_sample_time_s))
    timed = min(timing.max_time_s, sampling) + timing.warmup * call
    checks = 6 * call  # naive in the case's dtype and the float64 reference (shared by a shape), memory
    return CASE_OVERHEAD_S + first + checks + timed


class _Eta(ProgressColumn):
    """Remaining predicted seconds, scaled by the pace measured so far (shrunk toward the prediction)."""

    def render(self, task: Task) -> Text:
        remaining = (task.total or 0) - task.completed
        elapsed = task.elapsed or 0.0
        pace = (elapsed + PRIOR_S) / (task.completed + PRIOR_S)
        seconds = max(0.0, remaining * pace)
        return Text(f"eta {int(seconds // 60)}:{int(seconds % 60):02d}", style="progress.remaining")


class RunProgress:
    """A progress bar weighted by each case's predicted time, so the ETA is right from the first case."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[cases]}"),
            TimeElapsedColumn(),
            _Eta(),
            TextColumn("{task.fields[current]}"),
            console=console,
            transient=False,
        )
        self._task: Any = None
        self._cost: dict[str, float] = {}
        self._done = 0

    def start(self, cases: list[Case], already: int = 0, timing: Timing | None = None) -> None:
        if already:
            self.console.print(f"resuming: {already} cases already recorded, {len(cases)} to go")
        timing = timing or Timing()
        self._cost = {c.case_id: predicted_seconds(c, timing) for c in cases}
        self._done = 0
        self._progress.start()
        total = sum(self._cost.values()) or 1.0
        self._task = self._progress.add_task("cases", total=total, current="", done=0, cases=len(cases))

    def case_started(self, case: Case) -> None:
        self._progress.update(self._task, current=case.case_id)

    def case_finished(self, case: Case, record: Any) -> None:
        status = record["status"]
        if status not in ("ok", "skipped") or record.get("accurate") is False:
            style = STATUS_STYLE.get(status, "red")
            what = "inaccurate" if status == "ok" else status
            self._progress.console.print(
                f"[{style}]{what}[/{style}] {case.case_id}: {record.get('reason', '')}", highlight=False
            )
        self._done += 1
        self._progress.update(self._task, advance=self._cost.get(case.case_id, 0.0), done=self._done)

    def stop(self) -> None:
        self._progress.update(self._task, current="")
        self._progress.stop()


def _bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def summary_table(records: list[Any]) -> Table:
    """Per variant and implementation: cases, best TFLOP/s and GB/s, largest peak memory, accuracy."""
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for r in records:
        groups[(r["variant"], r["implementation"])].append(r)
    table = Table(title="summary", title_justify="left")
    columns = ("variant", "implementation", "ok/run/all", "best TFLOP/s", "best GB/s", "max peak memory", "accuracy")
    for column in (*columns, "failed"):
        table.add_column(column, justify="right" if column not in ("variant", "implementation") else "left")
    for (variant, name), rows in groups.items():
        ok = [r for r in rows if r["status"] == "ok"]
        run = [r for r in rows if r["status"] != "skipped"]
        best = max((r["tflops"] for r in ok if r.get("tflops")), default=None)
        gbps = max((r["gbps"] for r in ok if r.get("gbps")), default=None)
        memory = max((r["peak_memory_bytes"] for r in ok if r.get("peak_memory_bytes") is not None), default=None)
        checked = [r for r in ok if r.get("accurate") is not None]
        bad = [r for r in checked if not r["accurate"]]
        accuracy = "-" if not checked else ("[green]ok[/green]" if not bad else f"[red]{len(bad)} bad[/red]")
        failed = len(run) - len(ok)
        table.add_row(
            variant,
            name,
            f"{len(ok)}/{len(run)}/{len(rows)}",
            f"{best:.3f}" if best else "-",
            f"{gbps:.1f}" if gbps else "-",
            _bytes(memory),
            accuracy,
            f"[red]{failed}[/red]" if failed else "0",
        )
    return table


def llm_table(records: list[Any], family: str) -> Table:
    """Task llm for one model family: implementation x (logit error and tolerance, greedy agreement with
    its flips and near-ties, prefill and decode time as ratios to eager, attention's share of prefill)."""
    from rich.markup import escape

    table = Table(title=f"llm: {family} (against eager, same weights and inputs)", title_justify="left")
    columns = ("implementation", "max logit err", "tolerance", "agreement", "flips (near-ties)", "min top-2 gap")
    for column in (*columns, "prefill x eager", "decode x eager", "attention share", "status"):
        table.add_column(column, justify="left" if column in ("implementation", "status") else "right")
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(r["implementation"], {"record": r})
        if str(r.get("metric") or "").startswith(f"{family}."):
            row[r["metric"].split(".", 1)[1]] = r
    for name, row in rows.items():
        first = row["record"]
        detail = ((first.get("task_extra") or {}).get("families") or {}).get(family, {})

        def value(metric: str, row=row) -> str:
            record = row.get(metric)
            return "" if record is None or record.get("value") is None else f"{record['value']:.3g}"

        err = row.get("max_logit_err")
        flips = f"{detail['flips']} ({detail['near_ties']})" if detail else ""
        status = str(first["status"]) + (f": {first['reason']}" if first.get("reason") else "")
        table.add_row(
            name,
            value("max_logit_err"),
            "" if err is None else f"{err['baseline']:.3g}",
            value("token_agreement"),
            flips,
            f"{detail['min_top2_gap']:.3g}" if detail else "",
            value("prefill_time_vs_eager"),
            value("decode_time_vs_eager"),
            value("attention_share"),
            escape(status[:90]),
        )
    return table
