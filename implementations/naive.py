"""The textbook formula, as the article writes it: scores, softmax, weighted sum."""

from __future__ import annotations

import torch

from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import decode_kernel, group_heads, grouped_matmul, merge, positions, softcapped

# Every score modifier: naive computes the whole score matrix, so each is one more elementwise step.
MODS = ("window", "softcap", "alibi", "documents")
# Decode also takes ragged and paged caches: request by request, its pages gathered inside the call.
DECODE_MODS = ("window", "softcap", "alibi", "page_size", "ragged")


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
    """Textbook attention with query i at position i + offset (0: top-left; decode: bottom-right)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    where = positions(q, k, causal, offset, window, alibi_slopes, cu_seqlens)
    rows, cols = torch.arange(q.shape[2], device=q.device), torch.arange(k.shape[2], device=q.device)
    mask = merge(mask, where.mask(rows, cols, q.dtype))
    q, k, v, mask, ungroup = group_heads(q, k, v, mask)  # GQA: kv heads broadcast, never copied
    scores = softcapped(grouped_matmul(q, k.transpose(-2, -1)) * scale, softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if mask is None:
        weights = torch.softmax(scores, dim=-1)
    else:
        # Policy: a query that may attend to nothing gets zeros, not the softmax's 0/0 = NaN, and so do
        # its gradients (its scores are made finite before the softmax, whose backward would give NaN).
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return ungroup(grouped_matmul(weights, v))


@register("naive", variants=DOT_PRODUCT_VARIANTS, mods=MODS)
def naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    **mods: object,
) -> torch.Tensor:
    """Textbook attention: the full (Nq, Nkv) score matrix, a softmax over it, a weighted sum of v."""
    return attend(q, k, v, causal=causal, scale=scale, mask=mask, **mods)


naive_decode = register("naive", variants=("decode",), mods=DECODE_MODS)(
    decode_kernel(
        attend,
        "Textbook attention, the new tokens at the end of the cache (bottom-right); a ragged or paged batch "
        "request by request, each request's pages gathered (inside the timed call).",
    )
)
