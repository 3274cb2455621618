"""torch's scaled_dot_product_attention: `sdpa` lets torch choose, `sdpa.<backend>` pins one.

Whether a pinned backend runs depends on device, dtype, head_dim, masks and torch's build, so
availability is answered by trying it on a tiny input of the case's kind, not by a hand-kept table.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.registry import register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import bottom_right_mask, merge, per_request, positions, with_causal


@functools.cache
def _causal_lower_right():
    """torch >= 2.3's bottom-right causal bias, which the flash and efficient backends take as such (None
    before). Imported on first use: torch.nn.attention.bias imports torch._dynamo, 1.5 s that every
    worker, CLI and test process would pay at registration."""
    try:
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:
        return None
    return causal_lower_right


BACKENDS: dict[str, SDPBackend | None] = {
    "sdpa": None,
    "sdpa.math": SDPBackend.MATH,
    "sdpa.flash": SDPBackend.FLASH_ATTENTION,
    "sdpa.efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa.cudnn": SDPBackend.CUDNN_ATTENTION,
}


def _call(
    backend: SDPBackend | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None,
    mask: torch.Tensor | None,
    decode: bool = False,
) -> torch.Tensor:
    if decode and causal:  # decode's new tokens see the cache bottom-right
        n_q, n_kv = q.shape[2], k.shape[2]
        causal = False
        if n_q > 1 and mask is None and _causal_lower_right() is not None:
            mask = _causal_lower_right()(n_q, n_kv)
        elif n_q > 1:
            mask = merge(mask, bottom_right_mask(n_q, n_kv, str(q.device)))
    if mask is not None and causal:
        # SDPA refuses attn_mask together with is_causal; fold the causal mask in instead.
        mask, causal = with_causal(mask, True, q.shape[2], k.shape[2], q.device), False
    # Grouped-query attention natively (torch >= 2.5): k and v keep their fewer heads.
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **gqa)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **gqa)


@functools.lru_cache(maxsize=256)
def _probe(
    backend: SDPBackend | None,
    device: str,
    dtype: str,
    head_dim: int,
    causal: bool,
    masked: bool,
    cross: bool,
    grouped: bool = False,
    decode: bool = False,
) -> tuple[bool, str]:
    if device.startswith("cuda") and not torch.cuda.is_available():
        return False, "no CUDA device"
    torch_type = getattr(torch, dtype)
    n_q, n_kv = (8, 12) if cross or decode else (8, 8)
    q = torch.randn(1, 2, n_q, head_dim, device=device, dtype=torch_type)
    k = torch.randn(1, 1 if grouped else 2, n_kv, head_dim, device=device, dtype=torch_type)
    mask = torch.ones(n_q, n_kv, dtype=torch.bool, device=device) if masked else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _call(backend, q, k, k, causal or decode, None, mask, decode)
        except Exception:
            # torch explains in warnings why each backend declined; they beat the generic error.
            why = [str(w.message).splitlines()[0] for w in caught if "ignore" not in str(w.message).lower()]
            kernel = backend.name if backend else "SDPA"
            detail = f": {why[0][:100]}" if why else ""
            return False, f"torch {torch.__version__} has no {kernel} kernel for {device}/{dtype}{detail}"
    return True, ""


def _availability(backend: SDPBackend | None, decode: bool = False):
    def check(
        device: str | None = None,
        dtype: str | None = None,
        head_dim: int = 64,
        causal: bool = False,
        masked: bool = False,
        seq_len_kv: int | None = None,
        kv_heads: int | None = None,
        heads: int = 1,
        softcap: float | None = None,
        window: int | None = None,
        alibi: bool = False,
        documents: int | None = None,
        page_size: int | None = None,
        **_: object,
    ) -> tuple[bool, str]:
        if softcap is not None:
            return False, SOFTCAP_REASON
        if page_size is not None:
            return False, PAGED_REASON
        masked = masked or window is not None or alibi or documents is not None  # they arrive as a mask
        if device is None:
            # "In general": does it run on any device this machine has, in a dtype it is meant for?
            tries = [("cpu", "float32")]
            if torch.cuda.is_available():
                tries += [("cuda", "float16"), ("cuda", "bfloat16")]
            results = [_probe(backend, dev, dt, 64, False, False, False, False, decode) for dev, dt in tries]
            return next((r for r in results if r[0]), results[-1])
        grouped = kv_heads is not None and kv_heads != heads
        return _probe(
            backend,
            str(device),
            dtype or "float32",
            int(head_dim),
            bool(causal),
            bool(masked),
            seq_len_kv is not None,
            grouped,
            decode,
        )

    return check


# Window, ALiBi and documents become one dense mask or bias from `setup`; softcap cannot (see below).
MODS = ("window", "alibi", "documents")
PAGED_REASON = (
    "scaled_dot_product_attention reads one contiguous cache per call, not pages through a block table "
    "(a gather of every request's pages would be another kernel's work, not done silently)"
)
SOFTCAP_REASON = (
    "softcap is nonlinear in the score (c·tanh(s/c)) and scaled_dot_product_attention takes only an "
    "additive mask, so it cannot apply it"
)


def position_setup(decode: bool):
    """The registry `setup` of a dense-mask kernel: the window, ALiBi and documents (with causality) as
    one mask (B|1, H|1, Nq, Nkv), boolean or additive in q's dtype, built once per case (its memory is
    the kernel's: N=8192 is 64 MiB as booleans, 256 MiB per head as a float32 ALiBi bias), and which
    rows see no key at all (their output is zeros by the harness's policy; SDPA would give NaN)."""

    def setup(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, **kwargs) -> dict:
        mods = {key: kwargs[key] for key in ("window", "alibi_slopes", "cu_seqlens") if kwargs.get(key) is not None}
        if not mods:
            return {}
        offset = k.shape[2] - q.shape[2] if decode else 0
        where = positions(q, k, causal or decode, offset, **mods)
        rows, cols = torch.arange(q.shape[2], device=q.device), torch.arange(k.shape[2], device=q.device)
        dense = where.mask(rows, cols, q.dtype)
        hidden = ~dense if dense.dtype == torch.bool else torch.isneginf(dense)
        empty = hidden.all(dim=-1, keepdim=True)
        return {"position_mask": dense, **({"empty_rows": empty} if bool(empty.any()) else {})}

    return setup


def _make(name: str, backend: SDPBackend | None, decode: bool = False):
    setup = position_setup(decode)

    def sdpa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        mask: torch.Tensor | None = None,
        position_mask: torch.Tensor | None = None,
        empty_rows: torch.Tensor | None = None,
        cache_lens: torch.Tensor | None = None,
        **mods: object,
    ) -> torch.Tensor:
        if cache_lens is not None:  # a ragged batch: one call per request on a view of its own keys
            if mods or mask is not None:
                raise ValueError(f"{name}: score modifiers or a mask with a ragged cache are not mapped")

            def one(q_b, k_b, v_b, *, causal, offset, scale):
                return _call(backend, q_b, k_b, v_b, causal, scale, None, decode=True)

            return per_request(one, q, k, v, cache_lens, None, scale=scale)
        if mods and position_mask is None:  # called directly, without the registry's setup
            prepared = setup(q, k, v, causal=causal, **mods)
            position_mask, empty_rows = prepared.get("position_mask"), prepared.get("empty_rows")
        if position_mask is None:
            return _call(backend, q, k, v, causal, scale, mask, decode)
        out = _call(backend, q, k, v, False, scale, merge(mask, position_mask), False)  # causality is in it
        return out if empty_rows is None else out.masked_fill(empty_rows, 0.0)

    sdpa.__name__ = sdpa.__qualname__ = name.replace(".", "_") + ("_decode" if decode else "")
    what = "backend chosen by torch" if backend is None else f"pinned to {backend.name}"
    register(
        name,
        ("decode",) if decode else DOT_PRODUCT_VARIANTS,
        summary=f"torch scaled_dot_product_attention, {what}" + (" (decode: causal_lower_right)" if decode else ""),
        available=_availability(backend, decode),
        mods=(*MODS, "ragged") if decode else MODS,
        setup=setup,
    )(sdpa)
    return sdpa


for _name, _backend in BACKENDS.items():
    _make(_name, _backend)
    _make(_name, _backend, decode=True)
