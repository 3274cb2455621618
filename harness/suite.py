"""Suite files: a pydantic schema, a strict YAML loader, and expansion of the sweep into cases.

Every problem with a suite file is one InputError naming the file, the key (with its line where
YAML knows it) and what is allowed, so the CLI can exit 2 without a traceback.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import InputError, closest
from harness.variants import VARIANTS, Params

MAX_CASES = 100_000
MAX_FILE_BYTES = 1 << 20
MAX_ALIASES = 100
# Aliases make a YAML tree a graph; this bounds the tree it stands for (the "billion laughs").
MAX_EXPANDED_NODES = 100_000
DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")
PARAM_AXES = ("batch", "heads", "seq_len", "seq_len_kv", "head_dim", "dtype", "device", "threads", "causal")

Positive = Annotated[int, Field(strict=True, gt=0, le=1 << 24)]
DType = Literal["float32", "bfloat16", "float16", "float64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sweep(_Strict):
    """Axes of a sweep; every axis is a non-empty list and the cases are their product."""

    batch: list[Positive] = Field(default=[1], min_length=1)
    heads: list[Positive] = Field(default=[1], min_length=1)
    seq_len: list[Positive] = Field(min_length=1)
    seq_len_kv: list[Positive | None] = Field(default=[None], min_length=1)
    head_dim: list[Positive] = Field(default=[64], min_length=1)
    dtype: list[DType] = Field(default=["float32"], min_length=1)
    device: list[str] = Field(default=["cpu"], min_length=1)
    threads: list[Annotated[int, Field(strict=True, gt=0, le=1024)] | None] = Field(default=[None], min_length=1)
    causal: list[Annotated[bool, Field(strict=True)]] = Field(default=[False], min_length=1)

    @field_validator("device")
    @classmethod
    def _known_devices(cls, devices: list[str]) -> list[str]:
        for device in devices:
            if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
                raise ValueError(f"unknown device {device!r}; allowed: cpu, cuda, cuda:N, mps")
        return devices

    def size(self) -> int:
        return math.prod(len(getattr(self, axis)) for axis in PARAM_AXES)


class Timing(_Strict):
    """How long to measure each case (see harness.timing)."""

    warmup: int = Field(default=2, ge=1, le=1000)
    min_time_s: float = Field(default=0.5, gt=0, le=600)
    min_samples: int = Field(default=5, ge=1, le=100_000)
    max_samples: int = Field(default=500, ge=1, le=1_000_000)
    max_time_s: float = Field(default=10.0, gt=0, le=3600)
    min_sample_time_s: float = Field(default=0.002, ge=0, le=10)
    flush_l2: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> Timing:
        if self.max_samples < self.min_samples:
            raise ValueError(f"max_samples ({self.max_samples}) must be >= min_samples ({self.min_samples})")
        if self.max_time_s < self.min_time_s:
            raise ValueError(f"max_time_s ({self.max_time_s}) must be >= min_time_s ({self.min_time_s})")
        return self


class Limits(_Strict):
    """Per-case limits: a case past them is recorded as `timeout` or `oom` and the sweep goes on."""

    timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    memory_gib: float | None = Field(default=None, gt=0, le=1 << 20)


class Range(_Strict):
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def matches(self, value: Any) -> bool:
        if value is None:
            return False
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )


Scalar = str | int | float | bool | None
Condition = Range | list[Scalar] | Scalar


class ExcludeRule(_Strict):
    """Cases matching every given key are skipped (and recorded as skipped, with the reason)."""

    variant: list[str] | str | None = None
    implementation: list[str] | str | None = None
    batch: Condition = None
    heads: Condition = None
    seq_len: Condition = None
    seq_len_kv: Condition = None
    head_dim: Condition = None
    dtype: list[str] | str | None = None
    device: list[str] | str | None = None
    threads: Condition = None
    causal: bool | None = None
    reason: str = ""

    def matches(self, variant: str, implementation: str, params: Params) -> bool:
        values = params.as_dict() | {"variant": variant, "implementation": implementation}
        for key in ("variant", "implementation", *PARAM_AXES):
            want = getattr(self, key)
            if want is None:
                continue
            have = values[key]
            if isinstance(want, Range):
                if not want.matches(have):
                    return False
            elif isinstance(want, list):
                if have not in want:
                    return False
            elif have != want:
                return False
        return True

    def describe(self) -> str:
        if self.reason:
            return self.reason
        parts = [f"{k}={v}" for k, v in self.model_dump(exclude_none=True, exclude={"reason"}).items()]
        return "excluded by the suite: " + ", ".join(parts)


class QuickOverrides(_Strict):
    """What `--quick` changes; without this block: seq_len <= 1024 (at most 3 sizes), short timing."""

    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    timing: dict[str, Any] = Field(default_factory=dict)


Measure = Literal["time", "memory", "accuracy"]


def _known(kind: str, names: list[str], allowed: Iterable[str]) -> list[str]:
    """Validator body: every name must be one of `allowed`; say which is closest when not."""
    allowed = list(allowed)
    for name in names:
        if name not in allowed:
            hint = closest(name, allowed)
            did = f" (did you mean {hint!r}?)" if hint else ""
            raise ValueError(f"unknown {kind} {name!r}{did}; allowed: {', '.join(allowed)}")
    return names


class Suite(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    variants: list[str] = Field(default_factory=list)
    implementations: Literal["all"] | list[str] = "all"
    sweep: Sweep | list[Sweep] | None = None
    tasks: list[str] = Field(default_factory=list)
    measure: list[Measure] = Field(default=["time", "memory", "accuracy"], min_length=1)
    timing: Timing = Timing()
    limits: Limits = Limits()
    exclude: list[ExcludeRule] = Field(default_factory=list)
    quick: QuickOverrides | None = None
    seed: int = Field(default=0, ge=0, le=2**31)

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        return _known("variant", variants, VARIANTS)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from harness.tasks import TASKS

        return _known("task", tasks, TASKS)

    @model_validator(mode="after")
    def _something_to_run(self) -> Suite:
        if not self.tasks and not (self.variants and self.sweep):
            raise ValueError("a suite needs `variants` and `sweep` (kernel cases), or `tasks` (task cases), or both")
        if self.variants and self.sweep is None:
            raise ValueError("`variants` needs a `sweep` of shapes to run them at")
        return self

    @property
    def sweeps(self) -> list[Sweep]:
        if self.sweep is None:
            return []
        return self.sweep if isinstance(self.sweep, list) else [self.sweep]


_FIELD_NAMES = frozenset(
    name for model in (Suite, Sweep, Timing, Limits, ExcludeRule, Range, QuickOverrides) for name in model.model_fields
)


@dataclass(frozen=True)
class Case:
    """One measurement: a variant, an implementation and a point of the sweep."""

    suite: str
    variant: str
    implementation: str
    params: Params
    skip_reason: str = ""
    task: str = ""

    @property
    def case_id(self) -> str:
        if self.task:
            return f"task/{self.task}/{self.implementation}"
        return case_id(self.variant, self.implementation, self.params)


def case_id(variant: str, implementation: str, p: Params) -> str:
    """Stable across runs: the same variant, implementation and params give the same id."""
    kv = f"-kv{p.seq_len_kv}" if p.seq_len_kv is not None else ""
    threads = f"-t{p.threads}" if p.threads is not None else ""
    causal = "-causal" if p.causal else ""
    shape = f"b{p.batch}-h{p.heads}-n{p.seq_len}{kv}-d{p.head_dim}"
    return f"{variant}/{implementation}/{shape}-{p.dtype}-{p.device}{threads}{causal}"


# ----------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and alias bombs (PyYAML silently keeps the last key)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.alias_count = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.alias_count += 1
            if self.alias_count > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"more than {MAX_ALIASES} YAML aliases (refusing a possible alias bomb)",
                    event.start_mark,
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"keys must be plain scalars, got {type(key).__name__}", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"while reading the mapping that starts on line {node.start_mark.line + 1}",
                    node.start_mark,
                    f"duplicate key {key!r} (first on line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes the document has once every alias is expanded (computed on the graph)."""
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a cycle counts once rather than recursing forever
        children: list = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        memo[key] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[key]


def _line_map(node: yaml.Node | None, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Line (1-based) of every key path in a composed YAML tree, to point errors at lines."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # refused later, with its line, by the loader
            key = key_node.value
            out.setdefault((*path, key), key_node.start_mark.line + 1)
            _line_map(value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), out)
    return out


def loc_last(error: dict) -> object:
    """An unknown key is the last element of an extra_forbidden error's location: keep it."""
    return error["loc"][-1] if error["type"] == "extra_forbidden" else None


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _model_for(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model a (cleaned) location points into, to list its allowed keys."""
    models: dict[str, type[BaseModel]] = {
        "sweep": Sweep,
        "timing": Timing,
        "limits": Limits,
        "exclude": ExcludeRule,
        "quick": QuickOverrides,
    }
    model: type[BaseModel] = Suite
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is Suite and part in models:
            model = models[part]
        elif model is ExcludeRule and part in PARAM_AXES:
            model = Range  # {gt: ..., le: ...} conditions
        else:
            return None
    return model


def _clean_loc(error: dict) -> tuple:
    # pydantic puts union branch names ('Sweep', 'list[Sweep]', "literal['all']") in loc; they mean
    # nothing to a user, so only field names and list indices are kept.
    return tuple(p for p in error["loc"] if isinstance(p, int) or p in _FIELD_NAMES or p == loc_last(error))


def _explain(file: str, error: dict, lines: dict[tuple, int]) -> str:
    loc = _clean_loc(error)
    key = _format_loc(loc)
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
    where = f"{file}:{line}" if line else file
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_for(loc)
        allowed = list(model.model_fields) if model else []
        hint = closest(str(loc[-1]), allowed)
        did = f" Did you mean {hint!r}?" if hint else ""
        return f"{where}: unknown key {key!r}.{did} Allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{where}: missing required key {key!r}"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    got_text = "" if isinstance(got, dict | list) else f" (got {got!r})"
    return f"{where}: key {key!r}: {message}{got_text}"


def parse_suite(
    data: Any,
    file: str = "<suite>",
    lines: dict[tuple, int] | None = None,
    known: dict[str, list[str]] | None = None,
    check_implementations: bool = True,
) -> Suite:
    """Validate already-loaded YAML data as a Suite; InputError on any problem."""
    lines = lines or {}
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise InputError(f"{file}: a suite must be a YAML mapping of keys (name, variants, sweep, ...), got {kind}")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # A sweep is a mapping or a list of mappings; report only against the form the file used.
        wrong_branch = "Sweep" if isinstance(data.get("sweep"), list) else "list[Sweep]"
        errors = [e for e in errors if wrong_branch not in e["loc"]] or errors
        # An unknown key inside a union (an exclude condition) also fails the union's other
        # branches at the parent; the unknown key is the message that helps.
        unknown_parents = {_clean_loc(e)[:-1] for e in errors if e["type"] == "extra_forbidden"}
        errors = [e for e in errors if e["type"] == "extra_forbidden" or _clean_loc(e) not in unknown_parents]
        # Union branches repeat one mistake several times; show each message once, the first few.
        messages = list(dict.fromkeys(_explain(file, e, lines) for e in errors))
        more = f"\n  (and {len(messages) - 5} more)" if len(messages) > 5 else ""
        raise InputError("invalid suite:\n  " + "\n  ".join(messages[:5]) + more) from None
    _check_names(suite, file, lines, known, check_implementations)
    return suite


def _check_names(
    suite: Suite, file: str, lines: dict[tuple, int], names: dict[str, list[str]] | None, check_implementations: bool
) -> None:
    """Sweep sizes, implementation names (against `names`, default this process's registry) and
    each sweep point against each variant's rules."""
    from harness import registry

    def known_names(variant: str) -> list[str]:
        return names.get(variant, []) if names is not None else registry.names(variant)

    total = sum(s.size() for s in suite.sweeps) * max(1, len(suite.variants))
    if total > MAX_CASES:
        raise InputError(
            f"{file}: key 'sweep' expands to {total:,} shape points x variants; the limit is {MAX_CASES:,}. "
            "Shorten the axis lists or split the suite."
        )
    if check_implementations and suite.implementations != "all":
        known = set()
        from harness.tasks import variant_of

        for variant in [*suite.variants, *(variant_of(t) for t in suite.tasks)]:
            known |= set(known_names(variant))
        for i, name in enumerate(suite.implementations):
            if name not in known:
                hint = closest(name, known)
                line = lines.get(("implementations", i))
                where = f"{file}:{line}" if line else file
                did = f" Did you mean {hint!r}?" if hint else ""
                raise InputError(
                    f"{where}: key 'implementations[{i}]': unknown implementation {name!r}.{did} "
                    f"Allowed here: all, {', '.join(sorted(known))}"
                )
    for s_index, sweep in enumerate(suite.sweeps):
        for variant in suite.variants:
            for point in _points(sweep):
                try:
                    VARIANTS[variant].normalize(point)
                except InputError as exc:
                    where = ("sweep", s_index) if isinstance(suite.sweep, list) else ("sweep",)
                    line = lines.get(where)
                    raise InputError(f"{file}:{line or '?'}: key 'sweep': {exc} (variant {variant})") from None


def load_suite(path: str | Path, known: dict[str, list[str]] | None = None) -> Suite:
    """Read, parse and validate a suite file; every failure is an InputError naming the file."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise InputError(f"{file}: no such suite file")
    if path.is_dir():
        raise InputError(f"{file}: is a directory, expected a suite YAML file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{file}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise InputError(f"{file}: {len(raw):,} bytes; a suite file is at most {MAX_FILE_BYTES:,}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}: not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})") from None
    return parse_text(text, file, known)


def parse_text(text: str, file: str = "<suite>", known: dict[str, list[str]] | None = None) -> Suite:
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and (size := _expanded_size(node, {})) > MAX_EXPANDED_NODES:
                raise InputError(
                    f"{file}: YAML aliases expand this document to {size:,} nodes (limit {MAX_EXPANDED_NODES:,}); "
                    "refusing a possible alias bomb"
                )
            lines = _line_map(node)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except InputError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{file}:{mark.line + 1}" if mark else file
        raise InputError(f"{where}: not a valid suite YAML: {exc.problem}") from None
    except (yaml.YAMLError, RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"{file}: not a valid suite YAML: {type(exc).__name__}: {exc}") from None
    return parse_suite(data, file, lines, known)


# ----------------------------------------------------------------------------- expansion


def _points(sweep: Sweep) -> Iterable[Params]:
    axes = [getattr(sweep, axis) for axis in PARAM_AXES]
    for values in itertools.product(*axes):
        yield Params(**dict(zip(PARAM_AXES, values, strict=True)))


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
    # Re-validate so that overrides from the file are held to the same schema.
    # The implementations were checked when the suite was loaded (perhaps against another tree's
    # registry); re-validating holds the file's `quick` overrides to the same schema and rules.
    return parse_suite(quick.model_dump(), f"{suite.name} (--quick)", check_implementations=False)


def expand(suite: Suite, only: Iterable[str] | None = None, names: dict[str, list[str]] | None = None) -> list[Case]:
    """All cases of a suite, grouped so that implementations of one shape run back to back.

    `names` gives the implementations per variant (default: this process's registry; the gate
    passes those of the trees it compares).
    """
    from harness import registry

    only = list(only or [])

    def known(variant: str) -> list[str]:
        return names.get(variant, []) if names is not None else registry.names(variant)

    def chosen(variant: str) -> list[str]:
        """The suite's implementations of `variant` that exist, narrowed by --only."""
        names = (
            known(variant)
            if suite.implementations == "all"
            else [n for n in suite.implementations if n in known(variant)]
        )
        return [n for n in names if not only or n in only]

    cases: dict[str, Case] = {}
    for sweep in suite.sweeps:
        for point in _points(sweep):
            for variant in suite.variants:
                params = VARIANTS[variant].normalize(point)
                for name in chosen(variant):
                    case = Case(suite.name, variant, name, params)
                    rule = next((r for r in suite.exclude if r.matches(variant, name, params)), None)
                    if rule is not None:
                        case = replace(case, skip_reason=rule.describe())
                    cases.setdefault(case.case_id, case)
    from harness.tasks import variant_of

    for task in suite.tasks:
        variant = variant_of(task)
        for name in chosen(variant):
            case = Case(suite.name, variant, name, Params(), task=task)
            cases.setdefault(case.case_id, case)
    return list(cases.values())


def check_only(suite: Suite, only: Iterable[str]) -> None:
    """--only names must exist for the suite's variants."""
    from harness import registry
    from harness.tasks import variant_of

    variants = [*suite.variants, *(variant_of(t) for t in suite.tasks)]
    known = {name for variant in variants for name in registry.names(variant)}
    for name in only:
        if name not in known:
            hint = closest(name, known)
            did = f" Did you mean {hint!r}?" if hint else ""
            raise InputError(f"--only: unknown implementation {name!r}.{did} Allowed: {', '.join(sorted(known))}")


__all__ = ["Case", "Suite", "case_id", "expand", "load_suite", "parse_text", "quick_version"]
