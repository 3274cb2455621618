"""compare: verdicts from stored samples; significance and threshold must both hold for "slower"."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.compare import (
    FASTER,
    INACCURATE,
    MAYBE_SLOWER,
    NEW_FAILURE,
    NOISE,
    SLOWER,
    SMALL,
    compare_case,
    compare_runs,
    markdown,
)
from harness.results import SCHEMA_VERSION, RunFolder, new_record
from harness.timing import TimingStats

ROOT = Path(__file__).resolve().parents[1]


def record(samples, status="ok", accurate=True, case="multi_head/x/1", memory=1000, rounds=None) -> dict:
    samples = list(samples)
    time_s = TimingStats.from_samples(samples, mode="wall").as_record() if samples else None
    if rounds is not None and time_s is not None:
        time_s["round_medians"] = list(rounds)
    return new_record(
        "s",
        "multi_head",
        "x",
        case,
        {},
        status=status,
        time_s=time_s if status == "ok" else None,
        accurate=accurate,
        peak_memory_bytes=memory,
        reason="" if status == "ok" else "boom",
    )


def noisy(mean: float, sd: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, sd, n).clip(min=mean * 0.2)


def test_a_clear_25_percent_slowdown_is_slower():
    c = compare_case(record(noisy(1.0, 0.02, 30, 1)), record(noisy(1.25, 0.02, 30, 2)))
    assert c.verdict == SLOWER and c.regression
    assert c.ratio == pytest.approx(1.25, rel=0.02) and c.ci_low > 1.2


def test_a_5_percent_change_within_larger_noise_is_same_within_noise():
    c = compare_case(record(noisy(1.0, 0.15, 8, 3)), record(noisy(1.05, 0.15, 8, 4)))
    assert c.verdict == NOISE and not c.regression
    assert c.ci_low < 1 < c.ci_high


def test_a_significant_change_below_the_threshold_is_not_a_regression():
    c = compare_case(record(noisy(1.0, 0.001, 50, 5)), record(noisy(1.02, 0.001, 50, 6)), threshold=0.05)
    assert c.verdict == SMALL and not c.regression and c.ci_low > 1


def test_a_slowdown_not_confidently_beyond_the_threshold_is_only_possibly_slower():
    c = compare_case(record(noisy(1.0, 0.05, 12, 2)), record(noisy(1.08, 0.05, 12, 3)), threshold=0.05)
    assert c.ci_low > 1 and c.ci_low < 1.05 < c.ratio
    assert c.verdict == MAYBE_SLOWER and not c.regression


def test_faster_is_reported_as_faster():
    assert compare_case(record(noisy(1.0, 0.01, 20, 7)), record(noisy(0.7, 0.01, 20, 8))).verdict == FASTER


def test_paired_round_medians_cancel_drift_shared_by_both_sides():
    drift = np.linspace(1.0, 1.6, 9)  # the machine slowed down 60% during the gate
    base = record(drift, rounds=drift)
    new = record(drift * 1.25, rounds=drift * 1.25)
    c = compare_case(base, new)
    assert c.verdict == SLOWER and c.ratio == pytest.approx(1.25) and c.ci_low == pytest.approx(1.25)
    aa = compare_case(base, record(drift * 1.001, rounds=drift * 1.001))
    assert not aa.regression


def test_one_disturbed_round_does_not_hide_a_slowdown():
    base = np.ones(9)
    new = np.full(9, 1.25)
    new[4] = 0.6  # another process stole the CPU from base... or from head, in one round
    c = compare_case(record(base, rounds=base), record(new, rounds=new))
    assert c.verdict == SLOWER and c.ci_low == pytest.approx(1.25)


def test_a_case_that_newly_fails_or_becomes_inaccurate_is_a_regression():
    ok = record([1.0, 1.0, 1.0])
    assert compare_case(ok, record([], status="crash")).verdict == NEW_FAILURE
    assert compare_case(ok, record([1.0, 1.0, 1.0], accurate=False)).verdict == INACCURATE


def test_markdown_leads_with_the_verdict_and_lists_regressions():
    comparisons = compare_runs([record(noisy(1.0, 0.01, 20, 9))], [record(noisy(1.3, 0.01, 20, 10))])
    text = markdown(comparisons, 0.05)
    assert text.startswith("### Attention harness benchmark: ❌ regression")
    assert re.search(r"\| slower \| `multi_head/x/1` \| \+(2[89]|3[012])\.\d%", text)


def _write(folder: Path, records: list[dict]) -> None:
    with RunFolder(folder) as run:
        for r in records:
            run.append(r)


def _compare_cli(tmp_path: Path) -> subprocess.CompletedProcess:
    """`harness compare a b --markdown pr.md` in tmp_path, as a user runs it."""
    args = ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--markdown", str(tmp_path / "pr.md")]
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize(("new_mean", "code"), [(1.0, 0), (1.3, 1)])
def test_cli_compare_exits_1_only_on_a_regression(tmp_path, new_mean, code):
    _write(tmp_path / "a", [record(noisy(1.0, 0.01, 20, 11))])
    _write(tmp_path / "b", [record(noisy(new_mean, 0.01, 20, 12))])
    done = _compare_cli(tmp_path)
    assert done.returncode == code, done.stderr
    assert (tmp_path / "pr.md").read_text().startswith("### Attention harness benchmark")


def _gate_rounds(slowdown: float, seed: int, rounds: int = 15) -> tuple[dict, dict]:
    """Paired rounds as the gate measures them: drift shared by both sides, 5% noise per measurement,
    and now and then a round that a neighbour disturbed on one side only."""
    rng = np.random.default_rng(seed)
    drift = 1 + 0.3 * rng.random(rounds)
    base = drift * rng.normal(1.0, 0.05, rounds)
    new = drift * (1 + slowdown) * rng.normal(1.0, 0.05, rounds)
    disturbed = rng.random(rounds) < 0.1
    new[disturbed] *= 1.8
    return record(base, rounds=base), record(new, rounds=new)


def test_a_a_gates_with_known_noise_never_fail():
    verdicts = [compare_case(*_gate_rounds(0.0, seed)) for seed in range(200)]
    assert not any(c.regression for c in verdicts)


def test_25_percent_slowdowns_with_known_noise_are_always_caught():
    verdicts = [compare_case(*_gate_rounds(0.25, seed)) for seed in range(200)]
    assert all(c.verdict == SLOWER for c in verdicts), [c.ci_low for c in verdicts if c.verdict != SLOWER]
    assert all(1.15 < c.ratio < 1.4 for c in verdicts)  # the disturbed rounds may lift the median a little


@pytest.mark.slow
def test_differing_environments_are_stated_before_the_verdicts(tmp_path):
    import json

    _write(tmp_path / "a", [record(noisy(1.0, 0.01, 20, 11))])
    _write(tmp_path / "b", [record(noisy(1.0, 0.01, 20, 12))])
    (tmp_path / "a" / "env.json").write_text(json.dumps({"cpu": "AMD EPYC", "torch": "2.13.0", "gpus": []}))
    (tmp_path / "b" / "env.json").write_text(json.dumps({"cpu": "AMD EPYC", "torch": "2.14.1", "gpus": []}))
    done = _compare_cli(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "different environments" in done.stderr and "torch: '2.13.0' (base) vs '2.14.1' (new)" in done.stderr
    assert "environments differ" in (tmp_path / "pr.md").read_text()


def test_records_written_before_schema_versions_still_compare(tmp_path):
    import json

    old = {k: v for k, v in record(noisy(1.0, 0.01, 20, 13)).as_dict().items() if k != "schema_version"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.jsonl").write_text(json.dumps(old) + "\n")
    _write(tmp_path / "new", [record(noisy(1.3, 0.01, 20, 14))])
    from harness.results import read_records

    (loaded,) = read_records(tmp_path / "old")
    assert loaded.schema_version == SCHEMA_VERSION and loaded.status == "ok"  # migrated from version 1
    (c,) = compare_runs(read_records(tmp_path / "old"), read_records(tmp_path / "new"))
    assert c.verdict == SLOWER
