"""Query chunks, each with a full softmax over all keys: naive's math with bounded score memory."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import bottom_right, group_heads, grouped_matmul, with_causal

# Score elements per chunk across all heads: 4M float32 = 16 MiB, small enough to stay near cache.
CHUNK_ELEMENTS = 1 << 22


def _chunk(q_c, k_t, v, mask_c, scale: float, empty_rows_possible: bool) -> torch.Tensor:
    """Exact attention of one query chunk over the keys it may see: (B, H, rows, D)."""
    scores = grouped_matmul(q_c, k_t).mul_(scale)  # (B, H, rows, keys), or (B, H_kv, G, rows, keys)
    if mask_c is not None:
        if mask_c.dtype == torch.bool:
            scores.masked_fill_(~mask_c, float("-inf"))
        else:
            scores.add_(mask_c)
    weights = torch.softmax(scores, dim=-1)
    if empty_rows_possible:  # fully masked rows give zeros (the accuracy rule's policy, harness.accuracy), not NaN
        weights = weights.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    return grouped_matmul(weights, v)


@register("chunked", variants=DOT_PRODUCT_VARIANTS)
def chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query chunks with an exact softmax each; causal chunks only read the keys they may see.

    For training, each chunk is checkpointed: the backward recomputes its scores instead of keeping
    every chunk's probabilities, so memory stays chunk-sized in both passes.
    """
    n_q, head_dim, n_kv = q.shape[-2], q.shape[-1], k.shape[-2]
    scale = head_dim**-0.5 if scale is None else scale
    rows = max(1, CHUNK_ELEMENTS // (q.numel() // (n_q * head_dim) * n_kv))
    q, k, v, mask, ungroup = group_heads(q, k, v, mask)  # GQA: q as (B, H_kv, G, N, D), kv heads not copied
    k_t = k.transpose(-2, -1)  # (B, H_kv, D, Nkv)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out = None if training else torch.empty_like(q)
    pieces = []
    for start in range(0, n_q, rows):
        stop = min(n_q, start + rows)
        # Under a top-left causal mask, rows < stop never see keys >= stop.
        n_keys = min(n_kv, stop) if causal else n_kv
        chunk_mask = (
            None if mask is None else mask[..., :n_keys] if mask.shape[-2] == 1 else mask[..., start:stop, :n_keys]
        )
        chunk_mask = with_causal(
            chunk_mask, causal, stop - start, n_keys, q.device, torch.arange(start, stop, device=q.device)
        )
        args = (q[..., start:stop, :], k_t[..., :n_keys], v[..., :n_keys, :], chunk_mask, scale, mask is not None)
        if training:
            pieces.append(checkpoint(_chunk, *args, use_reentrant=False))
        else:
            out[..., start:stop, :] = _chunk(*args)
    return ungroup(torch.cat(pieces, dim=-2) if training else out)


register("chunked", variants=("decode",))(bottom_right(chunked))
