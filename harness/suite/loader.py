"""Reading a suite file: a hardened YAML loader and errors that name the file, line, key and allowed values.

Every problem with a suite file is one InputError, so the CLI can exit 2 without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from harness.errors import InputError, did_you_mean
from harness.shapes import PARAM_AXES
from harness.suite.schema import FIELD_NAMES, SECTIONS, ExcludeRule, Range, Suite

MAX_CASES = 100_000
MAX_FILE_BYTES = 1 << 20
MAX_ALIASES = 100
# Aliases make a YAML tree a graph; this bounds the tree it stands for (the "billion laughs").
MAX_EXPANDED_NODES = 100_000


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
    model: type[BaseModel] = Suite
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is Suite and part in SECTIONS:
            model = SECTIONS[part]
        elif model is ExcludeRule and part in PARAM_AXES:
            model = Range  # {gt: ..., le: ...} conditions
        else:
            return None
    return model


def _clean_loc(error: dict) -> tuple:
    # pydantic puts union branch names ('Sweep', 'list[Sweep]', "literal['all']") in loc; they mean
    # nothing to a user, so only field names and list indices are kept.
    return tuple(p for p in error["loc"] if isinstance(p, int) or p in FIELD_NAMES or p == loc_last(error))


def _explain(file: str, error: dict, lines: dict[tuple, int]) -> str:
    loc = _clean_loc(error)
    key = _format_loc(loc)
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
    where = f"{file}:{line}" if line else file
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_for(loc)
        allowed = list(model.model_fields) if model else []
        did = did_you_mean(str(loc[-1]), allowed)
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
    """Sweep sizes, implementation names or patterns (against `names`, default this process's
    registry) and each sweep point against each variant's rules."""
    from harness.registry import unknown_pattern
    from harness.tasks import variant_of
    from harness.variants import VARIANTS

    total = sum(s.size() * max(1, len(suite.variants_of(s))) for s in suite.sweeps)
    if total > MAX_CASES:
        raise InputError(
            f"{file}: key 'sweep' expands to {total:,} shape points x variants; the limit is {MAX_CASES:,}. "
            "Shorten the axis lists or split the suite."
        )
    if check_implementations and suite.implementations != "all":
        variants = [*suite.variants, *(variant_of(t) for t in suite.tasks)]
        for i, name in enumerate(suite.implementations):
            problem = unknown_pattern(name, variants, names)
            if problem:
                line = lines.get(("implementations", i))
                where = f"{file}:{line}" if line else file
                raise InputError(
                    f"{where}: key 'implementations[{i}]': {problem.replace('Allowed:', 'Allowed here: all,')}"
                )
    for s_index, sweep in enumerate(suite.sweeps):
        for variant in suite.variants_of(sweep):
            for point in sweep.points():
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
