"""Terminal output of a run: a rich progress bar with the current case and ETA, and a summary table."""

from __future__ import annotations

import math
from collections import defaultdict

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness.suite import Case

STATUS_STYLE = {"ok": "green", "skipped": "dim", "error": "red", "timeout": "magenta", "oom": "red", "crash": "red"}


class RunProgress:
    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[current]}"),
            console=console,
            transient=False,
        )
        self._task = None

    def start(self, total: int, already: int = 0) -> None:
        if already:
            self.console.print(f"resuming: {already} cases already recorded, {total} to go")
        self._progress.start()
        self._task = self._progress.add_task("cases", total=total, current="")

    def case_started(self, case: Case) -> None:
        self._progress.update(self._task, current=case.case_id)

    def case_finished(self, case: Case, record: dict) -> None:
        status = record["status"]
        if status not in ("ok", "skipped") or record.get("accurate") is False:
            style = STATUS_STYLE.get(status, "red")
            what = "inaccurate" if status == "ok" else status
            self._progress.console.print(
                f"[{style}]{what}[/{style}] {case.case_id}: {record.get('reason', '')}", highlight=False
            )
        self._progress.advance(self._task)

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


def summary_table(records: list[dict]) -> Table:
    """Per variant and implementation: cases, best TFLOP/s, largest peak memory, accuracy."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["variant"], r["implementation"])].append(r)
    table = Table(title="summary", title_justify="left")
    for column in ("variant", "implementation", "ok/run/all", "best TFLOP/s", "max peak memory", "accuracy", "failed"):
        table.add_column(column, justify="right" if column not in ("variant", "implementation") else "left")
    for (variant, name), rows in groups.items():
        ok = [r for r in rows if r["status"] == "ok"]
        run = [r for r in rows if r["status"] != "skipped"]
        best = max((r["tflops"] for r in ok if r.get("tflops")), default=None)
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
            _bytes(memory),
            accuracy,
            f"[red]{failed}[/red]" if failed else "0",
        )
    return table
