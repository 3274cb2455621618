"""Implementations that fail on purpose, each in one way, to prove the runner records and goes on.

Loaded through HARNESS_PLUGINS=tests.plugins.faulty (see tests/test_runner.py).
"""

from __future__ import annotations

import ctypes
import os
import time

import torch

from harness import register
from implementations.naive import naive


@register("raises", variants=("multi_head",))
def raises(q, k, v, *, causal=False, scale=None, mask=None):
    """Raises a Python exception."""
    raise RuntimeError("deliberate failure in the kernel")


@register("hangs", variants=("multi_head",))
def hangs(q, k, v, *, causal=False, scale=None, mask=None):
    """Never returns."""
    time.sleep(3600)


@register("segfaults", variants=("multi_head",))
def segfaults(q, k, v, *, causal=False, scale=None, mask=None):
    """Dereferences NULL: the worker dies with SIGSEGV."""
    ctypes.string_at(0)


@register("aborts", variants=("multi_head",))
def aborts(q, k, v, *, causal=False, scale=None, mask=None):
    """Calls abort(): the worker dies with SIGABRT."""
    os.abort()


@register("allocator_fails", variants=("multi_head",))
def allocator_fails(q, k, v, *, causal=False, scale=None, mask=None):
    """Asks for a petabyte: the allocator refuses."""
    return torch.empty(1 << 50, dtype=torch.uint8)


@register("eats_memory", variants=("multi_head",))
def eats_memory(q, k, v, *, causal=False, scale=None, mask=None):
    """Touches ever more memory until something stops it (the suite's memory limit)."""
    hoard = []
    for _ in range(64):  # 64 x 256 MiB = 16 GiB at most, so a broken limit cannot take the machine
        hoard.append(torch.ones(1 << 26))
        time.sleep(0.02)
    return naive(q, k, v, causal=causal, scale=scale, mask=mask)


@register("wrong_shape", variants=("multi_head",))
def wrong_shape(q, k, v, *, causal=False, scale=None, mask=None):
    """Returns one query row too few."""
    return naive(q, k, v, causal=causal, scale=scale, mask=mask)[:, :, 1:]


@register("returns_nan", variants=("multi_head",))
def returns_nan(q, k, v, *, causal=False, scale=None, mask=None):
    """Right shape, one NaN."""
    out = naive(q, k, v, causal=causal, scale=scale, mask=mask)
    out[0, 0, 0, 0] = float("nan")
    return out


@register("slightly_off", variants=("multi_head",))
def slightly_off(q, k, v, *, causal=False, scale=None, mask=None):
    """Finite but wrong by 1e-3: inaccurate for float32."""
    return naive(q, k, v, causal=causal, scale=scale, mask=mask) + 1e-3


@register("allocates_64mib", variants=("multi_head",))
def allocates_64mib(q, k, v, *, causal=False, scale=None, mask=None):
    """Naive plus a known 64 MiB scratch buffer, to validate the memory measurement."""
    scratch = torch.ones(1 << 24)  # 16 Mi float32 = 64 MiB, touched
    out = naive(q, k, v, causal=causal, scale=scale, mask=mask)
    del scratch
    return out


_LEAKED: list = []


@register("leaks", variants=("multi_head",))
def leaks(q, k, v, *, causal=False, scale=None, mask=None):
    """Keeps 128 MiB alive after every call: memory the worker never gets back."""
    _LEAKED.append(torch.ones(1 << 25))
    return naive(q, k, v, causal=causal, scale=scale, mask=mask)


_CACHE: dict = {}


@register("caches_once", variants=("multi_head",))
def caches_once(q, k, v, *, causal=False, scale=None, mask=None):
    """Builds a 600 MiB table on its first call and reuses it, as a CUDA context or a kernel cache does."""
    if "table" not in _CACHE:
        _CACHE["table"] = torch.ones((600 << 20) // 4)
    return naive(q, k, v, causal=causal, scale=scale, mask=mask)


@register("leaks_100mib", variants=("multi_head",))
def leaks_100mib(q, k, v, *, causal=False, scale=None, mask=None):
    """Keeps 100 MiB alive after every call."""
    _LEAKED.append(torch.ones((100 << 20) // 4))
    return naive(q, k, v, causal=causal, scale=scale, mask=mask)


_PER_SHAPE: dict = {}


@register("caches_per_shape", variants=("multi_head",))
def caches_per_shape(q, k, v, *, causal=False, scale=None, mask=None):
    """Keeps 300 MiB for every new shape it sees: a per-shape cache that grows without bound."""
    if q.shape not in _PER_SHAPE:
        _PER_SHAPE[q.shape] = torch.ones((300 << 20) // 4)
    return naive(q, k, v, causal=causal, scale=scale, mask=mask)
