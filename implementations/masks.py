"""Mask helpers the kernels share: the causal mask (top-left, like torch's `is_causal`), folding it
into a user mask, and decode's bottom-right causality for kernels written for top-left. The float64
reference (harness.variants) builds its own masks on purpose: the ground truth shares no code with
the kernels it judges.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def causal_mask(
    n_q: int, n_kv: int, device: str | torch.device = "cpu", row_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean (Nq, Nkv) mask, True = attend, aligned top-left like torch's ``is_causal``.

    `row_ids` gives the absolute query positions when only some rows are computed.
    """
    rows = torch.arange(n_q, device=device) if row_ids is None else row_ids.to(device)
    return torch.arange(n_kv, device=device)[None, :] <= rows[:, None]


def with_causal(
    mask: torch.Tensor | None,
    causal: bool,
    n_q: int,
    n_kv: int,
    device: torch.device,
    row_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """A user mask (bool or additive) and the causal mask folded into one mask of the same kind."""
    if not causal:
        return mask
    return fold(mask, causal_mask(n_q, n_kv, device, row_ids))


def fold(mask: torch.Tensor | None, allowed: torch.Tensor) -> torch.Tensor:
    """A user mask (bool or additive, or None) restricted to the boolean `allowed`, of the same kind."""
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def group_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """Grouped-query attention without copying a kv head.

    q (B, H, Nq, D) becomes the view (B, H_kv, G, Nq, D); k and v stay (B, H_kv, Nkv, D) and
    `grouped_matmul` multiplies each kv head with its G query heads stacked as one block of rows, so
    every key and value is read once for all of them. A mask broadcastable to (B, H, Nq, Nkv) becomes
    one broadcastable to (B, H_kv, G, Nq, Nkv). Returns those and a function that turns a grouped
    output back into (B, H, Nq, D); without grouping everything is returned as it is.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads == kv_heads:
        return q, k, v, mask, lambda out: out
    group = heads // kv_heads
    if mask is not None and mask.dim() >= 3:
        mask = mask.unflatten(-3, (kv_heads, group)) if mask.shape[-3] == heads else mask.unsqueeze(-3)
    return q.unflatten(1, (kv_heads, group)), k, v, mask, lambda out: out.flatten(1, 2)


def grouped_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (B, H_kv, G, M, K) @ y (B, H_kv, K, N) → (B, H_kv, G, M, N): the G query heads as one block of
    rows, so y is neither expanded nor copied (a broadcast matmul materialises it G times: chunked at
    B=1, H=32, H_kv=8, N=4096, D=128 took 9.7 s that way, 2.3 s this way). Plain 4-D operands just
    multiply."""
    if x.dim() == y.dim():
        return x @ y
    return (x.flatten(2, 3) @ y).unflatten(2, (x.shape[2], x.shape[3]))


@functools.lru_cache(maxsize=64)
def bottom_right_mask(n_q: int, n_kv: int, device: str) -> torch.Tensor:
    """Boolean (Nq, Nkv): query i sees keys j <= Nkv - Nq + i (new tokens at the end of a KV cache).

    Cached per shape and device, as a serving stack keeps one per step shape: building it is not part
    of the attention a decode step times.
    """
    return causal_mask(n_q, n_kv, device, torch.arange(n_q, device=device) + (n_kv - n_q))


def bottom_right(kernel: Callable) -> Callable:
    """A top-left kernel as a decode kernel: decode's `causal` (bottom-right) becomes an explicit mask."""

    @functools.wraps(kernel)
    def decode(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n_q, n_kv = q.shape[2], k.shape[2]
        if causal and n_q > 1:  # one new token sees the whole cache: no mask at all
            mask = fold(mask, bottom_right_mask(n_q, n_kv, str(q.device)))
        return kernel(q, k, v, causal=False, scale=scale, mask=mask)

    return decode
