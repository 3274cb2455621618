"""Exact attention tiled over queries and keys with an online softmax: extra memory O(N), not O(N²).

The recurrence is Rabe & Staats' / FlashAttention's: per query tile keep a running row maximum m,
a running denominator l and an unnormalised accumulator; each key tile rescales them. Four tricks
make it fast on a CPU without leaving Python:

* scores are computed in base 2 (q pre-scaled by scale·log2 e) because torch's exp2 is many times
  faster than exp on CPUs, the same move FlashAttention makes on GPUs;
* once every row has seen a finite score, later key tiles reuse that (lagged) maximum, subtracted
  inside the score GEMM (baddbmm with -m as its input), and accumulate in place: the common case
  is GEMM, exp2, GEMM; a query tile whose row sums show the lagged maximum was too low is redone
  with exact steps (checked once per query tile, not per key tile);
* a column of ones appended to v makes the second GEMM produce l alongside the accumulator;
* low-precision inputs are computed in float32, as FlashAttention accumulates, and cast back.
"""

from __future__ import annotations

import torch

from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS

LOG2E = 1.4426950408889634
# A score tile holds at most this many elements per head group (float32: 4 MiB). Tall query tiles
# matter most: each key tile is then read once for more rows (measured on a 2-core EPYC at N=4096:
# 1024x512 tiles 0.91-0.96x sdpa, 512x512 0.82x).
TILE_ELEMENTS = 1 << 20
Q_TILE = 1024
K_TILE = 512
# A query tile whose row sums exceed this under the lagged maximum is redone exactly: far below
# float32's 2**127, so nothing on the fast path can overflow unnoticed.
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


def _query_tile(
    q_i: torch.Tensor,
    k_t: torch.Tensor,
    v_ones: torch.Tensor,
    tiles: list[tuple[int, int, list[torch.Tensor]]],
    scores_buffer: torch.Tensor,
    exact: bool,
) -> torch.Tensor | None:
    """One query tile's unnormalised output with its row sums in the last column.

    Key tiles take exact steps (own maximum, rescaling what came before) until every row has seen a
    finite score; after that they use that lagged maximum: GEMM, exp2, GEMM accumulated in place.
    Returns None when the lagged path may have overflowed, so the caller redoes the tile exactly.
    """
    g, n, head_dim = q_i.shape[0], q_i.shape[1], v_ones.shape[-1] - 1
    row_max = torch.full((g, n, 1), float("-inf"), dtype=q_i.dtype, device=q_i.device)
    acc = torch.zeros((g, n, head_dim + 1), dtype=q_i.dtype, device=q_i.device)
    neg_offset: torch.Tensor | None = None  # -row_max once every row has a finite one
    for j, w, masks in tiles:
        s = scores_buffer[: g * n * w].view(g, n, w)
        k_j, v_j = k_t[:, :, j : j + w], v_ones[:, j : j + w]
        if neg_offset is not None:
            torch.baddbmm(neg_offset, q_i, k_j, out=s)
            _apply_masks(s, masks)
            acc.baddbmm_(s.exp2_(), v_j)
            continue
        torch.bmm(q_i, k_j, out=s)
        _apply_masks(s, masks)
        new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
        offset = new_max.masked_fill(torch.isneginf(new_max), 0.0)
        acc.mul_(torch.exp2(row_max - offset)).baddbmm_(s.sub_(offset).exp2_(), v_j)
        row_max = new_max
        if not exact and not bool(torch.isneginf(row_max).any()):
            neg_offset = row_max.neg()
    if neg_offset is not None and not (acc[..., head_dim].max().item() <= OVERFLOW_LIMIT and acc.isfinite().all()):
        return None
    return acc


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
    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale

    qs = q.to(work) * (scale * LOG2E)  # (B, H, Nq, D), scores come out in base 2
    k_t = k.to(work).transpose(-2, -1)  # (B, H, D, Nkv)
    v_ones = torch.cat([v.to(work), v.new_ones((*v.shape[:3], 1), dtype=work)], dim=-1)  # (B, H, Nkv, D + 1)
    out = torch.empty(q.shape, dtype=work, device=q.device)  # (B, H, Nq, D)
    if mask is None:
        # Without a mask, batch and heads are one axis: fewer, larger tiles.
        qs, k_t, v_ones, out = (t.reshape(1, batch * heads, *t.shape[2:]) for t in (qs, k_t, v_ones, out))
        # (1, B·H, Nq, D), (1, B·H, D, Nkv), (1, B·H, Nkv, D + 1), (1, B·H, Nq, D)
    else:
        mask = mask.expand(batch, heads, n_q, n_kv)  # (B, H, Nq, Nkv), a view: no copy
    group, q_tile, k_tile = _tile_sizes(qs.shape[1], n_q, n_kv)
    scores_buffer = torch.empty(group * q_tile * k_tile, dtype=work, device=q.device)  # one (G, Tq, Tk) tile

    for b in range(qs.shape[0]):
        for h in range(0, qs.shape[1], group):
            hs = slice(h, min(h + group, qs.shape[1]))
            for i in range(0, n_q, q_tile):
                n = min(q_tile, n_q - i)
                tiles = []
                for j in range(0, n_kv, k_tile):
                    if causal and j > i + n - 1:
                        break  # this and all later key tiles are fully masked for these rows
                    w = min(k_tile, n_kv - j)
                    masks = [] if mask is None else [mask[b, hs, i : i + n, j : j + w]]  # (G, n, w)
                    if causal and j + w - 1 > i:  # a tile on the diagonal
                        rows = torch.arange(i, i + n, device=q.device)[:, None]
                        masks.append(torch.arange(j, j + w, device=q.device) <= rows)  # (n, w)
                    tiles.append((j, w, masks))
                # q tile (G, n, D), all keys (G, D, Nkv) and values (G, Nkv, D + 1) of the head group
                args = (qs[b, hs, i : i + n], k_t[b, hs], v_ones[b, hs], tiles, scores_buffer)
                acc = _query_tile(*args, exact=False)  # (G, n, D + 1): unnormalised output | row sum
                if acc is None:
                    acc = _query_tile(*args, exact=True)
                # Rows that saw no key have l = 0 and acc = 0: the clamp makes them 0, not NaN.
                torch.div(acc[..., :head_dim], acc[..., head_dim:].clamp_min(1e-30), out=out[b, hs, i : i + n])
    return out.reshape(batch, heads, n_q, head_dim).to(out_dtype)
