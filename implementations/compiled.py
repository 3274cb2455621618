"""torch.compile of `naive` and of `memory_efficient`: what the compiler makes of the plain formulas.

Shapes are compiled statically (one graph per shape, as a benchmark wants the best code for each)
and the recompile limit is raised so that a sweep never falls back to eager silently after the
default eight shapes. The first call per shape compiles; the worker keeps it out of the timing and
reports it as `first_call_s`.

What to expect on a CPU: inductor recognises naive's matmul-softmax-matmul and may rewrite it into
scaled_dot_product_attention; memory_efficient graph-breaks at its per-query-tile overflow check
(data-dependent control flow), so only the stretches between checks are compiled.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable

import torch

from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import bottom_right
from implementations.memory_efficient import memory_efficient, memory_efficient_decode
from implementations.naive import naive

RECOMPILE_LIMIT = 256


def compiler_available(device: str | None = None, **_: object) -> tuple[bool, str]:
    """Whether torch.compile (inductor) can build kernels for `device` on this machine."""
    if not hasattr(torch, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile"
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
        return False, f"torch.compile does not support this Python/platform (torch {torch.__version__})"
    if device is not None and str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "inductor needs triton for CUDA kernels (pip install triton)"
        return True, ""
    if device not in (None, "cpu"):
        return False, f"not measured on {device}"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return False, "inductor's CPU backend needs a C++ compiler (g++ or clang++) on PATH"
    return True, ""


def _raise_recompile_limit() -> None:
    # Graph-break warnings (memory_efficient's .item() check) would flood the run's console once per
    # shape; what they say is in this module's docstring.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    config = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, key):
            setattr(config, key, max(getattr(config, key), RECOMPILE_LIMIT))
    # A compiled backward that donates its saved buffers cannot run twice on one graph, and the
    # harness times `bwd` as flash-attention does: repeated backward calls on a retained graph.
    functorch = getattr(torch, "_functorch", None)
    if functorch is not None and hasattr(functorch.config, "donated_buffer"):
        functorch.config.donated_buffer = False


@functools.cache
def compile_static(fn: Callable) -> Callable:
    """`fn` under torch.compile with static shapes, compiled once per function (flex uses it too)."""
    _raise_recompile_limit()
    return torch.compile(fn, dynamic=False)


def _make(
    name: str, eager: Callable, variants: tuple[str, ...] = DOT_PRODUCT_VARIANTS, adapt: Callable | None = None
) -> None:
    """Register torch.compile of `eager`; `adapt` wraps the compiled call (decode's mask built outside the graph)."""

    def compiled(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return compile_static(eager)(q, k, v, causal=causal, scale=scale, mask=mask)

    compiled.__name__ = compiled.__qualname__ = name.replace(".", "_") + ("_decode" if "decode" in variants else "")
    register(
        name,
        variants,
        summary=f"torch.compile (inductor, static shapes) of {eager.__name__}",
        available=compiler_available,
        compiles=True,
    )(adapt(compiled) if adapt else compiled)


_make("compiled.naive", naive)
_make("compiled.memory_efficient", memory_efficient)
_make("compiled.naive", naive, ("decode",), adapt=bottom_right)
_make("compiled.memory_efficient", memory_efficient_decode, ("decode",))
