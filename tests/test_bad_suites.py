"""Hostile suite files: each is one clear error (file, key, line, allowed values), exit 2, no traceback,
nothing executed; and random YAML never escapes the loader as anything but that one error type."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import InputError
from harness.suite import PARAM_AXES, Suite, load_suite, parse_text

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "tests" / "data" / "bad_suites").iterdir())


def test_the_corpus_has_at_least_40_hostile_files():
    assert len(BAD) >= 40


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_each_hostile_file_is_one_clear_input_error_naming_the_file(path):
    with pytest.raises(InputError) as info:
        load_suite(path)
    message = str(info.value)
    assert str(path) in message
    assert "Traceback" not in message and len(message) < 2000


KEY_HINTS = {
    "03_misspelt_axis.yaml": ["'sweep.haeds'", "Did you mean 'heads'", ":3:"],
    "13_unknown_variant.yaml": ["did you mean 'multi_head'", "allowed: self_attention"],
    "14_unknown_implementation.yaml": ["Did you mean 'sdpa.flash'", "implementations[1]", "memory_efficient"],
    "15_unknown_dtype.yaml": ["sweep.dtype[0]", "'bfloat16'"],
    "17_duplicate_key.yaml": ["duplicate key 'sweep'", ":4:"],
    "24_alias_bomb.yaml": ["alias bomb"],
    "41_bad_exclude_key.yaml": ["Did you mean 'seq_len'", "exclude[0]"],
    "42_bad_exclude_range.yaml": ["Allowed keys here: gt, ge, lt, le"],
}


@pytest.mark.parametrize("name", KEY_HINTS)
def test_messages_name_the_key_the_line_and_what_is_allowed(name):
    with pytest.raises(InputError) as info:
        load_suite(ROOT / "tests" / "data" / "bad_suites" / name)
    for hint in KEY_HINTS[name]:
        assert hint in str(info.value)


def test_an_oversized_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: big\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(InputError, match="at most"):
        load_suite(path)


@pytest.mark.slow
def test_the_cli_exits_2_on_every_hostile_file_without_traceback_or_side_effects(tmp_path):
    marker = Path("/tmp/harness-pwned")
    marker.unlink(missing_ok=True)
    env = dict(os.environ)
    for path in BAD:
        done = subprocess.run(
            [sys.executable, "-m", "harness", "run", str(path), "--out", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env=env,
        )
        assert done.returncode == 2, (path.name, done.stdout, done.stderr)
        assert path.name in done.stderr and "Traceback" not in done.stderr, (path.name, done.stderr)
    assert not marker.exists()  # the !!python/object file executed nothing
    assert not (tmp_path / "out").exists()  # nothing was measured or written


VALID = """\
name: ok
variants: [multi_head]
sweep: {seq_len: [128]}
"""

KEYS = [
    "name",
    "variants",
    "implementations",
    "sweep",
    "measure",
    "timing",
    "limits",
    "exclude",
    "quick",
    "seed",
    *PARAM_AXES,
    "warmup",
    "min_time_s",
    "timeout_s",
    "memory_gib",
    "gt",
    "reason",
    "bogus",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["multi_head", "float32", "cpu", "all", "naive", "time"]),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=6)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_yaml_documents_are_accepted_or_one_clear_error(document):
    try:
        text = yaml.safe_dump(document)
    except yaml.YAMLError:
        return
    try:
        assert isinstance(parse_text(text, "random.yaml"), Suite)
    except InputError as exc:
        assert "random.yaml" in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_is_accepted_or_one_clear_error(text):
    try:
        parse_text(text, "text.yaml")
    except InputError as exc:
        assert "text.yaml" in str(exc)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(list(PARAM_AXES)), st.lists(scalars, max_size=3), max_size=5))
def test_random_sweeps_on_a_valid_suite_are_accepted_or_one_clear_error(sweep):
    data = yaml.safe_load(VALID)
    data["sweep"] = {"seq_len": [128], **sweep}
    try:
        parse_text(yaml.safe_dump(data), "sweep.yaml")
    except InputError as exc:
        assert "sweep.yaml" in str(exc)


SHIPPED = sorted((ROOT / "suites").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_suite_loads_and_expands(path):
    from harness.suite import expand, quick_version

    suite = load_suite(path)
    assert expand(suite) and expand(quick_version(suite))


def test_the_cuda_suite_is_skipped_with_its_reason_on_a_machine_without_cuda():
    import torch

    from harness.machine import skip_reason
    from harness.suite import expand

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the cases would run")
    cases = expand(load_suite(ROOT / "suites" / "self_attn_cuda.yaml"))
    assert {c.params.device for c in cases} == {"cuda"}
    assert {c.params.dtype for c in cases} == {"float16", "bfloat16"}
    assert {skip_reason(c) or "runs" for c in cases} <= {"no CUDA device on this machine"} | {
        c.skip_reason for c in cases if c.skip_reason
    }
