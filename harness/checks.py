"""Argument checks every kernel runs first, so bad tensors fail loudly instead of broadcasting."""

from __future__ import annotations

import torch

from harness.errors import InputError


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise InputError unless q, k, v (and mask) fit the (B, H, N, D) attention signature."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must have rank 4 (batch, heads, seq_len, head_dim), got shape {_shape(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or k.shape[:2] != v.shape[:2] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise InputError(
            f"q, k and v must agree in batch and heads (k and v may have fewer heads that divide q's: "
            f"grouped-query attention), got {_shape(q)}, {_shape(k)}, {_shape(v)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise InputError(f"k's head_dim must equal q's: q {_shape(q)}, k {_shape(k)}")
    if k.shape[2] != v.shape[2]:
        raise InputError(f"k and v must have the same seq_len: k {_shape(k)}, v {_shape(v)}")
    if mask is not None:
        check_mask(mask, q, k)


def check_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_lens: torch.Tensor,
    block_table: torch.Tensor | None = None,
) -> None:
    """Raise InputError unless a ragged (cache_lens) or paged (block_table) KV cache fits the decode contract:
    k, v (B, H_kv, Nkv, D), or a pool of pages (num_pages, P, H_kv, D) with a (B, max_pages) int32 table."""
    if cache_lens.dtype != torch.int32 or cache_lens.shape != (q.shape[0],):
        raise InputError(
            f"cache_lens must be int32 of shape ({q.shape[0]},), got {cache_lens.dtype} {_shape(cache_lens)}"
        )
    if block_table is None:
        check_qkv(q, k, v)
        if int(cache_lens.max()) > k.shape[2] or int(cache_lens.min()) < q.shape[2]:
            raise InputError(f"cache_lens must lie in [Nq, Nkv] = [{q.shape[2]}, {k.shape[2]}]")
        return
    if k.dim() != 4 or k.shape != v.shape or k.dtype != q.dtype or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[2]:
        raise InputError(
            f"a paged cache is k, v (num_pages, page_size, kv_heads, head_dim) in q's dtype with kv_heads dividing "
            f"q's heads, got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
        )
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise InputError(f"block_table must be int32 (batch, max_pages), got {block_table.dtype} {_shape(block_table)}")
    needed = (cache_lens.long() + k.shape[1] - 1) // k.shape[1]
    if int(needed.max()) > block_table.shape[1]:
        raise InputError("block_table has fewer pages than cache_lens needs")
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < needed[:, None]
    pages = block_table[used]
    if len(pages) and (int(pages.min()) < 0 or int(pages.max()) >= k.shape[0]):
        raise InputError(f"block_table names a page outside the pool of {k.shape[0]} pages")


def check_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise InputError(f"mask must be bool (True = attend) or additive in q's dtype {q.dtype}, got {mask.dtype}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dim() > 4 or mask.dim() < 2:
        raise InputError(f"mask must have rank 2 to 4, broadcastable to {target}, got shape {_shape(mask)}")
    for have, want in zip(reversed(mask.shape), reversed(target), strict=False):
        if have not in (1, want):
            raise InputError(f"mask of shape {_shape(mask)} does not broadcast to (B, H, Nq, Nkv) = {target}")


def check_gate(x: torch.Tensor, g: torch.Tensor, weights: object) -> None:
    """Raise InputError unless x, g and the gate weights fit the additive attention gate."""
    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must have rank 4 (batch, channels, height, width), got {_shape(t)}")
    if x.dtype != g.dtype or x.device != g.device:
        raise InputError(f"x and g must share dtype and device, got {x.dtype}/{x.device} and {g.dtype}/{g.device}")
    if x.shape[0] != g.shape[0] or x.shape[2:] != g.shape[2:]:
        raise InputError(f"x and g must agree in batch and spatial size, got {_shape(x)} and {_shape(g)}")
    w_x, w_g = weights.w_x, weights.w_g  # type: ignore[attr-defined]
    if w_x.shape[1] != x.shape[1]:
        raise InputError(f"w_x expects {w_x.shape[1]} channels of x, x has {x.shape[1]}")
    if w_g.shape[1] != g.shape[1]:
        raise InputError(f"w_g expects {w_g.shape[1]} channels of g, g has {g.shape[1]}")
    if w_x.dtype != x.dtype:
        raise InputError(f"gate weights must be in x's dtype {x.dtype}, got {w_x.dtype}")
