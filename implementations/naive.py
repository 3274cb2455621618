"""The textbook formula, as the article writes it: scores, softmax, weighted sum."""

from __future__ import annotations

import torch

from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import bottom_right, group_heads, grouped_matmul, with_causal


@register("naive", variants=DOT_PRODUCT_VARIANTS)
def naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Textbook attention: the full (Nq, Nkv) score matrix, a softmax over it, a weighted sum of v."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, mask, ungroup = group_heads(q, k, v, mask)  # GQA: kv heads broadcast, never copied
    scores = grouped_matmul(q, k.transpose(-2, -1)) * scale
    mask = with_causal(mask, causal, q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        # Policy: a query that may attend to nothing gets zeros, not the softmax's 0/0 = NaN.
        weights = weights.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    return ungroup(grouped_matmul(weights, v))


register("naive", variants=("decode",))(bottom_right(naive))
