"""The one error type for bad input, so the CLI can turn it into exit code 2 without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InputError(ValueError):
    """Bad input from a user: a suite file, a name, a tensor. The message is the whole story."""


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name most like `name`, for "did you mean" hints."""
    matches = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name(kind: str, name: str, known: Iterable[str]) -> InputError:
    """An error for a name that is not one of `known`, listing them and the closest match."""
    known = sorted(known)
    return InputError(f"unknown {kind} {name!r}.{did_you_mean(name, known)} Known: {', '.join(known) or '(none)'}.")


def did_you_mean(name: str, known: Iterable[str], inline: bool = False) -> str:
    """The "did you mean" hint every unknown-name message uses: ' Did you mean 'x'?' or ''.

    `inline` gives the parenthesised form for messages that go on after it: " (did you mean 'x'?)".
    """
    hint = closest(name, known)
    if not hint:
        return ""
    return f" (did you mean {hint!r}?)" if inline else f" Did you mean {hint!r}?"


def first_line(exc: BaseException, limit: int, last: bool = False) -> str:
    """An exception's first message line, at most `limit` characters ('' when it has no message):
    what a record, an availability reason or a check's row quotes of a kernel's or package's words.
    `last`: its last line instead, for an error that carries a remote traceback (a submitit job's)."""
    lines = str(exc).strip().splitlines()
    return lines[-1 if last else 0][:limit] if lines else ""


def describe(exc: BaseException, limit: int = 300, last: bool = False) -> str:
    """'TypeName: message line': how a record or a lost case quotes an exception (see first_line)."""
    return f"{type(exc).__name__}: {first_line(exc, limit, last)}"
