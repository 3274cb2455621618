"""Unattended runs: failing kernels leave the other cases untouched, kill -9 loses nothing, bad
result folders fail before measuring, concurrent runs do not collide, big reports stay quick."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import InputError
from harness.results import RunFolder, new_record, read_records
from harness.runner import run_suite
from harness.suite import parse_text
from tests.conftest import suite_text

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["naive", "memory_efficient", "chunked"]
FAULTY = ["raises", "wrong_shape", "returns_nan", "hangs", "leaks", "eats_memory", "segfaults", "aborts"]


def _outcomes(records, names):
    return {
        (r["implementation"], r["params"]["seq_len"]): (r["status"], r["accurate"], r["max_abs_err"])
        for r in records
        if r["implementation"] in names
    }


@pytest.mark.slow
def test_failing_kernels_leave_the_other_cases_exactly_as_without_them(faulty_plugins, tmp_path):
    limits = "limits: {timeout_s: 5, memory_gib: 1.5}\n"
    clean = run_suite(parse_text(suite_text(GOOD, limits, seq_len="[32]")), tmp_path / "clean")
    # Faulty kernels first, so the good ones run in the workers they left behind.
    mixed = run_suite(parse_text(suite_text(FAULTY + GOOD, limits, seq_len="[32]")), tmp_path / "mixed")
    assert _outcomes(mixed.records, GOOD) == _outcomes(clean.records, GOOD)
    assert all(status == "ok" and accurate for status, accurate, _ in _outcomes(mixed.records, GOOD).values())
    faulty = {(r["implementation"], r["params"]["seq_len"]): r for r in mixed.records if r["implementation"] in FAULTY}
    assert {r["status"] for (name, _), r in faulty.items() if name == "hangs"} == {"timeout"}
    assert {r["status"] for (name, _), r in faulty.items() if name in ("segfaults", "aborts")} == {"crash"}
    assert any("worker replaced" in r.get("leak_note", "") for (name, _), r in faulty.items() if name == "leaks")


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_records_every_case_exactly_once(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(suite_text(["naive", "chunked", "sdpa", "memory_efficient"], seq_len="[16, 32, 48, 64, 80]"))
    out = tmp_path / "run"
    rng = random.Random(1234)
    trials = 10
    seen_after_kill = []
    for trial in range(trials):
        args = ["--resume", str(out)] if (out / "results.jsonl").exists() else ["--out", str(out)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness", "run", str(suite), *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Random points while cases run: counted from the moment the run folder exists, since starting
        # (importing torch, probing kernels) takes 2-4 s depending on the machine and its neighbours.
        deadline = time.monotonic() + 60
        while not (out / "results.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lines = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
        for line in lines[:-1]:
            json.loads(line)  # every line but a possibly torn last one is valid JSON
        records = read_records(out) if lines else []
        ids = [r["case_id"] for r in records]
        assert len(ids) == len(set(ids)), f"trial {trial}: a case was recorded twice"
        seen_after_kill.append(len(ids))
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(suite), "--resume", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    ids = [r["case_id"] for r in read_records(out)]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert seen_after_kill == sorted(seen_after_kill)  # nothing finished was ever lost


@pytest.mark.slow
def test_an_unusable_results_folder_is_a_clear_error_before_measuring(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", "suites/ci.yaml", "--out", str(blocker / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "not writable" in done.stderr and "Traceback" not in done.stderr


def test_a_full_disk_is_refused_before_measuring(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(InputError, match="only 1.0 MiB free"):
        RunFolder(tmp_path / "run")


def test_a_write_failure_mid_run_keeps_earlier_records_and_says_so(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.append({"case_id": "a", "status": "ok"})
    folder._jsonl.close()
    folder._jsonl = open("/dev/full", "w")  # every write fails with ENOSPC  # noqa: SIM115
    with pytest.raises(InputError, match="No space left on device; records written so far are kept"):
        folder.append({"case_id": "b", "status": "ok"})
    assert [r["case_id"] for r in read_records(tmp_path / "run")] == ["a"]


@pytest.mark.slow
def test_two_runs_into_different_folders_at_once_both_finish(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(suite_text(["naive", "chunked"], seq_len="[16, 32]"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "harness", "run", str(suite), "--out", str(tmp_path / name)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    for name in ("a", "b"):
        records = read_records(tmp_path / name)
        assert len(records) == 4 and all(r["status"] == "ok" for r in records)


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_exits_2(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(suite_text(["naive"], seq_len="[16]"))
    with RunFolder(tmp_path / "busy"):
        done = subprocess.run(
            [sys.executable, "-m", "harness", "run", str(suite), "--out", str(tmp_path / "busy")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2 and "another run" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_report_of_10000_records_is_written(tmp_path):
    from harness.report import write_report

    with RunFolder(tmp_path / "big") as folder:
        for i in range(10_000):
            n = 2 ** (5 + i % 8)
            impl = f"impl{i % 25}"
            params = {
                "batch": 1 + i // 200,
                "heads": 2,
                "seq_len": n,
                "seq_len_kv": None,
                "head_dim": 16,
                "dtype": "float32",
                "device": "cpu",
                "threads": 1,
                "causal": False,
            }
            folder.append(
                new_record(
                    "big",
                    "multi_head",
                    impl,
                    f"c{i}",
                    params,
                    status="ok",
                    time_s={"median": 1e-3 * n, "iqr": 1e-5, "min": 1e-3, "mean": 1e-3, "n": 3, "samples": [1e-3] * 3},
                    tflops=0.1,
                    tokens_per_s=1e5,
                    peak_memory_bytes=n * 100,
                    max_abs_err=1e-7,
                    max_rel_err=1e-7,
                    tolerance=1e-6,
                    accurate=True,
                )
            )
    html = write_report(tmp_path / "big").read_text()
    assert html.count("<tr>") > 10_000


def _requests(name: str, lengths: list[int]):
    from harness.messages import CaseRequest
    from harness.suite.schema import Timing

    timing = Timing(warmup=1, min_time_s=0.01, min_samples=8, max_time_s=5, min_sample_time_s=0)
    params = {"batch": 1, "heads": 2, "head_dim": 16, "threads": 1}
    return [
        CaseRequest(variant="multi_head", implementation=name, params=params | {"seq_len": n}, timing=timing)
        for n in lengths
    ]


@pytest.fixture
def worker(faulty_plugins):
    """A measuring worker that sees tests/plugins/faulty.py, stopped after the test."""
    from harness.executors import new_worker

    started = new_worker()
    yield started
    started.stop()


def _run(worker, name: str, n: int):
    return worker.run(_requests(name, [n])[0], timeout_s=120, memory_limit=None)


@pytest.mark.slow
def test_a_one_time_600_mib_cache_keeps_its_worker(worker):
    replies = [_run(worker, "caches_once", n) for n in (16, 32, 48)]
    assert [r.status for r in replies] == ["ok"] * 3, [r.reason for r in replies]
    assert not any(r.fields.get("leak_note") for r in replies)
    assert worker.starts == 1


@pytest.mark.slow
def test_a_kernel_that_leaks_100_mib_per_call_is_replaced_after_its_own_case(worker):
    reply = _run(worker, "leaks_100mib", 16)
    assert reply.status == "ok" and "worker replaced" in reply.fields["leak_note"]
    assert _run(worker, "caches_once", 16).status == "ok"
    assert worker.starts == 2  # the case after the leak ran in a fresh process


@pytest.mark.slow
def test_a_one_time_set_up_is_not_a_leak_whichever_case_of_the_worker_it_is(worker):
    """[caches_once, sdpa, leaks_100mib, naive] over four shapes: after each leaky case's worker is
    replaced, the new worker's first case is caches_once again, whose 600 MiB table is set-up there."""
    names = ["caches_once", "sdpa", "leaks_100mib", "naive"]
    replies = {(name, n): _run(worker, name, n) for n in (16, 32, 48, 64) for name in names}
    assert all(r.status == "ok" for r in replies.values()), {k: r.reason for k, r in replies.items()}
    noted = {name for (name, _), r in replies.items() if r.leak_note}
    assert noted == {"leaks_100mib"}
    assert worker.starts == 1 + 4  # one replacement after each leaky case, none for the cache


@pytest.mark.slow
def test_growth_across_cases_of_one_implementation_is_a_leak(worker):
    replies = [_run(worker, "caches_per_shape", n) for n in (16, 32, 48)]
    assert [bool(r.leak_note) for r in replies] == [False, False, True]  # set-up, +300 MiB, +600 MiB
    assert "after the later cases of caches_per_shape" in replies[2].leak_note
