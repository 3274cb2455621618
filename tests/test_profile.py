"""profile: traces for TensorBoard and Perfetto, top operators in profile.json and in the report."""

from __future__ import annotations

import json

import pytest

from harness.errors import InputError
from harness.profile import profile_suite
from harness.report import write_report
from tests.conftest import suite_text


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(suite_text(["naive", "memory_efficient"], seq_len="[64]"))
    return path


def test_profile_writes_tensorboard_and_chrome_traces_and_top_operators(suite_file, tmp_path):
    out = profile_suite(str(suite_file), ["multi_head/naive/b1-h2-n64-d16-float32-cpu-t1"], str(tmp_path / "p"))
    (entry,) = json.loads((out / "profile.json").read_text())
    assert entry["status"] == "ok"
    names = [op["name"] for op in entry["top_operators"]]
    assert any("softmax" in n for n in names) and any("bmm" in n or "matmul" in n for n in names)
    trace = json.loads((out / entry["chrome_trace"]).read_text())
    assert trace["traceEvents"]
    assert list((out / entry["tensorboard_dir"]).glob("*.pt.trace.json"))


@pytest.mark.slow
def test_profiles_of_a_run_folder_appear_in_its_report(suite_file, tmp_path):
    from harness.runner import run_suite
    from harness.suite import load_suite

    run = tmp_path / "run"
    run_suite(load_suite(suite_file), run)
    profile_suite(str(suite_file), ["multi_head/memory_efficient/b1-h2-n64-d16-float32-cpu-t1"], str(run))
    html = write_report(run).read_text()
    assert "Profiles: top operators by self time" in html and "aten::" in html


def test_an_unknown_case_id_is_a_clear_error(suite_file, tmp_path):
    with pytest.raises(InputError, match="Did you mean"):
        profile_suite(str(suite_file), ["multi_head/naive/b1-h2-n64-d16-float32-cpu"], str(tmp_path / "p"))
