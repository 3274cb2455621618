"""The runner: isolation, fault records, resume, locking, record contents."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.errors import InputError
from harness.results import RECORD_KEYS, RunFolder, read_records
from harness.runner import run_suite
from harness.suite import parse_text
from tests.conftest import ROOT, suite_text


def by_impl(records):
    return {r["implementation"]: r for r in records}


@pytest.mark.slow
def test_each_kind_of_failure_is_recorded_and_the_sweep_goes_on(faulty_plugins, tmp_path):
    names = [
        "naive",
        "raises",
        "hangs",
        "segfaults",
        "aborts",
        "allocator_fails",
        "eats_memory",
        "wrong_shape",
        "returns_nan",
        "memory_efficient",
    ]
    suite = parse_text(suite_text(names, "limits: {timeout_s: 5, memory_gib: 1.5}\n"))
    result = run_suite(suite, tmp_path / "run")
    got = by_impl(result.records)
    assert {name: got[name]["status"] for name in names} == {
        "naive": "ok",
        "raises": "error",
        "hangs": "timeout",
        "segfaults": "crash",
        "aborts": "crash",
        "allocator_fails": "oom",
        "eats_memory": "oom",
        "wrong_shape": "error",
        "returns_nan": "ok",
        "memory_efficient": "ok",
    }
    assert "deliberate failure" in got["raises"]["reason"]
    assert "SIGSEGV" in got["segfaults"]["reason"] and "SIGABRT" in got["aborts"]["reason"]
    assert "1.5 GiB limit" in got["eats_memory"]["reason"]
    assert "wrong output shape" in got["wrong_shape"]["reason"]
    assert got["returns_nan"]["accurate"] is False and "NaN" in got["returns_nan"]["reason"]
    # The good cases after the failures measured as usual.
    assert got["memory_efficient"]["accurate"] is True and got["memory_efficient"]["time_s"]["n"] >= 3
    assert len(read_records(tmp_path / "run")) == len(names)


@pytest.mark.slow
def test_records_have_the_design_keys_and_consistent_figures(tmp_path):
    suite = parse_text(suite_text(["naive", "sdpa", "sdpa.cudnn"], seq_len="[32, 64]"))
    result = run_suite(suite, tmp_path / "run")
    assert len(result.records) == 6
    for record in read_records(tmp_path / "run"):
        assert set(RECORD_KEYS) <= set(record)
        if record["implementation"] == "sdpa.cudnn":
            assert record["status"] == "skipped" and "CUDNN" in record["reason"]
            continue
        assert record["status"] == "ok", record["reason"]
        t = record["time_s"]
        assert t["min"] <= t["median"] <= max(t["samples"]) and t["n"] == len(t["samples"])
        p = record["params"]
        flops = 4 * p["batch"] * p["heads"] * p["seq_len"] ** 2 * p["head_dim"]
        assert math.isclose(record["tflops"], flops / t["median"] / 1e12, rel_tol=1e-9)
        assert record["accurate"] is True and record["max_abs_err"] <= record["tolerance"]
        assert record["peak_memory_bytes"] > 0
    assert (tmp_path / "run" / "env.json").exists() and (tmp_path / "run" / "results.csv").exists()


@pytest.mark.slow
def test_inaccurate_output_is_flagged_with_its_error(faulty_plugins, tmp_path):
    result = run_suite(parse_text(suite_text(["slightly_off"])), tmp_path / "run")
    record = result.records[0]
    assert record["status"] == "ok" and record["accurate"] is False
    assert record["max_abs_err"] == pytest.approx(1e-3, rel=1e-2) and record["max_abs_err"] > record["tolerance"]


@pytest.mark.slow
def test_memory_measurement_sees_a_known_allocation(faulty_plugins, tmp_path):
    suite = parse_text(suite_text(["naive", "allocates_64mib"], "measure: [memory]\n"))
    got = by_impl(run_suite(suite, tmp_path / "run").records)
    extra = got["allocates_64mib"]["peak_memory_bytes"] - got["naive"]["peak_memory_bytes"]
    assert abs(extra - (64 << 20)) < (1 << 20), extra


@pytest.mark.slow
def test_excluded_and_unavailable_cases_are_skipped_with_reasons(tmp_path):
    text = suite_text(
        ["naive", "chunked"],
        "exclude:\n  - {implementation: naive, seq_len: {gt: 40}, reason: too big}\n",
        seq_len="[32, 64]",
    )
    text = text.replace("threads: [1]}", "threads: [1], device: [cpu, cuda]}")
    records = run_suite(parse_text(text), tmp_path / "run").records
    statuses = {
        (r["implementation"], r["params"]["seq_len"], r["params"]["device"]): (r["status"], r["reason"])
        for r in records
    }
    assert statuses[("naive", 64, "cpu")] == ("skipped", "too big")
    assert statuses[("naive", 32, "cpu")][0] == "ok"
    if not __import__("torch").cuda.is_available():
        assert statuses[("chunked", 32, "cuda")] == ("skipped", "no CUDA device on this machine")


@pytest.mark.slow
def test_resume_runs_only_the_missing_cases(tmp_path):
    suite = parse_text(suite_text(["naive", "chunked", "sdpa"]))
    out = tmp_path / "run"
    first = run_suite(suite, out, only=["naive"])
    assert [r["implementation"] for r in first.records] == ["naive"]
    second = run_suite(suite, resume=out)
    assert sorted(r["implementation"] for r in read_records(out)) == ["chunked", "naive", "sdpa"]
    assert len(second.records) == 3


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    with RunFolder(tmp_path / "run"), pytest.raises(InputError, match="another run .* is writing"):
        RunFolder(tmp_path / "run")


def test_a_torn_last_line_is_dropped_and_appends_start_on_a_fresh_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text(json.dumps({"case_id": "a", "status": "ok"}) + '\n{"case_id": "b", "sta')
    assert [r["case_id"] for r in read_records(run)] == ["a"]
    with RunFolder(run) as folder:
        folder.append({"case_id": "c", "status": "ok"})
    assert [r["case_id"] for r in read_records(run)] == ["a", "c"]


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs
    )


@pytest.mark.slow
def test_kill_9_loses_no_finished_case_and_resume_completes_the_run(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        suite_text(["naive", "chunked", "sdpa", "sdpa.math", "memory_efficient"], seq_len="[32, 48, 64, 80]")
    )
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", str(suite), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "results.jsonl").exists() and len(read_records(out)) >= 5:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_records(out)
    assert 5 <= len(before) < 20
    done = _cli("run", str(suite), "--resume", str(out))
    assert done.returncode == 0, done.stderr
    ids = [r["case_id"] for r in read_records(out)]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert {r["case_id"]: r for r in before}.keys() <= set(ids)


@pytest.mark.slow
def test_cli_strict_exits_1_on_a_failed_case(faulty_plugins, tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(suite_text(["naive", "raises"]))
    plain = _cli("run", str(suite), "--out", str(tmp_path / "a"))
    strict = _cli("run", str(suite), "--out", str(tmp_path / "b"), "--strict")
    assert plain.returncode == 0, plain.stderr
    assert strict.returncode == 1 and "1 failed" in strict.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "suites/nope.yaml"], "no such suite file"),
        (["run", "suites"], "is a directory"),
        (["run", "suites/ci.yaml", "--only", "memory_eficient"], "Did you mean 'memory_efficient'"),
        (["list", "--variant", "multihead"], "Did you mean 'multi_head'"),
    ],
)
@pytest.mark.slow
def test_cli_bad_input_exits_2_with_a_message_and_no_traceback(args, message):
    done = _cli(*args)
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split()) and "Traceback" not in done.stderr


def test_large_half_precision_cpu_cases_are_skipped_where_the_cpu_would_emulate_them(monkeypatch):
    from harness import machine
    from harness.shapes import Case, Params

    big = Case("s", "multi_head", "naive", Params(batch=4, heads=8, seq_len=4096, head_dim=64, dtype="bfloat16"))
    small = Case("s", "multi_head", "naive", Params(batch=1, heads=1, seq_len=256, head_dim=64, dtype="bfloat16"))
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert "no native bfloat16 matmul" in machine.skip_reason(big)
    assert machine.skip_reason(small) == ""  # small emulated cases still say how accurate bf16 is
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert machine.skip_reason(big) == ""


@pytest.mark.slow
def test_a_timing_mode_that_cannot_apply_on_cpu_is_refused_with_its_reason(tmp_path):
    suite = parse_text(
        suite_text(["naive"], "", seq_len="[32]").replace(
            "min_sample_time_s: 0}", "min_sample_time_s: 0, mode: cudagraph}"
        )
    )
    (record,) = run_suite(suite, tmp_path / "run").records
    assert record["status"] == "skipped" and "timing mode 'cudagraph' needs a CUDA device" in record["reason"]


def test_an_unknown_timing_mode_is_an_input_error():
    with pytest.raises(InputError, match="'events', 'cudagraph' or 'profiler'"):
        parse_text(suite_text(["naive"]).replace("min_sample_time_s: 0}", "min_sample_time_s: 0, mode: graphs}"))


@pytest.mark.slow
def test_cpu_timings_say_they_are_wall_clock(tmp_path):
    (record,) = run_suite(parse_text(suite_text(["naive"])), tmp_path / "run").records
    assert record["time_s"]["mode"] == "wall"


def test_the_eta_is_the_predicted_time_before_any_case_ends():
    from rich.console import Console

    from harness.console import RunProgress, predicted_seconds
    from harness.suite import expand

    suite = parse_text(suite_text(["naive", "sdpa", "sdpa.cudnn"], seq_len="[32, 512]"))
    cases = expand(suite)
    progress = RunProgress(Console(file=open(os.devnull, "w"), width=200))  # noqa: SIM115
    progress.start(cases, timing=suite.timing)
    try:
        predicted = sum(predicted_seconds(c, suite.timing) for c in cases)
        task = progress._progress.tasks[0]
        assert task.total == pytest.approx(predicted)
        shown = progress._progress.columns[4].render(task).plain
        minutes, seconds = map(int, shown.removeprefix("eta ").split(":"))
        assert abs(minutes * 60 + seconds - predicted) <= 1  # a number at once, not "-:--:--"
        # An unavailable case (no cuDNN on a CPU) costs next to nothing; a bigger shape costs more.
        costs = {c.case_id: predicted_seconds(c, suite.timing) for c in cases}
        cudnn = [v for k, v in costs.items() if "sdpa.cudnn" in k]
        naive = [v for k, v in costs.items() if "/naive/" in k]
        assert max(cudnn) < min(naive) and naive[0] < naive[1]
    finally:
        progress.stop()


@pytest.mark.slow
def test_a_clean_local_run_starts_one_worker(tmp_path):
    result = run_suite(parse_text(suite_text(["naive", "sdpa"], seq_len="[16, 32]")), tmp_path / "run")
    assert len(result.records) == 4 and result.worker_starts == 1


@pytest.mark.slow
def test_training_directions_record_gradients_saved_memory_and_scaled_flops(tmp_path):
    text = suite_text(["naive", "memory_efficient"], seq_len="[48]").replace(
        "threads: [1]}", "threads: [1], direction: [fwd, bwd, fwd_bwd]}"
    )
    records = {r["case_id"]: r for r in run_suite(parse_text(text), tmp_path / "run").records}
    fwd = "multi_head/memory_efficient/b1-h2-n48-d16-float32-cpu-t1"
    assert {fwd, fwd + "-bwd", fwd + "-fwd_bwd"} <= set(records)  # forward ids are what they always were
    for suffix, factor in (("", 1.0), ("-bwd", 2.5), ("-fwd_bwd", 3.5)):
        r = records[fwd + suffix]
        assert r["status"] == "ok" and r["accurate"] is True, r["reason"]
        flops = 4 * 2 * 48 * 48 * 16 * factor
        assert math.isclose(r["tflops"], flops / r["time_s"]["median"] / 1e12, rel_tol=1e-9)
        if suffix:
            assert set(r["grad_max_abs_err"]) == {"dq", "dk", "dv"} and r["saved_bytes"] is not None
            assert all(r["grad_max_abs_err"][g] <= r["grad_tolerance"][g] for g in ("dq", "dk", "dv"))
        else:
            assert r.get("grad_max_abs_err") is None and r.get("saved_bytes") is None
