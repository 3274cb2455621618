"""Exact attention tiled over queries and keys with an online softmax: extra memory O(N), not O(N²).

The recurrence is Rabe & Staats' / FlashAttention's: per query tile keep a running row maximum m,
a running denominator l and an unnormalised accumulator; each key tile rescales them. Four tricks
make it fast on a CPU without leaving Python:

* scores are computed in base 2 (q pre-scaled by scale·log2 e) because torch's exp2 is many times
  faster than exp on CPUs, the same move FlashAttention makes on GPUs;
* the running maximum is subtracted inside the score GEMM (baddbmm with -m as its input), and a key
  tile only recomputes its own maximum when the lagged one would overflow (checked on l) — the
  common case is GEMM, exp2, GEMM;
* a column of ones appended to v makes the second GEMM produce l alongside the accumulator;
* low-precision inputs are computed in float32, as FlashAttention accumulates, and cast back.
"""

from __future__ import annotations

import torch

from harness.checks import check_qkv
from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS

LOG2E = 1.4426950408889634
# A score tile holds at most this many elements per head group (float32: 2 MiB, an L2's worth).
TILE_ELEMENTS = 1 << 19
Q_TILE = 512
K_TILE = 512
# A key tile whose row sum exceeds 2**OVERFLOW_LOG2 under the lagged maximum is redone exactly:
# far below float32's 2**127, so nothing on the fast path can overflow.
OVERFLOW_LIMIT = 2.0**40


def _tile_sizes(heads: int, n_q: int, n_kv: int) -> tuple[int, int, int]:
    k_tile = min(n_kv, K_TILE)
    q_tile = min(n_q, Q_TILE, max(1, TILE_ELEMENTS // k_tile))
    group = max(1, min(heads, TILE_ELEMENTS // (q_tile * k_tile)))
    return group, q_tile, k_tile


def _apply_masks(scores: torch.Tensor, masks: list[torch.Tensor]) -> None:
    for mask in masks:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask, alpha=LOG2E)  # scores are in base 2, so is the additive mask


@register("memory_efficient", variants=DOT_PRODUCT_VARIANTS)
def memory_efficient(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tiled exact attention with an online (running max / log-sum-exp) softmax, O(N) extra memory."""
    check_qkv(q, k, v, mask)
    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale

    qs = q.to(work) * (scale * LOG2E)
    k_t = k.to(work).transpose(-2, -1)
    v_ones = torch.cat([v.to(work), v.new_ones((*v.shape[:3], 1), dtype=work)], dim=-1)
    out = torch.empty(q.shape, dtype=work, device=q.device)
    if mask is None:
        # Without a mask, batch and heads are one axis: fewer, larger tiles.
        qs, k_t, v_ones, out = (t.reshape(1, batch * heads, *t.shape[2:]) for t in (qs, k_t, v_ones, out))
    else:
        mask = mask.expand(batch, heads, n_q, n_kv)
    group, q_tile, k_tile = _tile_sizes(qs.shape[1], n_q, n_kv)
    scores_buffer = torch.empty(group * q_tile * k_tile, dtype=work, device=q.device)

    for b in range(qs.shape[0]):
        for h in range(0, qs.shape[1], group):
            hs = slice(h, min(h + group, qs.shape[1]))
            for i in range(0, n_q, q_tile):
                n = min(q_tile, n_q - i)
                q_i = qs[b, hs, i : i + n]
                g = q_i.shape[0]
                row_max = torch.full((g, n, 1), float("-inf"), dtype=work, device=q.device)
                acc = torch.zeros((g, n, head_dim + 1), dtype=work, device=q.device)
                exact_only = True  # until every row has seen a finite score
                for j in range(0, n_kv, k_tile):
                    if causal and j > i + n - 1:
                        break  # this and all later key tiles are fully masked for these rows
                    w = min(k_tile, n_kv - j)
                    tile_masks = [] if mask is None else [mask[b, hs, i : i + n, j : j + w]]
                    if causal and j + w - 1 > i:  # a tile on the diagonal
                        rows = torch.arange(i, i + n, device=q.device)[:, None]
                        tile_masks.append(torch.arange(j, j + w, device=q.device) <= rows)
                    s = scores_buffer[: g * n * w].view(g, n, w)
                    k_j, v_j = k_t[b, hs, :, j : j + w], v_ones[b, hs, j : j + w]
                    if not exact_only:
                        torch.baddbmm(row_max.neg(), q_i, k_j, out=s)
                        _apply_masks(s, tile_masks)
                        contribution = torch.bmm(s.exp2_(), v_j)
                        if contribution[..., head_dim].max().item() <= OVERFLOW_LIMIT:
                            acc.add_(contribution)
                            continue
                    # Exact step: this tile's own maximum, rescaling what came before.
                    torch.bmm(q_i, k_j, out=s)
                    _apply_masks(s, tile_masks)
                    new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
                    offset = new_max.masked_fill(torch.isneginf(new_max), 0.0)
                    acc.mul_(torch.exp2(row_max - offset)).baddbmm_(s.sub_(offset).exp2_(), v_j)
                    row_max = new_max
                    exact_only = bool(torch.isneginf(row_max).any())
                # Rows that saw no key have l = 0 and acc = 0: the clamp makes them 0, not NaN.
                torch.div(acc[..., :head_dim], acc[..., head_dim:].clamp_min(1e-30), out=out[b, hs, i : i + n])
    return out.reshape(batch, heads, n_q, head_dim).to(out_dtype)
