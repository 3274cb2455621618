"""From a validated suite to its cases: the sweep's product per variant and implementation, exclusions
applied, and implementation names matched as shell-style patterns (`sdpa.*`, `compiled.*`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from harness.errors import InputError
from harness.registry import known_names, name_matches, unknown_pattern
from harness.shapes import Case, Params
from harness.suite.loader import parse_suite
from harness.suite.schema import QuickOverrides, Suite


def check_only(suite: Suite, only: Iterable[str]) -> None:
    """--only names (or patterns) must match an implementation of the suite's variants."""
    from harness.tasks import variant_of

    variants = [*suite.variants, *(variant_of(t) for t in suite.tasks)]
    for name in only:
        problem = unknown_pattern(name, variants)
        if problem:
            raise InputError(f"--only: {problem}")


def quick_version(suite: Suite) -> Suite:
    """The suite as `--quick` runs it: few sizes and short timing."""
    overrides = suite.quick or QuickOverrides()
    sweeps = []
    for sweep in suite.sweeps:
        if overrides.sweep:
            sweeps.append(sweep.model_copy(update=overrides.sweep))
            continue
        small = sorted(n for n in sweep.seq_len if n <= 1024) or [min(sweep.seq_len)]
        picked = sorted({small[0], small[len(small) // 2], small[-1]})
        sweeps.append(sweep.model_copy(update={"seq_len": picked}))
    timing = suite.timing.model_copy(
        update={"warmup": 1, "min_time_s": 0.05, "min_samples": 3, "max_time_s": 1.0} | overrides.timing
    )
    quick = suite.model_copy(update={"sweep": sweeps, "timing": timing})
    # The implementations were checked when the suite was loaded (perhaps against another tree's
    # registry); re-validating holds the file's `quick` overrides to the same schema and rules.
    return parse_suite(quick.model_dump(), f"{suite.name} (--quick)", check_implementations=False)


def chosen(
    suite: Suite, variant: str, only: Iterable[str] = (), names: dict[str, list[str]] | None = None
) -> list[str]:
    """The suite's implementations of `variant` that exist, narrowed by --only (names or patterns)."""
    only = list(only)
    known = known_names(variant, names)
    picked = known if suite.implementations == "all" else [n for n in known if name_matches(n, suite.implementations)]
    if suite.implementations != "all":
        # An explicit list keeps its order (a pattern expands in place, in name order).
        order = {n: i for i, n in enumerate(suite.implementations)}
        picked = sorted(picked, key=lambda n: next((order[p] for p in order if name_matches(n, [p])), len(order)))
    return [n for n in picked if not only or name_matches(n, only)]


def expand(suite: Suite, only: Iterable[str] | None = None, names: dict[str, list[str]] | None = None) -> list[Case]:
    """All cases of a suite, grouped so that implementations of one shape run back to back.

    `names` gives the implementations per variant (default: this process's registry; the gate
    passes those of the trees it compares).
    """
    from harness.tasks import variant_of
    from harness.variants import VARIANTS

    only = list(only or [])
    cases: dict[str, Case] = {}
    for sweep in suite.sweeps:
        for point in sweep.points():
            for variant in suite.variants_of(sweep):
                params = VARIANTS[variant].normalize(point)
                for name in chosen(suite, variant, only, names):
                    case = Case(suite.name, variant, name, params)
                    rule = next((r for r in suite.exclude if r.matches(variant, name, params)), None)
                    if rule is not None:
                        case = replace(case, skip_reason=rule.describe())
                    cases.setdefault(case.case_id, case)
    for task in suite.tasks:
        variant = variant_of(task)
        for name in chosen(suite, variant, only, names):
            case = Case(suite.name, variant, name, Params(), task=task)
            cases.setdefault(case.case_id, case)
    return list(cases.values())
