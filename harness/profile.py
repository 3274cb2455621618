"""torch.profiler traces of chosen cases: for TensorBoard's profiler plugin and as Chrome/Perfetto JSON.

Each case is profiled in this process after warm-up: a few calls recorded with shapes and memory,
written as `tb/<case>/` (open with `tensorboard --logdir DIR/tb`, torch-tb-profiler installed),
`chrome/<case>.json` (chrome://tracing or ui.perfetto.dev), and the top operators by self time in
`profile.json`, which the run's HTML report shows.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

from harness import registry
from harness.errors import InputError, did_you_mean
from harness.prepare import prepare
from harness.results import RESULTS_ROOT
from harness.shapes import Case
from harness.suite import expand, load_suite

PROFILE_JSON = "profile.json"
TOP_OPERATORS = 12


def _slug(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", case_id)


def top_operators(prof: profile, limit: int = TOP_OPERATORS) -> list[dict]:
    """Operators by self CPU time (and self CUDA time where there is a GPU)."""
    rows = []
    for event in prof.key_averages():
        rows.append(
            {
                "name": event.key,
                "calls": event.count,
                "self_cpu_us": event.self_cpu_time_total,
                "cpu_total_us": event.cpu_time_total,
                "self_device_us": getattr(event, "self_device_time_total", 0) or 0,
                "self_cpu_memory_bytes": event.self_cpu_memory_usage,
            }
        )
    rows.sort(key=lambda r: -(r["self_device_us"] or r["self_cpu_us"]))
    total = sum(r["self_cpu_us"] for r in rows) or 1
    for r in rows:
        r["self_cpu_share"] = r["self_cpu_us"] / total
    return rows[:limit]


def profile_case(case: Case, out_dir: Path, calls: int = 3, seed: int = 0) -> dict:
    impl = registry.get(case.variant, case.implementation)
    ok, why = impl.available_for(case.params)
    if not ok:
        return {"case_id": case.case_id, "status": "skipped", "reason": why}
    if case.params.threads:
        torch.set_num_threads(case.params.threads)
    prepared = prepare(case, seed=seed)
    activities = [ProfilerActivity.CPU]
    if case.params.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    slug = _slug(case.case_id)
    # The direction's step: the kernel, its backward on a retained graph, or both (harness.prepare).
    training = case.params.direction != "fwd"
    with torch.enable_grad() if training else torch.inference_mode():
        step = prepared.step()
        step()  # warm-up: lazy init and compilation stay out of the trace
        with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
            for _ in range(calls):
                step()
            if case.params.device.startswith("cuda"):
                torch.cuda.synchronize()
    # A trace can be exported once: TensorBoard's handler writes it (Chrome trace format, which
    # torch-tb-profiler reads), and the Perfetto copy is that same file.
    tb_dir = out_dir / "tb" / slug
    tensorboard_trace_handler(str(tb_dir), worker_name=slug)(prof)
    written = max(tb_dir.glob("*.pt.trace.json"), key=lambda p: p.stat().st_mtime)
    chrome = out_dir / "chrome" / f"{slug}.json"
    chrome.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(written, chrome)
    return {
        "case_id": case.case_id,
        "status": "ok",
        "calls": calls,
        "chrome_trace": str(chrome.relative_to(out_dir)),
        "tensorboard_dir": f"tb/{slug}",
        "top_operators": top_operators(prof),
    }


def profile_suite(suite_path: str, case_ids: list[str] | None = None, out_dir: str | None = None) -> Path:
    """Profile the chosen cases of a suite (default: every runnable case of its --quick version)."""
    from harness.suite import quick_version

    suite = load_suite(suite_path)
    cases = [c for c in expand(suite) if not c.skip_reason and not c.task]
    if case_ids:
        known = {c.case_id: c for c in cases}
        missing = [i for i in case_ids if i not in known]
        if missing:
            raise InputError(
                f"--case {missing[0]!r} is not a case of {suite_path}.{did_you_mean(missing[0], known)}"
                " (case ids: see results.jsonl)"
            )
        cases = [known[i] for i in case_ids]
    else:
        cases = [c for c in expand(quick_version(suite)) if not c.skip_reason and not c.task]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(out_dir) if out_dir else RESULTS_ROOT / f"profile-{suite.name}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    results = [profile_case(case, out, seed=suite.seed) for case in cases]
    path = out / PROFILE_JSON
    previous = json.loads(path.read_text()) if path.exists() else []
    merged = {r["case_id"]: r for r in [*previous, *results]}
    path.write_text(json.dumps(list(merged.values()), indent=1))
    return out
