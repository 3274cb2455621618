"""Per-case statistics between two runs: verdicts with confidence intervals (the gate, harness.gate, uses them).

A verdict is only "slower" when the whole 95% confidence interval of the time ratio lies beyond
1 + threshold: we are confident the slow-down is at least the threshold, so noise alone cannot fail
a pull request (pyperf's "not significant" rather than an invented slow-down). A ratio beyond the
threshold whose interval excludes 1 but reaches below 1 + threshold is "possibly slower": shown,
not failing. The interval comes from the stored samples:
the sign-test interval of paired per-round ratios when both sides were measured in interleaved
rounds (the gate), or an independent bootstrap of the two sample sets otherwise (two separate runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from harness.results import FAILED, Record, latest_records

CONFIDENCE = 0.95
BOOTSTRAP = 4000
# What two runs' env.json must agree on before their times can be compared (pyperf checks the same).
ENVIRONMENT_KEYS = ("cpu", "cpu_capability", "gpus", "torch", "cuda", "cpu_count", "hostname")

FASTER, SLOWER, NOISE, SMALL = "faster", "slower", "same within noise", "same within threshold"
MAYBE_SLOWER, MAYBE_FASTER = "possibly slower", "possibly faster"
NEW_FAILURE, INACCURATE, FIXED, ADDED, REMOVED, NOT_TIMED = (
    "newly fails",
    "became inaccurate",
    "fixed",
    "new case",
    "missing in new run",
    "not timed",
)
REGRESSIONS = (SLOWER, NEW_FAILURE, INACCURATE)


@dataclass(frozen=True)
class Comparison:
    case_id: str
    variant: str
    implementation: str
    verdict: str
    ratio: float | None = None  # new median / base median: > 1 is slower
    ci_low: float | None = None
    ci_high: float | None = None
    base_median: float | None = None
    new_median: float | None = None
    memory_ratio: float | None = None
    base_fraction: float | None = None  # share of the roofline (harness.roofline) of each side
    new_fraction: float | None = None
    base_status: str = ""
    new_status: str = ""
    note: str = ""

    @property
    def regression(self) -> bool:
        return self.verdict in REGRESSIONS


def _bootstrap_ratio(base: np.ndarray, new: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile CI of median(new)/median(base) from independent resampling of both sides."""

    def ratio(b: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.median(n, axis=axis) / np.median(b, axis=axis)

    if base.size < 2 or new.size < 2:  # one sample has no spread to resample
        value = float(np.median(new) / np.median(base))
        return value, value
    result = stats.bootstrap(
        (base, new),
        ratio,
        n_resamples=BOOTSTRAP,
        confidence_level=CONFIDENCE,
        method="percentile",
        vectorized=True,
        paired=False,
        rng=rng,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _paired_ratio(base: np.ndarray, new: np.ndarray) -> tuple[float, float, float]:
    """Median per-round ratio and its distribution-free (sign-test) interval.

    The rounds were measured back to back, so drift cancels within each pair; order statistics
    make the interval robust to a round that something else on the machine disturbed, which a
    t-interval on a handful of rounds is not (one outlier widens it enough to hide a 25% slow-down).
    """
    ratios = new / base
    interval = stats.quantile_test(ratios, q=1.0, p=0.5).confidence_interval(CONFIDENCE)
    return float(np.median(ratios)), float(interval.low), float(interval.high)


def ratio_with_interval(base: Record, new: Record, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    base_t, new_t = base.get("time_s") or {}, new.get("time_s") or {}
    base_rounds, new_rounds = base_t.get("round_medians"), new_t.get("round_medians")
    if base_rounds and new_rounds and len(base_rounds) == len(new_rounds) and len(base_rounds) >= 6:
        return _paired_ratio(np.asarray(base_rounds, float), np.asarray(new_rounds, float))
    base_s = np.asarray(base_t.get("samples") or [base_t["median"]], float)
    new_s = np.asarray(new_t.get("samples") or [new_t["median"]], float)
    low, high = _bootstrap_ratio(base_s, new_s, rng)
    return float(np.median(new_s) / np.median(base_s)), low, high


def _timed(record: Record) -> bool:
    return record.get("status") == "ok" and bool((record.get("time_s") or {}).get("median"))


def compare_case(base: Record | None, new: Record | None, threshold: float = 0.05) -> Comparison:
    """The verdict for one case_id present in either run."""
    ref = new or base
    assert ref is not None
    common = {"case_id": ref["case_id"], "variant": ref["variant"], "implementation": ref["implementation"]}
    if base is None:
        return Comparison(**common, verdict=ADDED, new_status=new["status"])  # type: ignore[index]
    if new is None:
        return Comparison(**common, verdict=REMOVED, base_status=base["status"])
    statuses = {"base_status": base["status"], "new_status": new["status"]}
    if new["status"] in FAILED and base["status"] not in FAILED:
        return Comparison(**common, **statuses, verdict=NEW_FAILURE, note=str(new.get("reason", ""))[:200])
    if base["status"] in FAILED and new["status"] not in FAILED:
        return Comparison(**common, **statuses, verdict=FIXED)
    if new.get("accurate") is False and base.get("accurate") is not False:
        return Comparison(**common, **statuses, verdict=INACCURATE, note=str(new.get("reason", ""))[:200])
    memory = None
    if base.get("peak_memory_bytes") and new.get("peak_memory_bytes") is not None:
        memory = new["peak_memory_bytes"] / base["peak_memory_bytes"]
    if not (_timed(base) and _timed(new)):
        return Comparison(**common, **statuses, verdict=NOT_TIMED, memory_ratio=memory)
    ratio, low, high = ratio_with_interval(base, new)
    fractions = {
        "base_fraction": (base.get("roofline") or {}).get("fraction"),
        "new_fraction": (new.get("roofline") or {}).get("fraction"),
    }
    if low <= 1.0 <= high:
        verdict = NOISE
    elif low > 1 + threshold:
        verdict = SLOWER
    elif high < 1 / (1 + threshold):
        verdict = FASTER
    elif ratio > 1 + threshold:
        verdict = MAYBE_SLOWER
    elif ratio < 1 / (1 + threshold):
        verdict = MAYBE_FASTER
    else:
        verdict = SMALL
    return Comparison(
        **common,
        **statuses,
        verdict=verdict,
        ratio=ratio,
        ci_low=low,
        ci_high=high,
        base_median=base["time_s"]["median"],
        new_median=new["time_s"]["median"],
        memory_ratio=memory,
        **fractions,
    )


def compare_runs(base: list[Record], new: list[Record], threshold: float = 0.05) -> list[Comparison]:
    base_by_id = {r["case_id"]: r for r in latest_records(base)}
    new_by_id = {r["case_id"]: r for r in latest_records(new)}
    ids = list(dict.fromkeys([*base_by_id, *new_by_id]))
    results = [compare_case(base_by_id.get(i), new_by_id.get(i), threshold) for i in ids]
    verdicts = [*REGRESSIONS, MAYBE_SLOWER, FASTER, FIXED, MAYBE_FASTER, SMALL, NOISE, ADDED, REMOVED, NOT_TIMED]
    order = {v: i for i, v in enumerate(verdicts)}
    return sorted(results, key=lambda c: (order.get(c.verdict, 99), c.case_id))


def _pct(ratio: float | None) -> str:
    return "" if ratio is None or math.isnan(ratio) else f"{(ratio - 1) * 100:+.1f}%"


def _roofline(c: Comparison) -> str:
    """Share of the roofline, base → new: what a time change means against the machine's limit."""
    if c.new_fraction is None:
        return ""
    base = "?" if c.base_fraction is None else f"{c.base_fraction:.0%}"
    return f"{base} → {c.new_fraction:.0%}"


def _ci(c: Comparison) -> str:
    return "" if c.ci_low is None else f"[{_pct(c.ci_low)}, {_pct(c.ci_high)}]"


def markdown(
    comparisons: list[Comparison],
    threshold: float,
    title: str = "Attention harness benchmark",
    environment: list[str] | None = None,
) -> str:
    """A pull-request comment: the verdict first, regressions and improvements, then the rest folded."""
    regressions = [c for c in comparisons if c.regression]
    head = "❌ regression" if regressions else "✅ no regression"
    lines = [
        f"### {title}: {head}",
        "",
        f"{len(comparisons)} cases · threshold {threshold:.0%} · {CONFIDENCE:.0%} confidence intervals · "
        "time change is new/base median − 1",
        "",
    ]
    if environment:
        lines += ["> **The runs' environments differ**: " + "; ".join(environment), ""]
    header = [
        "| verdict | case | time change | 95% CI | % of roofline | memory change | note |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(c: Comparison) -> str:
        note = c.note.replace("|", "\\|").replace("\n", " ")
        return (
            f"| {c.verdict} | `{c.case_id}` | {_pct(c.ratio)} | {_ci(c)} | {_roofline(c)} | {_pct(c.memory_ratio)} "
            f"| {note} |"
        )

    notable = [c for c in comparisons if c.regression or c.verdict in (MAYBE_SLOWER, FASTER, FIXED)]
    if notable:
        lines += header + [row(c) for c in notable] + [""]
    rest = [c for c in comparisons if c not in notable]
    if rest:
        lines += [
            "<details><summary>all other cases</summary>",
            "",
            *header,
            *[row(c) for c in rest],
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def table(comparisons: list[Comparison]):
    from rich.table import Table

    style = {
        SLOWER: "red",
        NEW_FAILURE: "red",
        INACCURATE: "red",
        MAYBE_SLOWER: "yellow",
        FASTER: "green",
        FIXED: "green",
        NOISE: "dim",
    }
    t = Table(title="compare (new vs base)", title_justify="left")
    for column in ("verdict", "case", "time change", "95% CI", "% of roofline", "base ms", "new ms", "memory change"):
        t.add_column(column, justify="left" if column in ("verdict", "case") else "right")
    for c in comparisons:
        s = style.get(c.verdict, "")
        t.add_row(
            f"[{s}]{c.verdict}[/{s}]" if s else c.verdict,
            c.case_id,
            _pct(c.ratio),
            _ci(c),
            _roofline(c),
            "" if c.base_median is None else f"{c.base_median * 1e3:.3f}",
            "" if c.new_median is None else f"{c.new_median * 1e3:.3f}",
            _pct(c.memory_ratio),
        )
    return t


def environment_differences(base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two runs' env.json in what their times depend on (device, torch, CPU).

    A difference does not stop the comparison (comparing two GPUs is a use), but every verdict must
    be read in its light, so `compare` states it first.
    """
    out = []
    for key in ENVIRONMENT_KEYS:
        if key in base and key in new and base[key] != new[key]:
            out.append(f"{key}: {base[key]!r} (base) vs {new[key]!r} (new)")
    return out
