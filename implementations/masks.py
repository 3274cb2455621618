"""Mask helpers the kernels share: the causal mask (top-left, like torch's `is_causal`), folding it
into a user mask, and decode's bottom-right causality for kernels written for top-left. The float64
reference (harness.variants) builds its own masks on purpose: the ground truth shares no code with
the kernels it judges.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

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
    return merge(mask, causal_mask(n_q, n_kv, device, row_ids))


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
            mask = merge(mask, bottom_right_mask(n_q, n_kv, str(q.device)))
        return kernel(q, k, v, causal=False, scale=scale, mask=mask)

    return decode


# ----------------------------------------------------------------------------- score modifiers


def doc_ids(cu_seqlens: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """(B, N) index of each token's document, from cu_seqlens over the flattened B·N tokens."""
    tokens = torch.arange(batch * n, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens.long(), tokens, right=True) - 1).view(batch, n)


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """c · tanh(scores / c): Gemma 2's soft-capping, after scaling and before any mask."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


@dataclass(frozen=True)
class Positions:
    """Where a call's queries and keys sit and what each query may see: causality, a window, documents
    (and ALiBi's distance). Query i sits at position i + offset (0: top-left; Nkv - Nq: decode)."""

    n_q: int
    n_kv: int
    offset: int = 0
    causal: bool = False
    window: int | None = None
    alibi_slopes: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    batch: int = 1

    @functools.cached_property
    def docs(self) -> torch.Tensor | None:
        return None if self.cu_seqlens is None else doc_ids(self.cu_seqlens, self.batch, self.n_q)

    @functools.cached_property
    def bounds(self) -> list[list[tuple[int, int]]] | None:
        """Per batch row, each token's document as (first, last + 1), as host lists (tile ranges)."""
        if self.cu_seqlens is None:
            return None
        cu = self.cu_seqlens.tolist()
        rows: list[list[tuple[int, int]]] = [[] for _ in range(self.batch)]
        for start, stop in itertools.pairwise(cu):
            b = start // self.n_q
            rows[b].extend([(start - b * self.n_q, stop - b * self.n_q)] * (stop - start))
        return rows

    def key_range(self, b: int, i: int, n: int) -> tuple[int, int]:
        """The keys query rows i..i+n-1 of batch row b may see, as [lo, hi): a tile loop's bounds."""
        first, last = i + self.offset, i + n - 1 + self.offset
        lo, hi = 0, self.n_kv
        if self.causal:
            hi = min(hi, last + 1)
        if self.window is not None:
            lo = max(lo, first - self.window)
            if not self.causal:
                hi = min(hi, last + self.window + 1)
        if self.bounds is not None:
            lo, hi = max(lo, self.bounds[b][i][0]), min(hi, self.bounds[b][i + n - 1][1])
        return lo, max(lo, hi)

    def all_visible(self, b: int, i: int, n: int, j: int, w: int) -> bool:
        """Whether every row of i..i+n-1 sees every key of j..j+w-1 (no mask needed for that tile)."""
        first, last = i + self.offset, i + n - 1 + self.offset
        if self.causal and j + w - 1 > first:
            return False
        edge = None if self.window is None else (last - self.window, first + self.window)
        if edge is not None and (j < edge[0] or (not self.causal and j + w - 1 > edge[1])):
            return False
        return self.one_document(b, i, n, j, w)

    def one_document(self, b: int, i: int, n: int, j: int, w: int) -> bool:
        """Whether rows i..i+n-1 and keys j..j+w-1 all lie in one document (always, without documents):
        the tile's mask then depends only on i - j."""
        if self.bounds is None:
            return True
        doc = self.bounds[b][i]
        return self.bounds[b][i + n - 1] == doc and doc[0] <= j and j + w <= doc[1]

    def allowed(self, rows: torch.Tensor, cols: torch.Tensor, b: slice | int | None = None) -> torch.Tensor | None:
        """Boolean (B|1, rows, cols), True = visible, for query rows `rows` and keys `cols` (batch rows `b`
        of the documents: all by default); None when everything is visible."""
        pos, keys = (rows + self.offset)[:, None], cols[None, :]
        allowed = None

        def both(x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
            return y if x is None else x & y

        if self.causal:
            allowed = both(allowed, keys <= pos)
        if self.window is not None:
            allowed = both(allowed, keys >= pos - self.window)
            if not self.causal:
                allowed = both(allowed, keys <= pos + self.window)
        allowed = None if allowed is None else allowed[None]
        if self.docs is not None:
            docs = self.docs if b is None else self.docs[b : b + 1] if isinstance(b, int) else self.docs[b]
            allowed = both(allowed, docs[:, rows, None] == docs[:, None, cols])
        return allowed

    def bias(self, rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """ALiBi's -slope_h·|i - j| as (1, H, rows, cols) in `dtype`; None without ALiBi."""
        if self.alibi_slopes is None:
            return None
        distance = ((rows + self.offset)[:, None] - cols[None, :]).abs().to(dtype)
        return -self.alibi_slopes.to(dtype)[None, :, None, None] * distance

    def mask(self, rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Everything positional as one mask (B|1, H|1, rows, cols): boolean, or additive under ALiBi."""
        allowed = self.allowed(rows, cols)
        bias = self.bias(rows, cols, dtype)
        if bias is None:
            return None if allowed is None else allowed[:, None]
        return bias if allowed is None else bias.masked_fill(~allowed[:, None], float("-inf"))


def positions(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    offset: int = 0,
    window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> Positions:
    return Positions(q.shape[2], k.shape[2], offset, causal, window, alibi_slopes, cu_seqlens, q.shape[0])


def merge(mask: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
    """Two masks (each bool or additive, or None) as one: bool if both are, else additive (a user mask
    restricted to a boolean `allowed` keeps its kind)."""
    if mask is None or extra is None:
        return extra if mask is None else mask
    if mask.dtype == torch.bool and extra.dtype == torch.bool:
        return mask & extra
    if mask.dtype == torch.bool:
        return extra.masked_fill(~mask, float("-inf"))
    if extra.dtype == torch.bool:
        return mask.masked_fill(~extra, float("-inf"))
    return mask + extra


# ----------------------------------------------------------------------------- ragged and paged caches


def request_cache(
    k: torch.Tensor, v: torch.Tensor, b: int, n: int, block_table: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Request b's cache as (1, H_kv, n, D): a view of its first n keys, or (paged) its pages gathered in
    block-table order: index_select copies them, which is what a kernel without paged reads pays."""
    if block_table is None:
        return k[b : b + 1, :, :n], v[b : b + 1, :, :n]
    pages = block_table[b, : -(-n // k.shape[1])]
    return tuple(t.index_select(0, pages).flatten(0, 1)[:n].transpose(0, 1)[None] for t in (k, v))  # type: ignore[return-value]


def per_request(
    kernel: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_lens: torch.Tensor,
    block_table: torch.Tensor | None,
    **options: object,
) -> torch.Tensor:
    """A contiguous decode kernel over a ragged or paged batch: one call per request against its own cache,
    queries at its end (kernel(q_b, k_b, v_b, causal=, offset=, **options) in the bottom-right sense)."""
    n_q = q.shape[2]
    out = torch.empty_like(q)
    for b, n in enumerate(cache_lens.tolist()):
        k_b, v_b = request_cache(k, v, b, n, block_table)
        out[b : b + 1] = kernel(q[b : b + 1], k_b, v_b, causal=n_q > 1, offset=n - n_q, **options)
    return out


def decode_kernel(attend: Callable, summary: str) -> Callable:
    """A decode kernel from a kernel that places its queries at `offset`: the new tokens at the cache's end
    (bottom-right), and a ragged or paged batch request by request (`per_request`, pages gathered)."""

    def decode(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        mask: torch.Tensor | None = None,
        cache_lens: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
        **mods: object,
    ) -> torch.Tensor:
        if cache_lens is not None:
            return per_request(attend, q, k, v, cache_lens, block_table, scale=scale, **mods)
        return attend(q, k, v, causal=causal, scale=scale, mask=mask, offset=k.shape[2] - q.shape[2], **mods)

    decode.__doc__ = summary
    decode.__module__ = attend.__module__
    decode.__name__ = decode.__qualname__ = attend.__module__.rsplit(".", 1)[-1] + "_decode"
    return decode
