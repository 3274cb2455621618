"""`triton`: the harness's own fused FlashAttention-2 kernel (forward and backward), in Triton.

The kernels are in `kernels.py`, imported on first call: importing triton costs seconds and pulls in
CUDA libraries, and triton reads TRITON_INTERPRET when a kernel is decorated. The implementation runs
where triton can: on CUDA, or on CPU tensors under the interpreter (TRITON_INTERPRET=1, slow: tests
and debugging). float16 and bfloat16 go through the tensor cores with float32 accumulators; float32
multiplies in IEEE float32 unless TF32 is allowed (torch.backends.cuda.matmul.allow_tf32).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS

DTYPES = ("float32", "float16", "bfloat16")
MAX_HEAD_DIM = 256


@functools.cache
def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return ""
    import triton

    return triton.__version__


def triton_available(
    device: str | None = None,
    dtype: str | None = None,
    head_dim: int | None = None,
    masked: bool = False,
    **_: object,
) -> tuple[bool, str]:
    if not _triton_version():
        return False, "triton is not installed (pip install -e '.[triton]')"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            return False, "no CUDA device"
    elif str(device) == "cpu":
        if not interpreted:
            return False, "triton compiles for GPUs; on a CPU it runs only under the interpreter (TRITON_INTERPRET=1)"
    else:
        return False, f"not written for {device}"
    if dtype is not None and dtype not in DTYPES:
        return False, f"the triton kernel takes {', '.join(DTYPES)}, not {dtype}"
    if head_dim is not None and int(head_dim) > MAX_HEAD_DIM:
        return False, f"head_dim {head_dim} > {MAX_HEAD_DIM}: a query tile would not fit on chip"
    if masked:
        return False, "the triton kernel takes causal attention, not arbitrary masks"
    return True, ""


@functools.cache
def _kernels():
    from implementations.triton_flash import kernels

    return kernels


class _FlashAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the base-2 log-sum-exp per row: O(N) memory for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, offset, mods):
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
        out, lse = _kernels().forward(q, k, v, causal, scale, offset, allow_tf32, mods)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, scale, offset, allow_tf32, mods)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, offset, allow_tf32, mods = ctx.options
        dq, dk, dv = _kernels().backward(q, k, v, out, lse, dout, causal, scale, offset, allow_tf32, mods)
        return dq, dk, dv, None, None, None, None


# Every score modifier, in the kernel: the tile loops' bounds follow the window and the documents.
MODS = ("window", "softcap", "alibi", "documents")


def triton_setup(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens=None, **_: object) -> dict:
    """The registry `setup`: documents as per-token arrays (index, first, last + 1), built once per case
    (setup_s), as a training step builds them once per batch for all its layers."""
    if cu_seqlens is None:
        return {}
    return {"documents": _kernels().documents(cu_seqlens, q.shape[0], q.shape[2])}


def _attention(
    q,
    k,
    v,
    causal: bool,
    scale: float | None,
    mask: torch.Tensor | None,
    offset: int,
    documents: dict | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **mods: object,
) -> torch.Tensor:
    if mask is not None:
        raise ValueError("triton: the kernel takes causal attention, not arbitrary masks (mask must be None)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None and documents is None:  # a direct call, without the registry's setup
        documents = triton_setup(q, k, v, cu_seqlens=cu_seqlens)["documents"]
    options = {key: value for key, value in mods.items() if value is not None} | (documents or {})
    return _FlashAttention.apply(q, k, v, causal, scale, offset, options)


@register(
    "triton", variants=DOT_PRODUCT_VARIANTS, available=triton_available, compiles=True, mods=MODS, setup=triton_setup
)
def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    **mods: object,
) -> torch.Tensor:
    """Fused FlashAttention-2 in Triton (online softmax in base 2, causal tiles skipped, GQA), with its backward."""
    return _attention(q, k, v, causal, scale, mask, 0, **mods)


# Decode also reads ragged and paged caches: each program loads its request's length, and every key
# through the block table (page key // P, slot key % P), so a page size need not divide anything.
DECODE_MODS = ("window", "softcap", "alibi", "page_size", "ragged")


@register("triton", variants=("decode",), available=triton_available, compiles=True, mods=DECODE_MODS)
def triton_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    **mods: object,
) -> torch.Tensor:
    """The same kernel for decode: causality offset to the bottom-right corner of the cache."""
    return _attention(q, k, v, causal, scale, mask, k.shape[2] - q.shape[2], **mods)
