"""FlashInfer's batch decode over a paged KV cache (`BatchDecodeWithPagedKVCacheWrapper`), CUDA.

Serving stacks (SGLang, vLLM's FlashInfer backend) call it this way: a `plan` per batch layout (which
pages each request owns, how full its last page is), then `run` per layer and step. The plan is the
registry's `setup`, timed apart as setup_s; each timed call is one `run`. FlashInfer takes one new token
per request, so Nq > 1 is unavailable. Imported on first use; install with `pip install -e ".[flashinfer]"`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from harness import registry
from harness.registry import register
from implementations.external import _installed

WORKSPACE_BYTES = 128 << 20  # FlashInfer's suggested float workspace for its split-KV decode


def _import() -> Any:
    return importlib.import_module("flashinfer")


def flashinfer_available(device: str | None = None, dtype: str | None = None, **case: object) -> tuple[bool, str]:
    ok, why = _installed("flashinfer", extra="flashinfer")
    if not ok:
        return ok, why
    ok, why = registry.needs_cuda(device)
    if not ok:
        return ok, why
    if case.get("page_size") is None:
        return False, "flashinfer's batch decode reads a paged KV cache: this adapter runs cases with page_size"
    if int(case.get("seq_len") or 1) != 1:
        return False, "BatchDecodeWithPagedKVCacheWrapper takes one new token per request (Nq = 1)"
    if dtype == "float32":
        return False, "flashinfer's decode kernels take float16 and bfloat16, not float32"
    return True, ""


def make_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cache_lens=None, block_table=None, **_: object
) -> dict:
    """The registry `setup`: the wrapper planned for this batch's pages (indptr, indices, last-page lengths)."""
    flashinfer = _import()
    page = k.shape[1]
    counts = (cache_lens.long() + page - 1) // page
    indptr = torch.zeros(len(counts) + 1, dtype=torch.int32, device=q.device)
    indptr[1:] = torch.cumsum(counts, 0)
    used = torch.arange(block_table.shape[1], device=q.device)[None, :] < counts[:, None]
    indices = block_table[used].to(torch.int32)  # each request's pages in table order, concatenated
    last = (cache_lens - (counts.to(torch.int32) - 1) * page).to(torch.int32)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
    wrapper.plan(
        indptr,
        indices,
        last,
        q.shape[1],
        k.shape[2],
        q.shape[3],
        page,
        pos_encoding_mode="NONE",
        q_data_type=q.dtype,
        kv_data_type=k.dtype,
    )
    return {"plan": wrapper}


@register(
    "flashinfer",
    variants=("decode",),
    available=flashinfer_available,
    mods=("page_size", "ragged"),
    setup=make_plan,
)
def flashinfer_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    cache_lens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    plan: Any = None,
) -> torch.Tensor:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper over the pool (NHD pages), planned once per case."""
    if mask is not None or q.shape[2] != 1 or block_table is None:
        raise ValueError("flashinfer: one new token per request against a paged cache, no mask")
    if plan is None:  # a direct call, without the registry's setup
        plan = make_plan(q, k, v, cache_lens=cache_lens, block_table=block_table)["plan"]
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("flashinfer adapter: only the default softmax scale 1/sqrt(D) is mapped")
    out = plan.run(q[:, :, 0], (k, v))  # (B, H, D)
    return out[:, :, None]
