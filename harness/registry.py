"""Which attention implementations exist, and whether each can run here.

Registration is one line beside the function (timm's pattern); listing is a query. Built-in
implementations live in the `implementations` package; third-party packages add theirs through the
entry-point group ``harness.implementations`` whose value is a module to import.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.metadata
import inspect
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from harness.errors import did_you_mean, first_line, unknown_name

if TYPE_CHECKING:
    import torch

    from harness.variants import Inputs

ENTRY_POINT_GROUP = "harness.implementations"
# Comma-separated modules to import as plugins without packaging them (local experiments, tests).
PLUGINS_ENV = "HARNESS_PLUGINS"

# Availability checks get the device and dtype of a case; None means "in general, on this machine".
AvailabilityCheck = Callable[..., "tuple[bool, str]"]


def always_available(**_: object) -> tuple[bool, str]:
    return True, ""


class AttentionKernel(Protocol):
    """The one signature of every dot-product kernel (transformers' attention interface is the model).

    q: (B, H, Nq, D); k, v: (B, H, Nkv, D); mask broadcastable to (B, H, Nq, Nkv), True = attend or
    additive; `causal` is aligned top-left like torch's `is_causal`; returns (B, H, Nq, D). Inputs
    are checked once per case by `check_inputs`, outside the timed region, not by the kernel.
    """

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


KERNEL_KEYWORDS = ("causal", "scale", "mask")


def signature_problems(fn: Callable) -> list[str]:
    """How `fn` departs from AttentionKernel: three positional tensors and keyword-only options."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ["has no inspectable signature"]
    problems = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if [p.name for p in positional] != ["q", "k", "v"]:
        problems.append(f"positional parameters {[p.name for p in positional]}, expected ['q', 'k', 'v']")
    keywords = {p.name: p for p in params if p.kind == p.KEYWORD_ONLY}
    for name in KERNEL_KEYWORDS:
        if name not in keywords:
            problems.append(f"no keyword-only parameter {name!r}")
        elif keywords[name].default is inspect.Parameter.empty:
            problems.append(f"keyword {name!r} has no default")
    return problems


_BACKWARD_PROBES: dict[tuple, tuple[bool, str]] = {}


def backward_probe(impl: Implementation, device: str, dtype: str, head_dim: int, causal: bool) -> tuple[bool, str]:
    """Whether `impl` runs a backward pass here: tried once on a tiny input, the answer cached.

    Kernels that have no backward say so in their own exception's words (a custom op without a
    derivative, a compiled graph that cannot be differentiated), not as an error in every case.
    """
    key = (impl.variant, impl.name, id(impl.fn), device, dtype, head_dim, causal)
    if key not in _BACKWARD_PROBES:
        import torch

        from harness.shapes import Params
        from harness.variants import get_variant

        spec = get_variant(impl.variant)
        small = 16  # 16 tokens, or a 4x4 image for the gate
        params = spec.normalize(
            Params(
                batch=1,
                heads=2,
                seq_len=small,
                head_dim=head_dim,
                dtype=dtype,
                device=device,
                causal=causal,
                seq_len_kv=12 if impl.variant == "cross_attention" else None,
            )
        )
        try:
            with torch.enable_grad():
                inputs = spec.make_inputs(params).with_grad()
                out = inputs.call(impl.fn)
                out.backward(torch.ones_like(out))
            missing = [name for name, t in inputs.grad_leaves().items() if t.grad is None]
            _BACKWARD_PROBES[key] = (False, f"no gradient for {', '.join(missing)}") if missing else (True, "")
        except Exception as exc:
            _BACKWARD_PROBES[key] = (False, f"no backward here: {type(exc).__name__}: {first_line(exc, 200)}")
    return _BACKWARD_PROBES[key]


def check_inputs(variant: str, inputs: Inputs) -> None:
    """Raise InputError unless a case's inputs fit the variant's kernel contract (once per case)."""
    from harness.checks import check_gate, check_qkv
    from harness.variants import get_variant

    if get_variant(variant).kind == "gate":
        check_gate(*inputs.args)
    elif inputs.kwargs.get("cache_lens") is not None:
        from harness.checks import check_cache

        check_cache(*inputs.args, inputs.kwargs["cache_lens"], inputs.kwargs.get("block_table"))
    else:
        check_qkv(*inputs.args, inputs.kwargs.get("mask"))


@dataclass(frozen=True)
class Implementation:
    """One kernel for one variant, as the runner and the CLI see it."""

    name: str
    variant: str
    fn: Callable = field(repr=False)
    exact: bool = True
    summary: str = ""
    check: AvailabilityCheck = field(default=always_available, repr=False, compare=False)
    source: str = "builtin"
    # Compiles on its first call per shape (torch.compile, flex): the ETA and suites plan for it.
    compiles: bool = False
    # The score modifiers (harness.shapes.MODIFIERS: window, softcap, alibi, documents) it applies; a case
    # that sets another is unavailable, never silently computed without it.
    mods: frozenset[str] = frozenset()
    # setup(q, k, v, **kwargs) -> extra keyword arguments that depend only on the case's shape and
    # modifiers (a block mask, a dense bias, a plan): called once per case outside the timed region.
    setup: Callable[..., dict] | None = field(default=None, repr=False, compare=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The kernel with its inputs checked first: for direct use (a kernel trusts its inputs)."""
        from harness.variants import Inputs

        inputs = Inputs(args, kwargs)
        check_inputs(self.variant, inputs)
        return inputs.call(self.fn)

    def available(self, device: str | None = None, dtype: str | None = None, **case: object) -> tuple[bool, str]:
        """Whether this kernel runs here (and, given a device and dtype, for that case), and why not."""
        try:
            ok, reason = self.check(device=device, dtype=dtype, **case)
        except Exception as exc:  # a broken availability check must not take the listing down
            return False, f"availability check failed: {type(exc).__name__}: {exc}"
        if ok:
            ok, reason = self._applies_modifiers(case)
        if ok and case.get("direction", "fwd") != "fwd" and device is not None:
            return backward_probe(
                self, str(device), dtype or "float32", int(case.get("head_dim") or 64), bool(case.get("causal"))
            )
        return bool(ok), "" if ok else str(reason)

    def _applies_modifiers(self, case: dict) -> tuple[bool, str]:
        from harness.shapes import DEFAULTS, MODIFIERS

        wanted = [name for name in MODIFIERS if case.get(name, DEFAULTS[name]) != DEFAULTS[name]]
        missing = [name for name in wanted if name not in self.mods]
        if missing:
            has = ", ".join(sorted(self.mods)) or "none"
            return False, f"{self.name} does not apply {' or '.join(missing)} (of these axes it applies: {has})"
        return True, ""

    def available_for(self, params: object, **extra: object) -> tuple[bool, str]:
        """Availability for one case's params (a harness.variants.Params)."""
        case = dict(params.as_dict())  # type: ignore[attr-defined]
        device, dtype = case.pop("device"), case.pop("dtype")
        return self.available(device, dtype, **case, **extra)


_REGISTRY: dict[tuple[str, str], Implementation] = {}
_LOAD_ERRORS: dict[str, str] = {}
_PLUGIN_MODULES: set[str] = set()
# The built-in implementations as their first import registered them: a reload restores these instead of
# importing `implementations.*` again, so every module keeps its identity (a caller's reference to
# implementations.memory_efficient, or a test's monkeypatch of it, still reaches the registered kernels).
_BUILTINS: dict[tuple[str, str], Implementation] = {}
_loaded = False


def register(
    name: str,
    variants: Iterable[str],
    *,
    exact: bool = True,
    summary: str | None = None,
    available: AvailabilityCheck | None = None,
    compiles: bool = False,
    mods: Iterable[str] = (),
    setup: Callable[..., dict] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` under `name` for each of `variants`.

    The summary defaults to the first line of the function's docstring, so the listing and the
    code say the same thing. `mods`: the score modifiers it applies (axis names: window, softcap,
    alibi, documents); `setup`: its per-case preparation (see Implementation.setup).
    """
    from harness.shapes import MODIFIERS
    from harness.variants import VARIANTS

    variants = tuple(variants)
    for variant in variants:
        if variant not in VARIANTS:
            raise unknown_name("variant", variant, VARIANTS)
    mods = frozenset(mods)
    for mod in mods:
        if mod not in MODIFIERS:
            raise unknown_name("score modifier", mod, MODIFIERS)

    def decorate(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()
        text = summary if summary is not None else (doc[0] if doc else "")
        module = getattr(fn, "__module__", "") or ""
        source = "builtin" if module.startswith("implementations") else module
        for variant in variants:
            _REGISTRY[(variant, name)] = Implementation(
                name=name,
                variant=variant,
                fn=fn,
                exact=exact,
                summary=text,
                check=available or always_available,
                source=source,
                compiles=compiles,
                mods=mods,
                setup=setup,
            )
        return fn

    return decorate


def _load_builtins() -> None:
    if _BUILTINS:
        _REGISTRY.update(_BUILTINS)
        return
    import implementations

    for info in pkgutil.iter_modules(implementations.__path__, prefix="implementations."):
        importlib.import_module(info.name)
    _BUILTINS.update({key: impl for key, impl in _REGISTRY.items() if impl.source == "builtin"})


def _load_entry_points() -> None:
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        module = entry_point.value.split(":")[0]
        _PLUGIN_MODULES.add(module)
        try:
            importlib.import_module(module)
        except Exception as exc:  # one broken plugin must not hide the others
            _LOAD_ERRORS[entry_point.name] = f"{type(exc).__name__}: {exc}"


def _load_env_plugins() -> None:
    import os

    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        _PLUGIN_MODULES.add(module)
        try:
            importlib.import_module(module)
        except Exception as exc:
            _LOAD_ERRORS[module] = f"{type(exc).__name__}: {exc}"


def load() -> None:
    """Import the built-in implementations and every plugin, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    _load_builtins()
    _load_entry_points()
    _load_env_plugins()


def reload() -> None:
    """Forget the plugins and discover them again (tests install plugins at run time); the built-ins are
    restored as first registered, their modules not imported again."""
    global _loaded
    _REGISTRY.clear()
    _LOAD_ERRORS.clear()
    _loaded = False
    importlib.invalidate_caches()
    import sys

    stale = [m for m in sys.modules if m in _PLUGIN_MODULES]
    for module in stale:
        del sys.modules[module]
    _PLUGIN_MODULES.clear()
    load()


def implementations(variant: str | None = None) -> list[Implementation]:
    """All registered implementations, optionally of one variant, sorted by variant then name."""
    from harness.variants import VARIANTS

    load()
    if variant is not None and variant not in VARIANTS:
        raise unknown_name("variant", variant, VARIANTS)
    found = [impl for (v, _), impl in _REGISTRY.items() if variant is None or v == variant]
    order = list(VARIANTS)
    return sorted(found, key=lambda impl: (order.index(impl.variant), impl.name))


def names(variant: str | None = None) -> list[str]:
    return sorted({impl.name for impl in implementations(variant)})


def get(variant: str, name: str) -> Implementation:
    """The implementation `name` of `variant`; an unknown name lists the known ones and the closest."""
    candidates = {impl.name: impl for impl in implementations(variant)}
    if name not in candidates:
        raise unknown_name(f"implementation of {variant}", name, candidates)
    return candidates[name]


def load_errors() -> dict[str, str]:
    """Plugins whose module failed to import, with the reason."""
    load()
    return dict(_LOAD_ERRORS)


@functools.cache
def _cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


def needs_cuda(device: str | None = None, **_: object) -> tuple[bool, str]:
    """Availability check for kernels that exist only on CUDA."""
    if device is not None and not str(device).startswith("cuda"):
        return False, f"runs on CUDA only, not on {device}"
    if not _cuda_ok():
        return False, "no CUDA device"
    return True, ""


# ----------------------------------------------------------------------------- per-machine tuning

Tuner = Callable[[int | None], str]
_TUNERS: dict[tuple[str, str], Tuner] = {}


def register_tuner(name: str, device: str, tune: Tuner) -> None:
    """A per-machine tuning of implementation `name` on `device` (cpu or cuda), run again by
    `python -m harness ceilings`: tune(threads) re-measures, caches and says what it chose."""
    _TUNERS[(name, device)] = tune


def tuners(device: str) -> dict[str, Tuner]:
    load()
    kind = "cuda" if device.startswith("cuda") else device
    return {name: tune for (name, on), tune in sorted(_TUNERS.items()) if on == kind}


# ----------------------------------------------------------------------------- names and patterns

WILDCARDS = "*?["


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether `name` is one of `patterns` or matches one of them as a wildcard (timm's listing)."""
    return any(name == p or (any(c in p for c in WILDCARDS) and fnmatch.fnmatchcase(name, p)) for p in patterns)


def known_names(variant: str, listing: dict[str, list[str]] | None = None) -> list[str]:
    """The implementations of `variant`: from `listing` (another tree's registry, as the gate lists it),
    else this process's."""
    return listing.get(variant, []) if listing is not None else names(variant)


def unknown_pattern(pattern: str, variants: Iterable[str], listing: dict[str, list[str]] | None = None) -> str:
    """'' when `pattern` names (or matches) an implementation of one of `variants`; else why not."""
    known = sorted({n for v in variants for n in known_names(v, listing)})
    if any(name_matches(n, [pattern]) for n in known):
        return ""
    what = "pattern" if any(c in pattern for c in WILDCARDS) else "implementation"
    return (
        f"unknown {what} {pattern!r}: no implementation matches it.{did_you_mean(pattern, known)} "
        f"Allowed: {', '.join(known)}"
    )
