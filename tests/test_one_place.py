"""One place per fact: axes declared once (ids, schema, report keys derive from them), typed records with
a history, one cache folder, the allocator regime on record."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from harness.results import SCHEMA_VERSION, Outcome, Record
from harness.shapes import AXES, PARAM_AXES, SHAPE_KEYS, Params, case_id
from harness.suite.schema import ExcludeRule, Sweep


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # Ids as the harness wrote them before axes were declared: they must not change.
        (Params(), "multi_head/x/b1-h1-n128-d64-float32-cpu"),
        (
            Params(batch=2, heads=32, kv_heads=8, seq_len=4, seq_len_kv=4096, head_dim=128, dtype="bfloat16"),
            "multi_head/x/b2-h32g8-n4-kv4096-d128-bfloat16-cpu",
        ),
        (
            Params(heads=8, kv_heads=8, seq_len=1024, threads=2, causal=True, direction="fwd_bwd", device="cuda:1"),
            "multi_head/x/b1-h8-n1024-d64-float32-cuda:1-t2-causal-fwd_bwd",
        ),
    ],
)
def test_case_ids_of_existing_cases_do_not_change(params, expected):
    assert case_id("multi_head", "x", params) == expected


def test_every_axis_is_a_sweep_key_an_exclude_key_and_a_shape_key():
    for axis in PARAM_AXES:
        assert axis in Sweep.model_fields and axis in ExcludeRule.model_fields and axis in SHAPE_KEYS
    assert set(AXES) == set(Params.__dataclass_fields__)


def test_a_sweep_validates_an_axis_by_its_declaration():
    with pytest.raises(ValidationError):
        Sweep(seq_len=[0])
    with pytest.raises(ValidationError, match="allowed: cpu, cuda, cuda:N, mps"):
        Sweep(seq_len=[8], device=["tpu"])
    assert Sweep(seq_len=[8, 16], heads=[2]).size() == 2


def test_a_misspelt_measured_key_fails_where_it_is_written():
    with pytest.raises(ValidationError, match="tflop"):
        Outcome(tflop=1.0)
    with pytest.raises(ValidationError, match="medain"):
        Outcome(time_s={"medain": 1.0, "iqr": 0, "min": 1, "mean": 1, "n": 1})


def test_a_version_2_record_migrates_with_every_axis_in_its_params():
    old = {"schema_version": 2, "case_id": "c", "params": {"batch": 2, "seq_len": 64}, "status": "ok"}
    record = Record.model_validate(old)
    assert record.schema_version == SCHEMA_VERSION
    assert record.params["direction"] == "fwd" and record.params["kv_heads"] is None and record.params["batch"] == 2


def test_a_record_from_a_newer_harness_is_refused():
    with pytest.raises(ValidationError, match="newer harness"):
        Record.model_validate({"schema_version": SCHEMA_VERSION + 1, "case_id": "c"})


def test_tuned_tiles_go_to_the_cache_folder_never_the_current_one(tmp_path, monkeypatch):
    import implementations.memory_efficient as me

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_TILES", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(me, "tune_tiles", lambda: ((512, 256), {(512, 256): 0.01}))
    me.cpu_tiles.cache_clear()
    try:
        assert me.cpu_tiles(2) == (512, 256)
    finally:
        me.cpu_tiles.cache_clear()
    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.parts[0] == "cache" for p in written), written


def test_the_allocator_regime_is_on_record_and_default_sets_nothing(monkeypatch):
    from harness.worker import ALLOCATOR_ENV, allocator_env, allocator_settings

    for key in ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    assert allocator_env("default") == {} and allocator_env("fixed") == ALLOCATOR_ENV
    assert allocator_settings("default") == {"regime": "default", "glibc_env": {}}  # env.json's `allocator`
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1")  # a user's own setting wins
    assert allocator_env("fixed") == {"MALLOC_TRIM_THRESHOLD_": ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"]}
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "1"
