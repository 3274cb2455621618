"""Every registered implementation as a Hugging Face transformers attention backend.

    import harness.integrations.transformers as harness_hf
    harness_hf.register("memory_efficient")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="harness-memory_efficient")

transformers (>= 5) dispatches attention by name through `AttentionInterface`, and builds the mask a
backend receives through the paired `AttentionMaskInterface`. Each backend registered here is paired
with transformers' boolean mask (`sdpa_mask`): True = attend, padding, causality and a sliding window
all folded in, which is exactly the harness's kernel contract. What the adapter must get right:

* the kernel's output (B, H, Nq, D) goes back as (B, Nq, H, D), as transformers' backends return it;
* k and v arrive with their kv heads unrepeated, which the harness's kernels take as they are (GQA);
* without a mask, Nq > 1 is the model's own causality (transformers leaves the mask out only when
  Nq = Nkv, so top-left and bottom-right agree), and Nq = 1 against a cache is a decode step that
  sees every key;
* a modifier the model passes that the harness's kernels cannot apply (soft-capping, attention sinks,
  a position bias, dropout while training) raises an error naming the argument and the backend:
  never a silently different model.

Names: `harness-<implementation>`, except that transformers reads "flash" in a name as flash-attn and
"sdpa" as its own SDPA path, so those are spelt `fa` and `torch-sdp` (`harness-torch-sdp.math`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

from torch.profiler import record_function

from harness import registry
from harness.registry import name_matches

PREFIX = "harness-"
ATTENTION_EVENT = "harness.attention"
# Keyword arguments transformers' models pass to an attention backend that change the math and no harness
# kernel takes (yet): a model that passes one gets an error, not a different model. Soft-capping (Gemma 2's
# `softcap=`) goes to the kernels that apply it (registry `mods`), and is this error for the others.
SOFTCAP = "soft-capping of the scores"
UNSUPPORTED = {
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "a position bias added to the scores",
}
# Everything else transformers passes is left unread: a sliding window and packed sequences are already
# in the boolean mask (sdpa_mask folds them in), the rest is bookkeeping.


class _Clock:
    """Seconds spent inside the harness's attention backends while running (tasks/llm.py: attention's
    share of a model's step). CPU kernels run synchronously, so the wall time around the call is the
    kernel's, as torch.profiler's range around it would say, without the profiler's own overhead."""

    running = False
    seconds = 0.0


CLOCK = _Clock()


@contextlib.contextmanager
def attention_clock() -> Iterator[_Clock]:
    """Count the time spent in attention calls inside the block: `with attention_clock() as c: ...; c.seconds`."""
    CLOCK.running, CLOCK.seconds = True, 0.0
    try:
        yield CLOCK
    finally:
        CLOCK.running = False


class UnsupportedByBackend(ValueError):
    """A model asked a harness backend for something its kernel cannot compute."""


def backend_name(implementation: str) -> str:
    """The name a model passes as `attn_implementation` (one transformers will not read as its own)."""
    return PREFIX + implementation.replace("sdpa", "torch-sdp").replace("flash", "fa")


def _kernel(implementation: str, variant: str) -> registry.Implementation | None:
    try:
        return registry.get(variant, implementation)
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)
def _available(implementation: str, device: str, dtype: str, head_dim: int) -> tuple[bool, str]:
    """Whether the implementation runs at this device, dtype and head_dim (asked once per process)."""
    impl = registry.get("multi_head", implementation)
    return impl.available(device, dtype, head_dim=head_dim)


def attention_forward(implementation: str) -> Callable:
    """The transformers attention function of one implementation."""
    backend = backend_name(implementation)
    kernels = {v: _kernel(implementation, v) for v in ("multi_head", "causal", "cross_attention", "decode")}

    def forward(
        module: Any,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[Any, None]:
        for argument, meaning in UNSUPPORTED.items():
            if kwargs.get(argument) is not None:
                raise UnsupportedByBackend(
                    f"attn_implementation={backend!r}: the model passes {argument}= ({meaning}), which "
                    f"{implementation} cannot apply; use 'eager' for this model"
                )
        if dropout and getattr(module, "training", False):
            raise UnsupportedByBackend(
                f"attn_implementation={backend!r}: attention dropout ({dropout}) in training; "
                f"{implementation} has no dropout (set the model's attention_dropout to 0 or use eval())"
            )
        ok, why = _available(
            implementation, str(query.device), str(query.dtype).removeprefix("torch."), query.shape[-1]
        )
        if not ok:
            raise UnsupportedByBackend(f"attn_implementation={backend!r}: {why}")
        n_q, n_kv = query.shape[2], key.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if attention_mask is not None:
            variant, kwargs_out = ("multi_head" if n_q == n_kv else "cross_attention"), {"mask": attention_mask}
        elif n_q == 1 and n_kv > 1:
            variant, kwargs_out = "decode", {"causal": False}  # one new token sees the whole cache
        elif causal:
            variant, kwargs_out = ("causal" if n_q == n_kv else "decode"), {"causal": True}
        else:
            variant, kwargs_out = ("multi_head" if n_q == n_kv else "cross_attention"), {}
        kernel = kernels[variant]
        if kernel is None and variant == "causal":
            kernel = kernels["multi_head"]  # Nq = Nkv: top-left causality is the model's
        if kernel is None:
            raise UnsupportedByBackend(f"attn_implementation={backend!r}: {implementation} has no {variant} kernel")
        softcap = kwargs.get("softcap")
        if softcap is not None:
            if "softcap" not in kernel.mods:
                raise UnsupportedByBackend(
                    f"attn_implementation={backend!r}: the model passes softcap= ({SOFTCAP}), which "
                    f"{implementation} cannot apply; use 'eager' or a backend that soft-caps for this model"
                )
            kwargs_out["softcap"] = float(softcap)
        started = time.perf_counter()
        with record_function(ATTENTION_EVENT):  # a named range in a user's own torch.profiler traces
            out = kernel.fn(query, key, value, scale=scaling, **kwargs_out)  # (B, H, Nq, D)
        if CLOCK.running:
            CLOCK.seconds += time.perf_counter() - started
        return out.transpose(1, 2).contiguous(), None  # (B, Nq, H, D), no attention weights

    forward.__name__ = f"harness_{implementation.replace('.', '_')}_attention"
    return forward


def register(patterns: str | list[str] = "*") -> list[str]:
    """Register every available implementation matching `patterns` (names or wildcards) as a
    transformers attention backend with its paired boolean mask; returns the backend names.

    "Available" is the package-level answer (a library that is not installed is left out); whether a
    backend runs at the model's device, dtype and head_dim is asked on its first call, and a clear
    error says why not.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    wanted = [patterns] if isinstance(patterns, str) else list(patterns)
    names = []
    for name in registry.names("multi_head"):
        if not name_matches(name, wanted) or not registry.get("multi_head", name).available()[0]:
            continue
        backend = backend_name(name)
        AttentionInterface.register(backend, attention_forward(name))
        AttentionMaskInterface.register(backend, sdpa_mask)
        names.append(backend)
    return names
