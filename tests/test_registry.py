from __future__ import annotations

import sys
import textwrap

import pytest

from harness import registry
from harness.errors import InputError
from harness.variants import VARIANTS

REQUIRED = {"naive", "sdpa", "sdpa.math", "sdpa.flash", "sdpa.efficient", "sdpa.cudnn", "memory_efficient", "chunked"}


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "attention_gate"])
def test_every_dot_product_variant_has_the_required_implementations(variant):
    assert set(registry.names(variant)) >= REQUIRED


def test_attention_gate_has_naive_fused_and_chunked():
    assert {"naive", "fused", "chunked"} <= set(registry.names("attention_gate"))


def test_implementation_fields_follow_the_design():
    impl = registry.get("multi_head", "memory_efficient")
    assert (impl.name, impl.variant, impl.exact) == ("memory_efficient", "multi_head", True)
    assert callable(impl.fn) and impl.summary
    ok, why = impl.available()
    assert ok and why == ""


def test_unknown_implementation_suggests_the_closest_name():
    with pytest.raises(InputError, match=r"Did you mean 'memory_efficient'\?") as info:
        registry.get("multi_head", "memory_eficient")
    assert "naive" in str(info.value)  # lists the known names too


def test_unknown_variant_suggests_the_closest_name():
    with pytest.raises(InputError, match="Did you mean 'causal'"):
        registry.implementations("casual")


def test_unavailable_backend_says_why():
    impl = registry.get("multi_head", "sdpa.cudnn")
    ok, why = impl.available("cpu", "float32")
    assert not ok and "cpu" in why


def test_availability_of_a_pinned_backend_depends_on_the_case():
    flash = registry.get("multi_head", "sdpa.flash")
    assert flash.available("cpu", "float32")[0]
    assert not flash.available("cuda", "float16")[0] or flash.available("cuda", "float16")[1] == ""


def test_register_rejects_unknown_variant():
    with pytest.raises(InputError, match="unknown variant"):
        registry.register("x", variants=("self_atention",))


def test_a_broken_availability_check_reports_instead_of_raising():
    def boom(**_):
        raise RuntimeError("driver exploded")

    impl = registry.Implementation("x", "multi_head", fn=lambda *a, **k: None, check=boom)
    ok, why = impl.available("cpu", "float32")
    assert not ok and "driver exploded" in why


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """A real installed distribution (module + dist-info with an entry point) on sys.path."""
    (tmp_path / "toy_attention.py").write_text(
        textwrap.dedent('''
        from harness import register
        from implementations.naive import naive

        @register("toy", variants=("multi_head",))
        def toy(q, k, v, *, causal=False, scale=None, mask=None):
            """A third-party kernel that delegates to naive."""
            return naive(q, k, v, causal=causal, scale=scale, mask=mask)
    ''')
    )
    (tmp_path / "broken_attention.py").write_text("raise ImportError('missing dependency xyz')\n")
    info = tmp_path / "toy_attention-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-attention\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[harness.implementations]\ntoy = toy_attention\nbroken = broken_attention\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reload()
    yield
    monkeypatch.undo()
    for name in ("toy_attention", "broken_attention"):
        sys.modules.pop(name, None)
    registry.reload()


def test_entry_point_plugins_register_their_implementations(plugin_on_path):
    impl = registry.get("multi_head", "toy")
    assert impl.summary == "A third-party kernel that delegates to naive."
    assert impl.source == "toy_attention"


def test_a_broken_plugin_is_reported_and_does_not_hide_the_others(plugin_on_path):
    assert "missing dependency xyz" in registry.load_errors()["broken"]
    assert "toy" in registry.names("multi_head")


def test_every_dot_product_kernel_has_the_attention_kernel_signature():
    from harness.registry import signature_problems
    from harness.variants import DOT_PRODUCT_VARIANTS

    problems = {
        f"{impl.variant}/{impl.name}": signature_problems(impl.fn)
        for variant in DOT_PRODUCT_VARIANTS
        for impl in registry.implementations(variant)
    }
    assert problems and not any(problems.values()), {k: v for k, v in problems.items() if v}


def test_the_signature_check_names_what_departs():
    from harness.registry import signature_problems

    def wrong(q, k, v, mask=None, *, causal):
        return q

    problems = signature_problems(wrong)
    assert "no keyword-only parameter 'mask'" in problems
    assert "keyword 'causal' has no default" in problems
    assert "no keyword-only parameter 'scale'" in problems
