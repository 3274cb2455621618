"""A paged decode kernel with the classic block-table bug: it reads a request's pages in sequential pool
order (sorted), not in the table's order. Right on an unfragmented pool, wrong on a server's; the
accuracy rule must catch it (tests/test_paged.py)."""

from __future__ import annotations

import torch

from harness import register
from implementations.masks import per_request
from implementations.naive import attend


@register("sequential_pages", variants=("decode",), mods=("page_size", "ragged"))
def sequential_pages(q, k, v, *, causal=False, scale=None, mask=None, cache_lens=None, block_table=None):
    """naive over each request's pages sorted by index."""
    if block_table is not None:
        block_table = torch.where(block_table < 0, block_table.max() + 1, block_table).sort(dim=1).values
        block_table = torch.where(block_table > k.shape[0] - 1, -1, block_table).to(torch.int32)
    return per_request(attend, q, k, v, cache_lens, block_table, scale=scale)
