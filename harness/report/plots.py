"""Matplotlib figures of a run: throughput, speed-up, peak memory and accuracy against sequence length.

One figure row per group of cases that differ only in the sequence length and implementation: N
(seq_len) for most variants, the KV cache length Nkv (seq_len_kv) for decode, whose throughput is
drawn in GB/s under the measured bandwidth ceiling (it is memory-bound). Colours are
fixed per implementation name across every plot of every run, and cases that failed or were
skipped are drawn as markers along the bottom edge, so nothing silently goes missing.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from harness.results import FAILED as FAILED_STATUSES  # noqa: E402
from harness.shapes import SHAPE_KEYS, Params  # noqa: E402

# One plot per value of every shape key but the one plotted along (harness.shapes declares them).
GROUP_KEYS = SHAPE_KEYS
# Variants whose plots run along another length than seq_len, and are judged in GB/s.
X_AXIS = {"decode": "seq_len_kv"}
MEMORY_BOUND = {"decode"}


def x_axis(variant: str) -> str:
    return X_AXIS.get(variant, "seq_len")


FAILED = tuple(sorted(str(s) for s in FAILED_STATUSES))
_PALETTE = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
_FIXED = [
    "naive",
    "sdpa",
    "sdpa.math",
    "sdpa.flash",
    "sdpa.efficient",
    "sdpa.cudnn",
    "memory_efficient",
    "chunked",
    "fused",
    "flex",
    "compiled.naive",
    "compiled.memory_efficient",
    "xformers",
    "flash_attn",
]


def colour(name: str) -> tuple:
    """The same colour for an implementation in every plot (known names fixed, others hashed)."""
    if name in _FIXED:
        return _PALETTE[_FIXED.index(name)]
    digest = int(hashlib.sha1(name.encode()).hexdigest(), 16)
    return _PALETTE[len(_FIXED) + digest % (len(_PALETTE) - len(_FIXED))]


@dataclass
class Figure:
    title: str
    path: Path
    png: bytes


def _given(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def group_title(key: tuple) -> str:
    values = dict(zip(GROUP_KEYS, key, strict=True))
    x = x_axis(values["variant"])
    parts = [
        values["variant"] + ("" if values.get("direction") in (None, "fwd") else f" {values['direction']}"),
        values["dtype"],
        values["device"],
        f"B={values['batch']}",
        f"H={values['heads']}" + (f"/{int(values['kv_heads'])} kv" if _given(values.get("kv_heads")) else ""),
        f"D={values['head_dim']}",
    ]
    if x != "seq_len" and _given(values.get("seq_len")):
        parts.append(f"Nq={int(values['seq_len'])}")
    if x != "seq_len_kv" and _given(values.get("seq_len_kv")):
        parts.append(f"Nkv={int(values['seq_len_kv'])}")
    if values["threads"] is not None and not (isinstance(values["threads"], float) and math.isnan(values["threads"])):
        parts.append(f"{int(values['threads'])} threads")
    if values["causal"] is True:
        parts.append("causal")
    return " · ".join(str(p) for p in parts)


def _bottom_markers(ax, rows: pd.DataFrame, x: str) -> None:
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for _, r in rows.iterrows():
        failed = r["status"] in FAILED
        ax.plot(
            r[x],
            0.03,
            marker="x" if failed else "o",
            markersize=8 if failed else 6,
            color=colour(r["implementation"]),
            markerfacecolor="none" if not failed else None,
            transform=trans,
            clip_on=False,
            linestyle="none",
        )


def _lines(ax, ok: pd.DataFrame, column: str, x: str, scale: float = 1.0) -> None:
    for name, rows in ok.groupby("implementation", sort=True):
        rows = rows.sort_values(x)
        values = rows[column] * scale
        ax.plot(rows[x], values, marker="o", markersize=4, label=name, color=colour(name))


def plot_group(key: tuple, frame: pd.DataFrame, baseline: str = "naive") -> bytes:
    """Four panels for one group of cases; returns PNG bytes."""
    ok = frame[frame["status"] == "ok"]
    not_ok = frame[frame["status"] != "ok"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    fig.subplots_adjust(left=0.04, right=0.86, top=0.85, bottom=0.14, wspace=0.28)
    fig.suptitle(group_title(key), fontsize=12)
    variant = key[0]
    x = x_axis(variant)
    unit = "pixels" if variant == "attention_gate" else "tokens"
    xlabel = f"KV cache length Nkv ({unit}, log)" if x == "seq_len_kv" else f"sequence length N ({unit}, log)"

    ax = axes[0]
    if variant in MEMORY_BOUND:
        if "gbps" in ok and ok["gbps"].notna().any():
            _lines(ax, ok.dropna(subset=["gbps"]), "gbps", x)
        ceiling = ok["roofline_peak_gbps"].dropna() if "roofline_peak_gbps" in ok else ok.iloc[0:0]
        if len(ceiling):
            ax.axhline(float(ceiling.median()), color="black", linewidth=1.2, linestyle="--")
            ax.text(
                0.01,
                0.97,
                f"measured bandwidth {float(ceiling.median()):.0f} GB/s",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
            )
        ax.set(title="bandwidth (cache read once; dashed: ceiling)", xlabel=xlabel, ylabel="GB/s")
    else:
        if "tflops" in ok and ok["tflops"].notna().any():
            _lines(ax, ok.dropna(subset=["tflops"]), "tflops", x)
        ax.set(title="throughput", xlabel=xlabel, ylabel="TFLOP/s")

    ax = axes[1]
    base = ok[ok["implementation"] == baseline].set_index(x)["time_median"] if "time_median" in ok else None
    if base is not None and not base.empty:
        speed = ok.dropna(subset=["time_median"]).copy()
        speed["speedup"] = speed[x].map(base) / speed["time_median"]
        _lines(ax, speed.dropna(subset=["speedup"]), "speedup", x)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set(title=f"speed-up over {baseline}", ylabel=f"time({baseline}) / time  (log)")
    else:
        ax.text(0.5, 0.5, f"no {baseline} measurements", ha="center", transform=ax.transAxes)
        ax.set(title=f"speed-up over {baseline}")
    ax.set_xlabel(xlabel)

    ax = axes[2]
    if "peak_memory_bytes" in ok and ok["peak_memory_bytes"].notna().any():
        mem = ok.dropna(subset=["peak_memory_bytes"])
        mem = mem[mem["peak_memory_bytes"] > 0]
        _lines(ax, mem, "peak_memory_bytes", x, 1 / 2**20)
        ax.set_yscale("log")
    ax.set(title="peak extra memory (log-log: slope 2 = O(N²))", xlabel=xlabel, ylabel="MiB (log)")

    ax = axes[3]
    if "max_abs_err" in ok and ok["max_abs_err"].notna().any():
        acc = ok.dropna(subset=["max_abs_err", "tolerance"]).copy()
        acc = acc[acc["tolerance"] > 0]
        acc["ratio"] = (acc["max_abs_err"] / acc["tolerance"]).clip(lower=1e-6)
        _lines(ax, acc, "ratio", x)
        ax.axhline(1.0, color="red", linewidth=1, linestyle="--", label="tolerance")
        ax.set_yscale("log")
    ax.set(
        title="accuracy: max error / tolerance (≤ 1 passes)",
        xlabel=xlabel,
        ylabel="max_abs_err / tolerance (log)",
    )

    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.25)
        _bottom_markers(ax, not_ok, x)
    handles = [Line2D([], [], color=colour(n), marker="o", label=n) for n in sorted(frame["implementation"].unique())]
    handles += [
        Line2D([], [], color="black", marker="x", linestyle="none", label="failed (bottom edge)"),
        Line2D(
            [], [], color="black", marker="o", markerfacecolor="none", linestyle="none", label="skipped (bottom edge)"
        ),
    ]
    fig.legend(handles=handles, loc="center right", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def groups(frame: pd.DataFrame):
    """(key, rows) per plot: the GROUP_KEYS values (NaN for the plotted axis) and the cases."""
    for variant, part in frame.groupby("variant", sort=False):
        x = x_axis(str(variant))
        keys = [k for k in GROUP_KEYS if k in part and k != x]
        for key, rows in part.groupby(keys, sort=False, dropna=False):
            values = dict(zip(keys, key, strict=True))
            yield tuple(values.get(k, math.nan) for k in GROUP_KEYS), rows


MAX_FIGURES = 10


def plottable_groups(frame: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """Groups with at least two sequence lengths, the largest first."""
    found = [(key, rows) for key, rows in groups(frame) if rows[x_axis(key[0])].nunique() >= 2]
    return sorted(found, key=lambda item: -len(item[1]))


def write_plots(frame: pd.DataFrame, out_dir: Path, max_groups: int = MAX_FIGURES) -> list[Figure]:
    """One PNG per group with at least two sequence lengths (single points live in the tables).

    At most `max_groups` figures, the groups with the most cases first, so that a run of thousands
    of records still reports in seconds; the tables hold every case.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for key, rows in plottable_groups(frame)[:max_groups]:
        png = plot_group(key, rows)
        text = (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in key if not pd.isna(v))
        slug = "-".join(text).replace("/", "_").replace(" ", "")
        path = out_dir / f"{slug}.png"
        path.write_bytes(png)
        figures.append(Figure(group_title(key), path, png))
    return figures


def plot_tasks(frame: pd.DataFrame) -> list[Figure]:
    """Per task, each metric by implementation as bars, with the trivial baseline as a dashed line."""
    figures: list[Figure] = []
    if "task" not in frame or frame["task"].isna().all():
        return figures
    tasks = frame[frame["task"].notna() & (frame["status"] == "ok")]
    for task, rows in tasks.groupby("task", sort=False):
        metrics = list(dict.fromkeys(rows["metric"]))
        fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.5, 3.2 * len(metrics)), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            part = rows[rows["metric"] == metric].sort_values("implementation")
            ax.bar(part["implementation"], part["value"], color=[colour(n) for n in part["implementation"]])
            baseline = part["baseline"].dropna()
            if len(baseline):
                ax.axhline(
                    float(baseline.iloc[0]),
                    color="black",
                    linestyle="--",
                    linewidth=1,
                    label=str(part["baseline_name"].iloc[0]) if "baseline_name" in part else "baseline",
                )
                ax.legend(fontsize=7, loc="lower right")
            ax.set_title(metric, fontsize=10)
            ax.tick_params(axis="x", rotation=60, labelsize=7)
        fig.suptitle(f"task: {task}", fontsize=11)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        plt.close(fig)
        figures.append(Figure(f"task {task}: metric by implementation", Path(f"task-{task}.png"), buffer.getvalue()))
    return figures


def _intensity(row: pd.Series) -> float | None:
    """FLOPs per byte moved of a case, from its params (failed cases have no measured figures)."""
    from harness.variants import VARIANTS

    spec = VARIANTS.get(str(row["variant"]))
    try:
        params = Params.from_values(row)
        return spec.flops(params) / spec.bytes_moved(params) if spec is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def plot_rooflines(frame: pd.DataFrame) -> list[Figure]:
    """One roofline per device and dtype: arithmetic intensity against achieved TFLOP/s, log-log.

    The two measured ceilings are drawn (bandwidth × intensity rising into the flat matmul peak);
    each marker is one implementation at one shape; failed cases are crosses on the bottom edge at
    their intensity, so a kernel that did not run is not mistaken for one that was not asked.
    """
    figures: list[Figure] = []
    if "roofline_peak_tflops" not in frame or frame["roofline_peak_tflops"].isna().all():
        return figures
    for (device, dtype), rows in frame.groupby(["device", "dtype"], sort=True):
        ok = rows[(rows["status"] == "ok") & rows["roofline_peak_tflops"].notna() & rows["tflops"].notna()]
        if ok.empty:
            continue
        peak = float(ok["roofline_peak_tflops"].median())
        bandwidth = float(ok["roofline_peak_gbps"].median()) / 1e3  # TB/s: TFLOP/s per FLOP/byte
        intensity = ok.apply(_intensity, axis=1).astype(float)
        fig, ax = plt.subplots(figsize=(8.5, 5.2))
        fig.subplots_adjust(left=0.1, right=0.72, top=0.9, bottom=0.12)
        low, high = max(intensity.min() / 4, 1e-2), intensity.max() * 4
        xs = [low * (high / low) ** (i / 200) for i in range(201)]
        ax.plot(xs, [min(peak, bandwidth * x) for x in xs], color="black", linewidth=1.5)
        ax.text(high, peak, f" {peak:.3g} TFLOP/s", va="bottom", ha="right", fontsize=8)
        ax.text(low, bandwidth * low, f" {bandwidth * 1e3:.3g} GB/s", va="bottom", fontsize=8, rotation=20)
        for name, part in ok.assign(intensity=intensity).groupby("implementation", sort=True):
            ax.plot(part["intensity"], part["tflops"], marker="o", linestyle="none", color=colour(name), label=name)
        failed = rows[rows["status"].isin(FAILED)]
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        for _, r in failed.iterrows():
            x = _intensity(r)
            if x:
                ax.plot(x, 0.03, marker="x", color=colour(r["implementation"]), transform=trans, clip_on=False)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.25)
        ax.set(
            title=f"roofline · {device} · {dtype}",
            xlabel="arithmetic intensity (FLOP per byte moved, log)",
            ylabel="achieved TFLOP/s (log)",
        )
        handles = [
            Line2D([], [], color=colour(n), marker="o", linestyle="none", label=n)
            for n in sorted(ok["implementation"].unique())
        ]
        handles.append(Line2D([], [], color="black", marker="x", linestyle="none", label="failed (bottom edge)"))
        fig.legend(handles=handles, loc="center right", fontsize=8)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        plt.close(fig)
        figures.append(
            Figure(f"roofline · {device} · {dtype}", Path(f"roofline-{device}-{dtype}.png"), buffer.getvalue())
        )
    return figures


# Axes the report draws time and TFLOP/s against, the rest of the shape fixed ("none": the axis off).
MODIFIER_AXES = ("window", "documents", "page_size", "ragged")


def _label(value: object) -> str:
    if type(value).__name__ in ("bool", "bool_"):  # numpy's too: a frame's boolean column
        return "ragged" if value else "equal"
    return "none" if not _given(value) else str(int(value))


def _order(label: str) -> tuple:
    return (label not in ("none", "equal"), int(label) if label.isdigit() else 0, label)


def plot_modifiers(frame: pd.DataFrame) -> list[Figure]:
    """Per group of cases that differ only in the window (or the documents, the page size, equal or ragged
    cache lengths): time and TFLOP/s (decode: GB/s under the measured copy ceiling) against it, one line per
    implementation, its setup dashed beside its time."""
    figures: list[Figure] = []
    for axis in MODIFIER_AXES:
        if axis not in frame or frame[axis].isna().all():
            continue
        keys = [k for k in GROUP_KEYS if k in frame and k != axis]
        for key, rows in frame.groupby(keys, sort=False, dropna=False):
            values = sorted({_label(v) for v in rows[axis]}, key=_order)
            if len(values) < 2:
                continue
            position = {v: i for i, v in enumerate(values)}
            ok = rows[(rows["status"] == "ok") & rows["time_median"].notna()].copy()
            if ok.empty:
                continue
            ok["x"] = [position[_label(v)] for v in ok[axis]]
            bound = key[keys.index("variant")] in MEMORY_BOUND  # decode: judged in GB/s under the copy ceiling
            throughput = "gbps" if bound else "tflops"
            fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
            for name, part in ok.groupby("implementation", sort=True):
                part = part.sort_values("x")
                left.plot(part["x"], part["time_median"] * 1e3, marker="o", color=colour(name), label=name)
                if "setup_s" in part and part["setup_s"].notna().any():
                    left.plot(part["x"], part["setup_s"] * 1e3, linestyle="--", marker=".", color=colour(name))
                right.plot(part["x"], part[throughput], marker="o", color=colour(name), label=name)
            if bound and "roofline_peak_gbps" in ok and ok["roofline_peak_gbps"].notna().any():
                ceiling = float(ok["roofline_peak_gbps"].median())
                right.axhline(ceiling, color="black", linestyle="--", linewidth=1, label=f"copy ceiling {ceiling:.3g}")
            ylabel = "GB/s (pages read)" if bound else "TFLOP/s (visible pairs)"
            for ax, what in ((left, "median ms (log; dashed: setup)"), (right, ylabel)):
                ax.set_xticks(range(len(values)), values)
                ax.set_xlabel(axis)
                ax.set_ylabel(what)
                ax.grid(True, alpha=0.25)
            left.set_yscale("log")
            right.legend(fontsize=7, loc="best")
            title = f"against {axis} · " + group_title(
                tuple(dict(zip(keys, key, strict=True)).get(k) for k in GROUP_KEYS)
            )
            fig.suptitle(title, fontsize=9)
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80)
            plt.close(fig)
            slug = hashlib.sha1(title.encode()).hexdigest()[:10]
            figures.append(Figure(title, Path(f"{axis}-{slug}.png"), buffer.getvalue()))
    return figures
