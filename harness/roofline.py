"""Every result as a fraction of what the machine can do (torch-free).

The roofline of a case is the time it cannot beat: the larger of its FLOPs at the device's measured
matmul throughput for its dtype and its bytes at the measured copy bandwidth (harness.ceilings).
`fraction` = that bound / the measured median: 1.0 is at the limit, 0.25 is four times slower than
the limit, and `bound` says which limit it is. A fraction above 1.05 means a FLOP or byte count, or
a ceiling, is wrong; the record says so instead of printing an impossible number quietly.
"""

from __future__ import annotations

from typing import Any

IMPOSSIBLE = 1.05


def roofline(flops: float, bytes_moved: float, median_s: float, peak_flops: float, peak_bandwidth: float) -> dict:
    """The record's `roofline`: bound, fraction, and the ceilings it was judged against."""
    compute_s = flops / peak_flops
    memory_s = bytes_moved / peak_bandwidth
    bound = "compute" if compute_s >= memory_s else "memory"
    fraction = max(compute_s, memory_s) / median_s
    result: dict[str, Any] = {
        "bound": bound,
        "fraction": fraction,
        "peak_tflops": peak_flops / 1e12,
        "peak_gbps": peak_bandwidth / 1e9,
    }
    if fraction > IMPOSSIBLE:
        result["note"] = (
            f"{fraction:.2f} of the roofline is impossible: a FLOP or byte count, or a measured ceiling, is wrong"
        )
    return result


def attach(record: Any, ceilings: Any) -> None:
    """Add `roofline` to a timed record whose dtype has a measured matmul ceiling (in place)."""
    time_s = record.get("time_s") or {}
    median = time_s.get("median")
    dtype = (record.get("params") or {}).get("dtype")
    if record.get("status") != "ok" or not median or ceilings is None:
        return
    peak = ceilings.peak_flops(dtype) if dtype else None
    flops = record.get("tflops")
    if not peak or not ceilings.bandwidth or flops is None or not record.get("bytes_moved"):
        return
    record.roofline = roofline(flops * 1e12 * median, record["bytes_moved"], median, peak, ceilings.bandwidth)
