"""Suite files: the schema (schema.py), the hardened YAML loader with errors that point at lines
(loader.py), and the expansion of a sweep into cases (expand.py).
"""

from __future__ import annotations

from harness.registry import name_matches
from harness.shapes import PARAM_AXES, Case, Params, case_id
from harness.suite.expand import check_only, expand, quick_version
from harness.suite.loader import MAX_CASES, load_suite, parse_suite, parse_text
from harness.suite.schema import ExcludeRule, Limits, Range, Suite, Sweep, Timing

__all__ = [
    "MAX_CASES",
    "PARAM_AXES",
    "Case",
    "ExcludeRule",
    "Limits",
    "Params",
    "Range",
    "Suite",
    "Sweep",
    "Timing",
    "case_id",
    "check_only",
    "expand",
    "load_suite",
    "name_matches",
    "parse_suite",
    "parse_text",
    "quick_version",
]
