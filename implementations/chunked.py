"""Query chunks, each with a full softmax over all keys: naive's math with bounded score memory."""

from __future__ import annotations

import torch

from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import with_causal

# Score elements per chunk across all heads: 4M float32 = 16 MiB, small enough to stay near cache.
CHUNK_ELEMENTS = 1 << 22


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
    """Query chunks with an exact softmax each; causal chunks only read the keys they may see."""
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    rows = max(1, CHUNK_ELEMENTS // (batch * heads * n_kv))
    out = torch.empty_like(q)
    k_t = k.transpose(-2, -1)
    for start in range(0, n_q, rows):
        stop = min(n_q, start + rows)
        # Under a top-left causal mask, rows < stop never see keys >= stop.
        n_keys = min(n_kv, stop) if causal else n_kv
        scores = torch.matmul(q[:, :, start:stop], k_t[..., :n_keys]).mul_(scale)
        chunk_mask = (
            None if mask is None else mask[..., :n_keys] if mask.shape[-2] == 1 else mask[..., start:stop, :n_keys]
        )
        chunk_mask = with_causal(
            chunk_mask, causal, stop - start, n_keys, q.device, torch.arange(start, stop, device=q.device)
        )
        if chunk_mask is not None:
            if chunk_mask.dtype == torch.bool:
                scores.masked_fill_(~chunk_mask, float("-inf"))
            else:
                scores.add_(chunk_mask)
        weights = torch.softmax(scores, dim=-1)
        if mask is not None:  # fully masked rows give zeros (DESIGN's policy), not NaN
            weights.masked_fill_(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
        out[:, :, start:stop] = torch.matmul(weights, v[:, :, :n_keys])
    return out
