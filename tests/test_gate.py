"""The gate on a real git repository: each side measures its own tree, and a large slow-down is caught.

The repository holds only an `implementations` package with one kernel whose speed is a constant
in its source; base and head commits differ in that constant, as a pull request would. The gate's
statistics (A/A never fails, 25% is always caught) are tested on synthetic samples with known noise
in tests/test_compare.py; its power on real timings is a benchmark with figures, tools/gate_power.py,
because on a shared 2-core machine a neighbour's load can hide a 25% change in any one run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.compare import NOISE, SLOWER
from harness.gate import gate

pytestmark = pytest.mark.xdist_group("gate")  # the gate's runs pin cores: one gate at a time

ROOT = Path(__file__).resolve().parents[1]

KERNEL = '''
import random
import time

import torch

from harness import register

SLOWDOWN = {slowdown}   # extra time as a fraction of the kernel's own time
ROUND_NOISE = {noise}   # random extra time that changes every few calls (noise between rounds)
_state = {{"calls": 0, "extra": 0.0}}
_noise = random.Random(0)  # seeded: each worker draws the same noise sequence, run after run


@register("tunable", variants=("multi_head",))
def tunable(q, k, v, *, causal=False, scale=None, mask=None):
    """SDPA, then a spin for SLOWDOWN (plus noise) times its own duration."""
    start = time.perf_counter()
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if _state["calls"] % 8 == 0:  # noise blocks shorter than a round, several per round
        _state["extra"] = ROUND_NOISE * _noise.random()
    _state["calls"] += 1
    spent = time.perf_counter() - start
    deadline = start + spent * (1 + SLOWDOWN + _state["extra"])
    while time.perf_counter() < deadline:
        pass
    return out
'''

SUITE = textwrap.dedent("""\
    name: gate-test
    variants: [multi_head]
    implementations: [tunable]
    sweep: {batch: [1], heads: [4], seq_len: [256], head_dim: [64], threads: [1]}
    measure: [time]
    timing: {warmup: 1, min_time_s: 0.35, min_samples: 14, max_time_s: 2, min_sample_time_s: 0}
    """)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, slowdown: float, noise: float = 0.0) -> str:
    (repo / "implementations" / "tunable.py").write_text(KERNEL.format(slowdown=slowdown, noise=noise))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", f"slowdown {slowdown}, noise {noise}")
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    (repo / "implementations").mkdir(parents=True)
    (repo / "implementations" / "__init__.py").write_text("")
    (repo / "suite.yaml").write_text(SUITE)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    return repo


def _run(repo: Path, base: str, head: str, out: Path):
    comparisons, _ = gate(str(repo / "suite.yaml"), base, head, repo=str(repo), out_dir=str(out), rounds=15)
    assert len(comparisons) == 1
    return comparisons[0]


@pytest.mark.slow
def test_a_threefold_slowdown_is_caught_end_to_end(repo, tmp_path):
    # A 3x slow-down: no neighbour's load on a shared machine makes paired rounds hide it.
    base = _commit(repo, 0.0)
    slow = _commit(repo, 2.0)
    caught = _run(repo, base, slow, tmp_path / "ab")
    assert caught.verdict == SLOWER and caught.ratio > 2.0, (caught.verdict, caught.ratio, caught.ci_low)


@pytest.mark.slow
def test_a_5_percent_change_under_larger_noise_is_same_within_noise(repo, tmp_path):
    base = _commit(repo, 0.0, noise=1.5)
    head = _commit(repo, 0.05, noise=1.5)
    verdicts = [_run(repo, base, head, tmp_path / f"n{i}") for i in range(3)]
    assert not any(c.regression for c in verdicts)
    assert [c.verdict for c in verdicts].count(NOISE) >= 2, [(c.verdict, c.ratio, c.ci_low) for c in verdicts]


@pytest.mark.slow
def test_each_side_measures_its_own_tree_and_worktrees_are_removed(repo, tmp_path):
    base = _commit(repo, 0.0)
    head = _commit(repo, 0.25)
    _run(repo, base, head, tmp_path / "g")
    from harness.results import read_records

    base_source = read_records(tmp_path / "g" / "base")[0]["source_file"]
    head_source = read_records(tmp_path / "g" / "head")[0]["source_file"]
    assert "harness-gate-" in base_source and "harness-gate-" in head_source and base_source != head_source
    assert _git(repo, "worktree", "list").count("\n") == 0  # only the main worktree is left


@pytest.mark.slow
def test_cli_gate_with_an_unknown_ref_exits_2(repo):
    _commit(repo, 0.0)
    done = subprocess.run(
        [sys.executable, "-m", "harness", "gate", "suite.yaml", "--base", "no-such-ref"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "no-such-ref" in done.stderr and "Traceback" not in done.stderr
