"""Query chunks, each with a full softmax over all keys: naive's math with bounded score memory."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import decode_kernel, group_heads, grouped_matmul, merge, positions, softcapped
from implementations.naive import DECODE_MODS, MODS

# Score elements per chunk across all heads: 4M float32 = 16 MiB, small enough to stay near cache.
CHUNK_ELEMENTS = 1 << 22


def _chunk(q_c, k_t, v, mask_c, scale: float, empty_rows_possible: bool, softcap: float | None) -> torch.Tensor:
    """Exact attention of one query chunk over the keys it may see: (B, H, rows, D)."""
    scores = grouped_matmul(q_c, k_t).mul_(scale)  # (B, H, rows, keys), or (B, H_kv, G, rows, keys)
    if softcap is not None:
        scores = softcapped(scores, softcap)
    if mask_c is not None:
        if mask_c.dtype == torch.bool:
            scores.masked_fill_(~mask_c, float("-inf"))
        else:
            scores.add_(mask_c)
    if not empty_rows_possible:
        return grouped_matmul(torch.softmax(scores, dim=-1), v)
    # Fully masked rows give zeros (the accuracy rule's policy, harness.accuracy), not NaN, in both passes.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill_(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return grouped_matmul(weights, v)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    offset: int = 0,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query chunks, query i at position i + offset; each chunk reads only the keys its rows may see
    (causality, the window and the documents bound them), with the rest of the positions as its mask."""
    n_q, head_dim, n_kv = q.shape[-2], q.shape[-1], k.shape[-2]
    scale = head_dim**-0.5 if scale is None else scale
    rows = max(1, CHUNK_ELEMENTS // (q.numel() // (n_q * head_dim) * n_kv))
    where = positions(q, k, causal, offset, window, alibi_slopes, cu_seqlens)
    q, k, v, mask, ungroup = group_heads(q, k, v, mask)  # GQA: q as (B, H_kv, G, N, D), kv heads not copied
    k_t = k.transpose(-2, -1)  # (B, H_kv, D, Nkv)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out = None if training else torch.empty_like(q)
    pieces = []
    grouped = q.dim() == 5
    for start in range(0, n_q, rows):
        stop = min(n_q, start + rows)
        ranges = [where.key_range(b, start, stop - start) for b in range(q.shape[0])]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        if hi <= lo:  # no row of this chunk sees a key: zeros
            if training:
                pieces.append(torch.zeros_like(q[..., start:stop, :]))
            else:
                out[..., start:stop, :] = 0
            continue
        chunk_mask = None
        if mask is not None:
            chunk_mask = mask[..., lo:hi] if mask.shape[-2] == 1 else mask[..., start:stop, lo:hi]
        placed = where.mask(torch.arange(start, stop, device=q.device), torch.arange(lo, hi, device=q.device), q.dtype)
        if placed is not None and grouped:  # (B|1, H|1, rows, keys) as the grouped layout's (B, H_kv, G, ...)
            placed = placed.unflatten(1, (k.shape[1], -1)) if placed.shape[1] > 1 else placed.unsqueeze(1)
        chunk_mask = merge(chunk_mask, placed)
        empty = chunk_mask is not None
        args = (q[..., start:stop, :], k_t[..., lo:hi], v[..., lo:hi, :], chunk_mask, scale, empty, softcap)
        if training:
            pieces.append(checkpoint(_chunk, *args, use_reentrant=False))
        else:
            out[..., start:stop, :] = _chunk(*args)
    return ungroup(torch.cat(pieces, dim=-2) if training else out)


@register("chunked", variants=DOT_PRODUCT_VARIANTS, mods=MODS)
def chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    **mods: object,
) -> torch.Tensor:
    """Query chunks with an exact softmax each; causal chunks only read the keys they may see.

    For training, each chunk is checkpointed: the backward recomputes its scores instead of keeping
    every chunk's probabilities, so memory stays chunk-sized in both passes.
    """
    return attend(q, k, v, causal=causal, scale=scale, mask=mask, **mods)


chunked_decode = register("chunked", variants=("decode",), mods=DECODE_MODS)(
    decode_kernel(
        attend,
        "Query chunks with an exact softmax each, the new tokens at the end of the cache (bottom-right); a "
        "ragged or paged batch request by request, each request's pages gathered (inside the timed call).",
    )
)
