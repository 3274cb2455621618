"""Kernels from other packages: xformers' memory_efficient_attention and flash-attn's flash_attn_func
(for decode, flash_attn_with_kvcache, the kernel serving stacks call with a KV cache).

Both take (batch, seq_len, heads, head_dim) tensors, so the adapters transpose the harness's
(batch, heads, seq_len, head_dim) views (no copy; the kernels accept strided inputs, or copy
themselves and that copy is part of their cost). The packages are imported on first use, not when the
registry loads: importing them pulls in triton and CUDA libraries. Install them with
`pip install -e ".[gpu]"` on a CUDA machine.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

import torch

from harness import registry
from harness.errors import first_line
from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import bottom_right_mask, merge, with_causal

FLASH_DTYPES = ("float16", "bfloat16")
FLASH_PAGE_MULTIPLE = 256  # flash-attn 2's paged KV cache: page_block_size must be a multiple of 256


def _installed(package: str, extra: str = "gpu") -> tuple[bool, str]:
    """Whether `package` imports, and if not, why: missing (and which extra installs it) or broken."""
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name == package:
            return False, f"{package} is not installed (pip install -e '.[{extra}]' on a CUDA machine)"
        return False, f"{package} is installed but fails to import: {exc}"
    except Exception as exc:  # installed but broken, e.g. built for another torch
        return False, f"{package} is installed but fails to import: {type(exc).__name__}: {str(exc)[:120]}"
    return True, ""


_PROBES: dict[tuple, tuple[bool, str]] = {}


def _probe(package: str, kernel: Callable, device: str, dtype: str, head_dim: int, causal: bool) -> tuple[bool, str]:
    """Run the adapter once on a tiny input of this device, dtype and head_dim; cache the answer.

    A package can import and still be unable to run (an xformers wheel built for another torch imports,
    then fails to load its CUDA ops): only a call tells, and the package's own words are the reason.
    """
    key = (package, id(sys.modules.get(package)), device, dtype, head_dim, causal)
    if key not in _PROBES:
        torch_type = getattr(torch, dtype)
        q, k, v = (torch.randn(1, 2, 16, head_dim, device=device, dtype=torch_type) for _ in range(3))
        try:
            kernel()(q, k, v, causal=causal)
            _PROBES[key] = (True, "")
        except Exception as exc:
            words = first_line(exc, 300) or type(exc).__name__
            _PROBES[key] = (False, f"{package} imports but cannot run on {device}/{dtype}: {words}")
    return _PROBES[key]


def _check(package: str, kernel: Callable[[], Callable], dtypes: tuple[str, ...] | None = None, decode: bool = False):
    def check(device: str | None = None, dtype: str | None = None, **case: object) -> tuple[bool, str]:
        ok, why = _installed(package)
        if not ok:
            return ok, why
        ok, why = registry.needs_cuda(device)
        if not ok:
            return ok, why
        if dtypes and dtype is not None and dtype not in dtypes:
            return False, f"{package} supports {', '.join(dtypes)} only, not {dtype}"
        if package == "xformers" and case.get("kv_heads") not in (None, case.get("heads")):
            return False, "the xformers adapter maps multi-head inputs only (GQA needs xformers' 5-D BMGHK layout)"
        cross = case.get("seq_len_kv") not in (None, case.get("seq_len")) and not decode
        aligned = [what for what in ("causal", "window", "alibi") if case.get(what) not in (None, False)]
        if package == "flash_attn" and cross and aligned:
            return False, (
                f"flash_attn aligns {' and '.join(aligned)} bottom-right when Nq != Nkv; the harness means top-left"
            )
        if package == "flash_attn" and decode and case.get("page_size") and case["page_size"] % FLASH_PAGE_MULTIPLE:
            return False, (
                f"flash-attn 2's paged KV cache takes page sizes divisible by {FLASH_PAGE_MULTIPLE} "
                f"(flash_attn_with_kvcache's page_block_size), not {case['page_size']}"
            )
        if package == "xformers":
            why = _xformers_refusal(case, cross, decode)
            if why:
                return False, why
        if device is None:  # "in general": try the device this machine has, in a dtype every package takes
            device, dtype = "cuda", "float16"
        return _probe(
            package, kernel, str(device), dtype or "float16", int(case.get("head_dim") or 64), bool(case.get("causal"))
        )

    return check


def _xformers_refusal(case: dict, cross: bool, decode: bool) -> str:
    """Why the xformers adapter cannot map a case's score modifiers exactly ('' when it can)."""
    if case.get("softcap") is not None:
        return "xformers' memory_efficient_attention has no soft-capping"
    if case.get("alibi"):
        return "xformers has no ALiBi bias type (a dense bias tensor would be another kernel's work)"
    window, documents = case.get("window"), case.get("documents")
    if window is not None and cross:
        return "xformers' local attention masks align bottom-right when Nq != Nkv; the harness means top-left"
    if window is not None and documents is not None and not case.get("causal"):
        return "xformers has block-diagonal local attention only for causal documents"
    return ""


def _bhnd_to_bnhd(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(1, 2) for t in tensors]


def _xformers_bias(causal: bool, decode: bool, window: int | None, doc_lens: list[int] | None) -> object:
    """The xformers attention-bias object for causality, a window and documents (no tensor of scores)."""
    import xformers.ops as xops

    biases = xops.fmha.attn_bias
    if doc_lens is not None:
        if not causal:
            return biases.BlockDiagonalMask.from_seqlens(doc_lens)
        blocks = biases.BlockDiagonalCausalMask.from_seqlens(doc_lens)
        # xformers' window counts the query itself: keys j > i - window_size, so W keys behind is W + 1.
        return blocks if window is None else blocks.make_local_attention(window + 1)
    if window is not None:  # Nq = Nkv (or decode, bottom-right as meant): keys i - W ..= i (+ W)
        return biases.LocalAttentionFromBottomRightMask(window_left=window, window_right=0 if causal else window)
    if causal:
        return biases.LowerTriangularFromBottomRightMask() if decode else xops.LowerTriangularMask()
    return None


def xformers_setup(decode: bool):
    """The registry `setup`: the bias object of a case's window and documents, built once (setup_s)."""

    def setup(q, k, v, *, causal: bool = False, window=None, cu_seqlens=None, **_: object) -> dict:
        if window is None and cu_seqlens is None:
            return {}
        doc_lens = None if cu_seqlens is None else torch.diff(cu_seqlens).tolist()
        causal = (causal and q.shape[2] > 1) or (decode and window is not None)
        return {"attn_bias": _xformers_bias(causal, decode, window, doc_lens)}

    return setup


def _xformers(
    q,
    k,
    v,
    causal: bool,
    scale: float | None,
    mask: torch.Tensor | None,
    decode: bool,
    attn_bias: object = None,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **unsupported: object,
) -> torch.Tensor:
    import xformers.ops as xops

    batch, heads, n_q, _ = q.shape
    n_kv = k.shape[2]
    if k.shape[1] != heads:
        raise ValueError("xformers adapter: grouped-query attention (fewer k/v heads) is not mapped to BMGHK yet")
    if unsupported:
        raise ValueError(f"xformers adapter: no mapping for {', '.join(unsupported)}")
    if window is not None or cu_seqlens is not None:
        if mask is not None:
            raise ValueError("xformers adapter: a user mask together with a window or documents is not mapped")
        if attn_bias is None:  # a direct call, without the registry's setup
            attn_bias = xformers_setup(decode)(q, k, v, causal=causal, window=window, cu_seqlens=cu_seqlens)[
                "attn_bias"
            ]
        if cu_seqlens is None:
            out = xops.memory_efficient_attention(*_bhnd_to_bnhd(q, k, v), attn_bias=attn_bias, scale=scale)
            return out.transpose(1, 2)
        # Packed documents: one sequence of B·N tokens (1, B·N, H, D); the copy is the adapter's cost.
        packed = [t.transpose(1, 2).reshape(1, batch * t.shape[2], t.shape[1], t.shape[3]) for t in (q, k, v)]
        out = xops.memory_efficient_attention(*packed, attn_bias=attn_bias, scale=scale)
        return out.view(batch, n_q, heads, -1).transpose(1, 2)
    if decode and causal and mask is not None:  # decode's causality folded into the user mask
        mask, causal = merge(mask, bottom_right_mask(n_q, n_kv, str(q.device))), False
    bias: object = None
    empty_rows = None
    if mask is None and causal:
        # top-left like is_causal; decode's new tokens sit at the end of the cache: bottom-right
        bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if decode else xops.LowerTriangularMask()
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


# What the adapters map onto the packages' own arguments (other combinations: unavailable, with the reason).
XFORMERS_MODS = ("window", "documents")
FLASH_MODS = ("window", "softcap", "alibi", "documents")


@register(
    "xformers",
    variants=DOT_PRODUCT_VARIANTS,
    available=_check("xformers", lambda: xformers_attention),
    mods=XFORMERS_MODS,
    setup=xformers_setup(False),
)
def xformers_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    **mods: object,
) -> torch.Tensor:
    """xformers.ops.memory_efficient_attention (CUTLASS/flash dispatch chosen by xformers)."""
    return _xformers(q, k, v, causal, scale, mask, decode=False, **mods)


@register(
    "xformers",
    variants=("decode",),
    available=_check("xformers", lambda: xformers_decode, decode=True),
    mods=("window",),
    setup=xformers_setup(True),
)
def xformers_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    **mods: object,
) -> torch.Tensor:
    """xformers.ops.memory_efficient_attention, decode's causality as LowerTriangularFromBottomRightMask."""
    return _xformers(q, k, v, causal, scale, mask, decode=True, **mods)


def _flash_inputs(kernel: str, q: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is not None:
        raise ValueError(f"flash_attn: {kernel} takes no attention mask (mask must be None)")
    if str(q.dtype).removeprefix("torch.") not in FLASH_DTYPES:
        raise ValueError(f"flash_attn: dtype must be one of {', '.join(FLASH_DTYPES)}, got {q.dtype}")


def _flash_mods(causal: bool, window: int | None, softcap: float | None, alibi_slopes) -> dict:
    """The harness's modifiers as flash-attn's keyword arguments (window_size=(left, right), softcap,
    alibi_slopes (H,) float32); only those a case sets, so older flash-attn versions still run plain cases."""
    kwargs: dict = {}
    if window is not None:
        kwargs["window_size"] = (window, 0 if causal else window)
    if softcap is not None:
        kwargs["softcap"] = softcap
    if alibi_slopes is not None:
        kwargs["alibi_slopes"] = alibi_slopes.to(torch.float32)
    return kwargs


def flash_setup(q, k, v, *, cu_seqlens=None, **_: object) -> dict:
    """The registry `setup` of packed documents: flash_attn_varlen_func's longest document (a host int it
    needs; reading it from cu_seqlens inside the call would synchronise), once per case."""
    if cu_seqlens is None:
        return {}
    return {"max_seqlen": int(torch.diff(cu_seqlens).max())}


@register(
    "flash_attn",
    variants=DOT_PRODUCT_VARIANTS,
    available=_check("flash_attn", lambda: flash_attn, FLASH_DTYPES),
    mods=FLASH_MODS,
    setup=flash_setup,
)
def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """flash-attn's flash_attn_func (Tri Dao's CUDA kernels; float16/bfloat16, no arbitrary masks);
    packed documents through flash_attn_varlen_func."""
    _flash_inputs("flash_attn_func", q, mask)
    if (causal or window is not None or alibi_slopes is not None) and q.shape[2] != k.shape[2]:
        raise ValueError(
            "flash_attn: causal, window and ALiBi with Nq != Nkv are aligned bottom-right by flash-attn, "
            "top-left by the harness"
        )
    mods = _flash_mods(causal, window, softcap, alibi_slopes)
    if cu_seqlens is None:
        from flash_attn import flash_attn_func

        out = flash_attn_func(*_bhnd_to_bnhd(q, k, v), softmax_scale=scale, causal=causal, **mods)
        return out.transpose(1, 2)
    from flash_attn import flash_attn_varlen_func

    batch, heads, n, head_dim = q.shape
    if max_seqlen is None:  # a direct call, without the registry's setup
        max_seqlen = flash_setup(q, k, v, cu_seqlens=cu_seqlens)["max_seqlen"]
    # (B·N, H, D) packed tokens: the transposing copy from the harness's (B, H, N, D) is the adapter's cost.
    packed = [t.transpose(1, 2).reshape(batch * n, t.shape[1], head_dim) for t in (q, k, v)]
    out = flash_attn_varlen_func(
        *packed, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal, **mods
    )
    return out.view(batch, n, heads, head_dim).transpose(1, 2)


@register(
    "flash_attn",
    variants=("decode",),
    available=_check("flash_attn", lambda: flash_attn_decode, FLASH_DTYPES, decode=True),
    mods=("window", "softcap", "alibi", "page_size", "ragged"),
)
def flash_attn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cache_lens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash-attn's flash_attn_with_kvcache: the new tokens against the cache (bottom-right causal, GQA),
    ragged through cache_seqlens, paged through block_table."""
    _flash_inputs("flash_attn_with_kvcache", q, mask)
    from flash_attn import flash_attn_with_kvcache

    # Decode is bottom-right, as flash-attn aligns everything with a cache: a window is causal here.
    mods = _flash_mods(True, window, softcap, alibi_slopes)
    if cache_lens is not None:
        mods["cache_seqlens"] = cache_lens
    if block_table is not None:
        # The pool (num_pages, P, H_kv, D) is flash-attn's paged k_cache layout as it is.
        mods["block_table"] = block_table
        out = flash_attn_with_kvcache(q.transpose(1, 2), k, v, softmax_scale=scale, causal=causal, **mods)
        return out.transpose(1, 2)
    # (B, Nq, H, D) and caches (B, Nkv, H_kv, D): transposed views, the head dimension contiguous.
    out = flash_attn_with_kvcache(*_bhnd_to_bnhd(q, k, v), softmax_scale=scale, causal=causal, **mods)
    return out.transpose(1, 2)
