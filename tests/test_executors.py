"""Scale-out through submitit: shards of whole shape groups, merged records equal a local run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from harness.executors import merge_shards, parse_options, shard_cases
from harness.results import RunFolder, read_records
from harness.runner import run_suite
from harness.suite import expand, parse_suite
from tests.conftest import ROOT, suite_text

# A local Ray instance and submitit's local jobs each take the machine's cores: one at a time, on one
# xdist worker.
pytestmark = pytest.mark.xdist_group("cluster")

pytest.importorskip("submitit")

SAME = ("status", "reason", "max_abs_err", "max_rel_err", "tolerance", "accurate")


def _suite(implementations, seq_len="[32, 48, 64]", extra=""):
    return parse_suite(yaml.safe_load(suite_text(implementations, extra=extra, seq_len=seq_len)), "t.yaml")


def test_shards_hold_whole_shape_groups_and_balance_flops():
    cases = expand(_suite(["naive", "sdpa", "memory_efficient"], seq_len="[32, 64, 128, 256, 512]"))
    shards = shard_cases(cases, workers=2)
    assert len(shards) == 2
    assert sorted(c.case_id for s in shards for c in s) == sorted(c.case_id for c in cases)
    for shard in shards:  # every implementation of a shape is in the same shard
        shapes = {c.params for c in shard}
        assert all(c.params not in shapes for other in shards if other is not shard for c in other)
    # N=512 alone costs more than all smaller sizes together: it gets a shard of its own.
    assert {c.params.seq_len for c in shards[0]} == {512}
    assert len(shard_cases(cases, workers=50)) == 5  # never more shards than shape groups


@pytest.mark.slow
def test_submitit_local_run_equals_a_local_run(tmp_path):
    suite = _suite(["naive", "sdpa", "memory_efficient", "chunked"])
    local = run_suite(suite, tmp_path / "local")
    spread = run_suite(suite, tmp_path / "spread", executor="submitit", workers=2, options={"cluster": "local"})
    a = {r["case_id"]: r for r in local.records}
    b = {r["case_id"]: r for r in read_records(tmp_path / "spread")}
    assert len(a) == 12 and a.keys() == b.keys()
    for case_id in a:
        assert {k: a[case_id].get(k) for k in SAME} == {k: b[case_id].get(k) for k in SAME}, case_id
        assert b[case_id]["status"] == "ok" and b[case_id]["time_s"]["n"] >= 3
    assert len(list((tmp_path / "spread" / "shards").glob("*.jsonl"))) == 2
    assert len(spread.records) == 12


@pytest.mark.slow
def test_ray_run_equals_a_local_run(tmp_path):
    pytest.importorskip("ray")
    suite = _suite(["naive", "sdpa", "memory_efficient", "chunked"])
    local = run_suite(suite, tmp_path / "local")
    spread = run_suite(suite, tmp_path / "spread", executor="ray", workers=2)
    a = {r["case_id"]: r for r in local.records}
    b = {r["case_id"]: r for r in read_records(tmp_path / "spread")}
    assert len(a) == 12 and a.keys() == b.keys()
    for case_id in a:
        assert {k: a[case_id].get(k) for k in SAME} == {k: b[case_id].get(k) for k in SAME}, case_id
    assert len(spread.records) == 12


@pytest.mark.slow
def test_a_job_that_dies_leaves_crash_records_and_the_run_goes_on(tmp_path):
    # The job's shell exits before python starts: as if the node died or SLURM cancelled the job.
    suite = _suite(["naive", "sdpa"], seq_len="[32, 48]")
    result = run_suite(
        suite, tmp_path / "run", executor="submitit", workers=2, options={"cluster": "local", "local_setup": ["exit 3"]}
    )
    assert len(result.records) == 4
    assert {r["status"] for r in result.records} == {"crash"}
    assert all("ended before this case" in r["reason"] for r in result.records)
    assert (tmp_path / "run" / "results.csv").exists()


@pytest.mark.slow
def test_resume_merges_records_that_jobs_wrote_after_the_parent_stopped(tmp_path):
    suite = _suite(["naive"], seq_len="[32, 48]")
    first = run_suite(suite, tmp_path / "run")
    records = read_records(tmp_path / "run")
    # As if the parent died after recording the first case while a job had also finished the second.
    (tmp_path / "run" / "results.jsonl").write_text(json.dumps(records[0].as_dict()) + "\n")
    shards = tmp_path / "run" / "shards"
    shards.mkdir()
    lines = "".join(json.dumps(r.as_dict()) + "\n" for r in records)
    (shards / "20260101T000000-000.jsonl").write_text(lines + '{"torn": ')
    resumed = run_suite(suite, resume=tmp_path / "run")
    again = read_records(tmp_path / "run")
    assert [r["case_id"] for r in again] == [r["case_id"] for r in first.records]
    assert again[1]["time_s"] == records[1]["time_s"]  # merged, not measured again
    assert len(resumed.records) == 2
    with RunFolder(tmp_path / "run") as folder:
        assert merge_shards(tmp_path / "run", folder) == 0  # idempotent


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--executor-option", "slurm_partition"], "expected KEY=VALUE"),
        (["--executor-option", "cluster=mars"], "allowed values are local, slurm"),
        (["--executor-option", "cluster=local", "--executor-option", "no_such_parameter=1"], "no_such_parameter"),
        (["--workers", "0"], "at least 1"),
        (["--executor", "local", "--executor-option", "cluster=local"], "not to the local executor"),
        (["--executor", "ray", "--executor-option", "partition=gpu"], "ray takes address, num_cpus, num_gpus"),
        (["--executor", "ray", "--executor-option", "num_gpus=1"], "the Ray cluster has 0"),
    ],
)
@pytest.mark.slow
def test_bad_executor_options_exit_2_with_a_message(tmp_path, args, message):
    suite = tmp_path / "s.yaml"
    suite.write_text(suite_text(["naive"]))
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(suite), "--out", str(tmp_path / "r")]
        + (args if "--executor" in args else ["--executor", "submitit", *args]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_slurm_job_asks_for_one_gpu_the_cores_and_the_time_its_cases_need(tmp_path, monkeypatch):
    from harness.executors import _executor

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun before it builds jobs
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    text = suite_text(["naive", "sdpa"], seq_len="[32, 64]").replace("threads: [1]}", "threads: [4], device: [cuda]}")
    suite = parse_suite(yaml.safe_load(text + "limits: {timeout_s: 600}\n"), "t.yaml")
    cases = expand(suite)
    engine = _executor(tmp_path, {"cluster": "slurm", "slurm_partition": "gpu"}, cases, shard_cases(cases, 2), suite)
    script = engine._executor._make_submission_file_text("python -m job", "uid")
    for line in ("--gpus-per-node=1", "--cpus-per-task=4", "--partition=gpu", "--time=30", "--job-name=harness-t"):
        assert f"#SBATCH {line}\n" in script, line


def test_option_values_are_read_as_yaml():
    assert parse_options(["timeout_min=90", "slurm_partition=gpu", "cluster=local"]) == {
        "timeout_min": 90,
        "slurm_partition": "gpu",
        "cluster": "local",
    }
