"""Kernels from other packages: xformers' memory_efficient_attention and flash-attn's flash_attn_func.

Both take (batch, seq_len, heads, head_dim) tensors, so the adapters transpose the harness's
(batch, heads, seq_len, head_dim) views (no copy; the kernels accept strided inputs, or copy
themselves and that copy is part of their cost). The packages are imported on first use, not when the
registry loads: importing them pulls in triton and CUDA libraries. Install them with
`pip install -e ".[gpu]"` on a CUDA machine.
"""

from __future__ import annotations

import importlib

import torch

from harness.registry import needs_cuda, register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import with_causal

FLASH_DTYPES = ("float16", "bfloat16")


def _installed(package: str) -> tuple[bool, str]:
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name == package:
            return False, f"{package} is not installed (pip install -e '.[gpu]' on a CUDA machine)"
        return False, f"{package} is installed but fails to import: {exc}"
    except Exception as exc:  # installed but broken, e.g. built for another torch
        return False, f"{package} is installed but fails to import: {type(exc).__name__}: {str(exc)[:120]}"
    return True, ""


def _check(package: str, dtypes: tuple[str, ...] | None = None):
    def check(device: str | None = None, dtype: str | None = None, **case: object) -> tuple[bool, str]:
        ok, why = _installed(package)
        if not ok:
            return ok, why
        ok, why = needs_cuda(device)
        if not ok:
            return ok, why
        if dtypes and dtype is not None and dtype not in dtypes:
            return False, f"{package} supports {', '.join(dtypes)} only, not {dtype}"
        if package == "flash_attn" and case.get("causal") and case.get("seq_len_kv") not in (None, case.get("seq_len")):
            return False, "flash_attn aligns causal masks bottom-right when Nq != Nkv; the harness means top-left"
        return True, ""

    return check


def _bhnd_to_bnhd(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(1, 2) for t in tensors]


@register("xformers", variants=DOT_PRODUCT_VARIANTS, available=_check("xformers"))
def xformers_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """xformers.ops.memory_efficient_attention (CUTLASS/flash dispatch chosen by xformers)."""
    import xformers.ops as xops

    batch, heads, n_q, _ = q.shape
    n_kv = k.shape[2]
    bias: object = None
    empty_rows = None
    if mask is None and causal:
        bias = xops.LowerTriangularMask()  # top-left aligned, like is_causal
    elif mask is not None:
        full = with_causal(mask, causal, n_q, n_kv, q.device).expand(batch, heads, n_q, n_kv)
        if full.dtype == torch.bool:
            empty_rows = ~full.any(dim=-1, keepdim=True)
            additive = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~full, float("-inf"))
        else:
            empty_rows = torch.isneginf(full).all(dim=-1, keepdim=True)
            additive = full.to(q.dtype)
        # xformers wants the bias's rows 8-element aligned: pad the storage, pass a view.
        padded = torch.empty((batch, heads, n_q, -(-n_kv // 8) * 8), dtype=q.dtype, device=q.device)
        bias = padded[..., :n_kv].copy_(additive)
    out = xops.memory_efficient_attention(*_bhnd_to_bnhd(q, k, v), attn_bias=bias, scale=scale).transpose(1, 2)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)  # the harness's policy: a row that sees no key is zeros
    return out


@register("flash_attn", variants=DOT_PRODUCT_VARIANTS, available=_check("flash_attn", FLASH_DTYPES))
def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash-attn's flash_attn_func (Tri Dao's CUDA kernels; float16/bfloat16, no arbitrary masks)."""
    if mask is not None:
        raise ValueError("flash_attn: flash_attn_func takes no attention mask (mask must be None)")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            "flash_attn: causal with Nq != Nkv is aligned bottom-right by flash-attn, top-left by the harness"
        )
    if str(q.dtype).removeprefix("torch.") not in FLASH_DTYPES:
        raise ValueError(f"flash_attn: dtype must be one of {', '.join(FLASH_DTYPES)}, got {q.dtype}")
    from flash_attn import flash_attn_func

    out = flash_attn_func(*_bhnd_to_bnhd(q, k, v), softmax_scale=scale, causal=causal)
    return out.transpose(1, 2)
