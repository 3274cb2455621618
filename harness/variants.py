"""The attention variants: how to build their inputs and compute them exactly (their FLOPs: harness.shapes).

Each variant comes from one application in the article (see the table in README.md, "What is measured"). The float64
reference is the ground truth every implementation is measured against; it is computed in query-row
chunks so that it fits in memory at long sequence lengths.

torch is imported inside the functions that build or compute tensors, not at module level, so that
validating a suite file (names, shapes, rules) answers in a fraction of a second without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from harness import shapes
from harness.errors import InputError, unknown_name
from harness.shapes import DTYPE_NAMES, Params

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPE_NAMES:
        raise unknown_name("dtype", name, DTYPE_NAMES)
    return getattr(torch, name)


@dataclass
class Inputs:
    """Positional and keyword arguments of one kernel call; `call(fn)` runs a kernel on them."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    def call(self, fn: Callable) -> torch.Tensor:
        return fn(*self.args, **self.kwargs)

    def grad_leaves(self) -> dict[str, torch.Tensor]:
        """The tensors a training step differentiates, by the names records use (dq, dk, dv; dx, dg, dw_g ...)."""
        import torch

        first = self.args[0]
        if len(self.args) == 3 and isinstance(self.args[2], GateWeights):
            x, g, w = self.args
            names = ("w_g", "b_g", "w_x", "b_x", "w_psi", "b_psi")
            return {"dx": x, "dg": g} | {f"d{n}": t for n, t in zip(names, w.tensors(), strict=True)}
        if isinstance(first, torch.Tensor) and len(self.args) == 3:
            q, k, v = self.args
            return {"dq": q, "dk": k, "dv": v}
        return {}

    def with_grad(self) -> Inputs:
        """The same values as fresh leaf tensors that require grad (outside inference mode)."""
        import torch

        def leaf(t: Any) -> Any:
            if isinstance(t, GateWeights):
                return GateWeights(*(leaf(x) for x in t.tensors()))
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.detach().clone().requires_grad_(True)
            return t

        return Inputs(tuple(leaf(a) for a in self.args), dict(self.kwargs))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the call, the gate's weights and tensor keyword arguments included."""
        import torch

        found: list[torch.Tensor] = []
        for obj in (*self.args, *self.kwargs.values()):
            if isinstance(obj, GateWeights):
                found.extend(obj.tensors())
            elif isinstance(obj, torch.Tensor):
                found.append(obj)
        return found


@dataclass(frozen=True)
class GateWeights:
    """The three 1x1 convolutions of the additive attention gate, stored as (out, in) matrices."""

    w_g: torch.Tensor  # (F_int, Cg)
    b_g: torch.Tensor  # (F_int,)
    w_x: torch.Tensor  # (F_int, Cx)
    b_x: torch.Tensor  # (F_int,)
    w_psi: torch.Tensor  # (1, F_int)
    b_psi: torch.Tensor  # (1,)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.w_g, self.b_g, self.w_x, self.b_x, self.w_psi, self.b_psi)

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> GateWeights:

        return GateWeights(*(t.to(device=device, dtype=dtype) for t in self.tensors()))


def _randn(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype, device: str) -> torch.Tensor:
    import torch

    # Draw on the CPU in float32 so that a seed gives the same values on every device and dtype.
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


class Variant:
    """What every variant spec provides; see DotProductVariant and GateVariant."""

    name: str
    description: str
    task: str
    kind: str

    def normalize(self, params: Params) -> Params:
        """The canonical params of a case of this variant; raises InputError when they make no sense.

        An axis the variant does not take (its declaration in harness.shapes says so) is refused here
        for every variant; what is left is each variant's own rules (`_normalize`).
        """
        why = shapes.inapplicable(self.name, params)
        if why:
            raise InputError(why)
        return self._normalize(params)

    def _normalize(self, params: Params) -> Params:
        raise NotImplementedError

    def make_inputs(self, params: Params, dtype: str | None = None, device: str | None = None, seed: int = 0) -> Inputs:
        raise NotImplementedError

    def flops(self, params: Params, seed: int = 0) -> float:
        """FLOPs of one call (the documents' lengths, where a case has them, come from `seed`)."""
        raise NotImplementedError

    def density(self, params: Params, seed: int = 0) -> float:
        """The share of the dense work a case needs (1 without masks)."""
        return 1.0

    def tokens(self, params: Params) -> int:
        return shapes.tokens(params)

    def bytes_moved(self, params: Params, seed: int = 0) -> float:
        """The least data one call must move: each input read once, the output written once."""
        raise NotImplementedError

    def reference(self, inputs: Inputs) -> torch.Tensor:
        raise NotImplementedError


def _positive(params: Params, *keys: str) -> None:
    for key in keys:
        value = getattr(params, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{key} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class DotProductVariant(Variant):
    name: str
    description: str
    task: str
    single_head: bool = False
    always_causal: bool = False
    cross: bool = False
    kind: str = "dot_product"

    def _normalize(self, params: Params) -> Params:
        _positive(params, "batch", "heads", "seq_len", "head_dim")
        if self.single_head and params.heads != 1:
            params = replace(params, heads=1)
        params = self._grouped(params)
        if self.cross:
            if params.seq_len_kv is None:
                raise InputError(f"{self.name} needs seq_len_kv (the key/value length, Nkv != Nq)")
            _positive(params, "seq_len_kv")
        if self.always_causal and not params.causal:
            params = replace(params, causal=True)
        return _check_modifiers(params)

    @staticmethod
    def _grouped(params: Params) -> Params:
        """kv_heads checked; kv_heads == heads is plain multi-head attention: the same case, the same id."""
        if params.kv_heads is not None:
            _positive(params, "kv_heads")
            if params.heads % params.kv_heads:
                raise InputError(
                    f"kv_heads must divide heads (each kv head serves heads / kv_heads query heads): "
                    f"heads={params.heads}, kv_heads={params.kv_heads}"
                )
            if params.kv_heads == params.heads:
                params = replace(params, kv_heads=None)
        return params

    def make_inputs(self, params: Params, dtype: str | None = None, device: str | None = None, seed: int = 0) -> Inputs:
        import torch

        params = self.normalize(params)
        torch_type = torch_dtype(dtype or params.dtype)
        device = device or params.device
        gen = torch.Generator().manual_seed(seed)
        b, h, d = params.batch, params.heads, params.head_dim
        q = _randn((b, h, params.seq_len, d), gen, torch_type, device)
        k = _randn((b, params.kv_head_count, params.kv_len, d), gen, torch_type, device)  # (B, H_kv, Nkv, D)
        v = _randn((b, params.kv_head_count, params.kv_len, d), gen, torch_type, device)
        return Inputs((q, k, v), {"causal": params.causal, **modifier_kwargs(params, device, seed)})

    def flops(self, params: Params, seed: int = 0) -> float:
        return shapes.dot_product_flops(params, seed)

    def density(self, params: Params, seed: int = 0) -> float:
        """Visible (query, key) pairs over Nq·Nkv (harness.shapes.visible_pairs)."""
        return shapes.density(params, seed)

    def bytes_moved(self, params: Params, seed: int = 0) -> float:
        return shapes.dot_product_bytes(params)

    def causal_offset(self, n_q: int, n_kv: int) -> int:
        """Under `causal`, query i sees keys j <= i + offset: 0 is top-left, like torch's is_causal."""
        return 0

    def reference(self, inputs: Inputs) -> torch.Tensor:
        q, k, v = inputs.args
        known = ("causal", "scale", "mask", *shapes.MODIFIERS.values())
        return reference_attention(
            q,
            k,
            v,
            **{key: value for key, value in inputs.kwargs.items() if key in known},
            causal_offset=self.causal_offset(q.shape[2], k.shape[2]),
        )


# Decode's new tokens: 1 (plain generation) up to a draft of speculative decoding.
DECODE_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class DecodeVariant(DotProductVariant):
    """Generation with a KV cache: Nq new tokens (`seq_len`) attend to a cache of Nkv (`seq_len_kv`).

    The new tokens are the cache's last Nq positions, so query i sees keys j ≤ Nkv − Nq + i: kernels get
    `causal=True` when Nq > 1 and must align it bottom-right (flash_attn's and FlashInfer's convention
    with a KV cache), unlike the other variants' top-left `is_causal`. Nq = 1 sees the whole cache.
    Inference only: there is no backward to time.
    """

    name: str = "decode"
    description: str = "generation step: Nq new tokens against a KV cache (bottom-right causal)"
    task: str = "chatbot"

    def _normalize(self, params: Params) -> Params:
        _positive(params, "batch", "heads", "seq_len", "head_dim")
        params = self._grouped(params)
        if params.seq_len_kv is None:
            raise InputError("decode needs seq_len_kv: the KV cache length Nkv (seq_len is Nq, the new tokens)")
        _positive(params, "seq_len_kv")
        if params.seq_len > params.seq_len_kv:
            raise InputError(
                f"decode's new tokens are the cache's last positions, so seq_len (Nq={params.seq_len}) cannot "
                f"exceed seq_len_kv (Nkv={params.seq_len_kv})"
            )
        if params.causal:
            raise InputError(
                "causal does not apply to decode: its new tokens always see the cache bottom-right "
                "(query i sees keys j <= Nkv - Nq + i); leave causal out"
            )
        if params.direction != "fwd":
            raise InputError(f"decode is inference: direction must be fwd, got {params.direction!r}")
        return _check_modifiers(params)

    def make_inputs(self, params: Params, dtype: str | None = None, device: str | None = None, seed: int = 0) -> Inputs:
        import torch

        params = self.normalize(params)
        inputs = super().make_inputs(params, dtype, device, seed)
        kwargs = {**inputs.kwargs, "causal": inputs.args[0].shape[2] > 1}
        lengths = shapes.cache_lengths(params, seed)
        if lengths is None:
            return Inputs(inputs.args, kwargs)
        q, k, v = inputs.args
        kwargs["cache_lens"] = torch.tensor(lengths, dtype=torch.int32, device=q.device)
        if params.page_size is None:
            return Inputs((q, k, v), kwargs)
        k_pool, v_pool, table = paged_cache(k, v, lengths, params.page_size, seed)
        kwargs["block_table"] = table
        return Inputs((q, k_pool, v_pool), kwargs)

    def flops(self, params: Params, seed: int = 0) -> float:
        return shapes.decode_flops(params, seed)

    def density(self, params: Params, seed: int = 0) -> float:
        return shapes.density(params, seed, bottom_right=True)

    def bytes_moved(self, params: Params, seed: int = 0) -> float:
        return shapes.decode_bytes(params, seed)

    def causal_offset(self, n_q: int, n_kv: int) -> int:
        """Bottom-right: the new tokens are the cache's last Nq positions."""
        return n_kv - n_q

    def reference(self, inputs: Inputs) -> torch.Tensor:
        """Per request against its own cache (its pages gathered in table order), bottom-right in it."""
        import torch

        lens = inputs.kwargs.get("cache_lens")
        if lens is None:
            return super().reference(inputs)
        q, k, v = inputs.args
        table = inputs.kwargs.get("block_table")
        rest = {key: value for key, value in inputs.kwargs.items() if key not in ("cache_lens", "block_table")}
        out = []
        for b, n in enumerate(lens.tolist()):
            k_b, v_b = reference_request_cache(k, v, b, n, table)
            out.append(super().reference(Inputs((q[b : b + 1], k_b, v_b), rest)))
        return torch.cat(out)


# Unused slots of a request's last page: a large finite value, so a kernel that reads past its request's
# length gets scores and values that change its output (zeros could hide the bug).
STALE_SLOT = 1000.0


def paged_cache(
    k: torch.Tensor, v: torch.Tensor, lengths: list[int], page_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v (B, H_kv, Nkv, D) as a pool of pages (num_pages, P, H_kv, D) (flash-attn's k_cache layout)
    and a block table (B, max_pages) int32: each request's pages are a seeded random permutation of the
    pool (fragmented, as a server's pool is), entries past its last page -1."""
    import torch

    counts = [-(-n // page_size) for n in lengths]
    total, widest = sum(counts), max(counts)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 2)).tolist()
    batch, kv_heads, _, head_dim = k.shape
    shape = (total, page_size, kv_heads, head_dim)
    k_pool = torch.full(shape, STALE_SLOT, dtype=k.dtype, device=k.device)
    v_pool = torch.full(shape, STALE_SLOT, dtype=v.dtype, device=v.device)
    table = torch.full((batch, widest), -1, dtype=torch.int32)
    used = 0
    for b, (n, count) in enumerate(zip(lengths, counts, strict=True)):
        for i in range(count):
            page, start, stop = order[used + i], i * page_size, min(n, (i + 1) * page_size)
            table[b, i] = page
            k_pool[page, : stop - start] = k[b, :, start:stop].transpose(0, 1)
            v_pool[page, : stop - start] = v[b, :, start:stop].transpose(0, 1)
        used += count
    return k_pool, v_pool, table.to(k.device)


def reference_request_cache(
    k: torch.Tensor, v: torch.Tensor, b: int, n: int, table: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Request b's cache (1, H_kv, n, D): its first n keys, or its pages read in block-table order (the
    reference's own gather: the ground truth shares no kernel code)."""
    if table is None:
        return k[b : b + 1, :, :n], v[b : b + 1, :, :n]
    page_size = k.shape[1]
    pages = table[b, : -(-n // page_size)].long()
    return tuple(t[pages].flatten(0, 1)[:n].transpose(0, 1)[None] for t in (k, v))  # type: ignore[return-value]


def _check_modifiers(params: Params) -> Params:
    """The score modifiers' own rules (their applicability is the axes' declaration)."""
    if params.window is not None and params.window < 0:
        raise InputError(f"window must be >= 0 (keys a query sees behind it), got {params.window}")
    if params.alibi and params.heads & (params.heads - 1):
        raise InputError(
            f"alibi's slopes 2^(-8(h+1)/H) are the ALiBi paper's for H a power of two; heads={params.heads} is not"
        )
    if params.documents is not None and params.documents > params.seq_len:
        raise InputError(
            f"documents ({params.documents}) cannot exceed seq_len ({params.seq_len}): each document has a token"
        )
    return params


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes, 2^(-8(h+1)/H) (exact powers of two when H is)."""
    return [2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)]


def modifier_kwargs(params: Params, device: str, seed: int = 0) -> dict[str, Any]:
    """The kernel keyword arguments of a case's score modifiers (DESIGN.md): window=, softcap=,
    alibi_slopes= (H,) float32, cu_seqlens= (B·K+1,) int32 over the flattened B·N tokens."""
    import torch

    kwargs: dict[str, Any] = {}
    if params.window is not None:
        kwargs["window"] = params.window
    if params.softcap is not None:
        kwargs["softcap"] = float(params.softcap)
    if params.alibi:
        kwargs["alibi_slopes"] = torch.tensor(alibi_slopes(params.heads), dtype=torch.float32, device=device)
    lengths = shapes.document_lengths(params, seed)
    if lengths is not None:
        flat = [n for row in lengths for n in row]
        cu = torch.tensor([0, *flat], dtype=torch.int64).cumsum(0).to(torch.int32)
        kwargs["cu_seqlens"] = cu.to(device)
    return kwargs


def reference_doc_ids(cu_seqlens: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """(B, N) document index of every token, from cu_seqlens over the flattened B·N tokens (the
    reference's own copy: the ground truth shares no kernel code)."""
    import torch

    tokens = torch.arange(batch * n, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens.long(), tokens, right=True) - 1).view(batch, n)


def position_bias(
    row_ids: torch.Tensor,
    n_kv: int,
    *,
    offset: int = 0,
    causal: bool = False,
    window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """The position-dependent part of the scores for query rows `row_ids` (at positions row + offset) over
    all Nkv keys, additive, float64 unless `dtype`: -inf where causality, the window or the documents hide
    a key, -slope_h·|i - j| under ALiBi, else 0. Shape (B|1, H|1, rows, Nkv); None when nothing applies."""
    import torch

    if not causal and window is None and alibi_slopes is None and doc_ids is None:
        return None
    dtype = dtype or torch.float64
    pos = (row_ids.to(torch.int64) + offset)[:, None]  # (rows, 1)
    keys = torch.arange(n_kv, device=row_ids.device)[None, :]  # (1, Nkv)
    allowed = torch.ones(pos.shape[0], n_kv, dtype=torch.bool, device=row_ids.device)
    if causal:
        allowed &= keys <= pos
    if window is not None:
        allowed &= keys >= pos - window
        if not causal:
            allowed &= keys <= pos + window
    bias = torch.zeros((1, 1, *allowed.shape), dtype=dtype, device=row_ids.device)
    if alibi_slopes is not None:
        distance = (pos - keys).abs().to(dtype)
        bias = -alibi_slopes.to(dtype)[None, :, None, None] * distance  # (1, H, rows, Nkv)
    hidden = ~allowed[None, None]
    if doc_ids is not None:  # (B, N): query and key in one document
        hidden = hidden | (doc_ids[:, row_ids][:, None, :, None] != doc_ids[:, None, None, :n_kv])
    return bias.masked_fill(hidden, float("-inf"))


def combine_masks(mask: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """A user mask (bool or additive) and a position bias as one additive mask."""
    import torch

    if mask is None or bias is None:
        return bias if mask is None else mask
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return mask.to(bias.dtype) + bias


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    rows: slice | None = None,
    causal_offset: int = 0,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 softmax(softcap(q kᵀ · scale) + ALiBi + mask) v, in query-row chunks; fully masked rows give
    zeros. Query i sits at position i + causal_offset (0: top-left; Nkv - Nq: decode's bottom-right):
    under `causal` it sees keys j <= that, under a window j >= that - W; ALiBi's distance and the
    documents (cu_seqlens) are measured from it too.

    `rows` restricts the result to a slice of query rows (the runner samples rows of very long
    sequences); the returned tensor then holds only those rows.
    """
    import torch

    batch, heads, n_q, d = q.shape
    kv_heads, n_kv = k.shape[1], k.shape[2]
    group = heads // kv_heads  # grouped-query attention: query head h reads kv head h // group
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = rows or slice(0, n_q)
    start, stop, step = rows.indices(n_q)
    k64, v64 = k.double(), v.double()
    row_ids = torch.arange(start, stop, step, device=q.device)
    doc_ids = None if cu_seqlens is None else reference_doc_ids(cu_seqlens, batch, n_q)
    # Bound the float64 score block to ~32M elements (256 MiB).
    chunk = max(1, (32 << 20) // max(1, batch * heads * n_kv))
    out = []
    for i in range(0, len(row_ids), chunk):
        idx = row_ids[i : i + chunk]
        # A kv head's query heads as one block of rows: the float64 cache is never repeated per group
        # (B=8 x 8 kv heads x 32k keys would be 2 GiB more per tensor).
        q_rows = q[:, :, idx].double().reshape(batch, kv_heads, group * len(idx), d)
        scores = torch.matmul(q_rows, k64.transpose(-2, -1)).view(batch, heads, len(idx), n_kv) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if mask is not None:
            m = mask if mask.shape[-2] == 1 else mask[..., idx, :]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.double()
        bias = position_bias(
            idx,
            n_kv,
            offset=causal_offset,
            causal=causal,
            window=window,
            alibi_slopes=alibi_slopes,
            doc_ids=doc_ids,
        )
        if bias is not None:
            scores = scores + bias
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
        grouped = weights.view(batch, kv_heads, group * len(idx), n_kv)
        out.append(torch.matmul(grouped, v64).view(batch, heads, len(idx), d))
    return torch.cat(out, dim=2)


@dataclass(frozen=True)
class GateVariant(Variant):
    """Attention U-Net's additive gate: out = x · σ(ψ(relu(W_g·g + W_x·x))), all 1x1 convolutions.

    Sweep axes map as: `seq_len` = pixels per image (a square side² ), `head_dim` = channels of x and
    of g, F_int = head_dim // 2 (the paper's choice of halving the channels).
    """

    name: str = "attention_gate"
    description: str = "Attention U-Net additive gate on skip connections"
    task: str = "image segmentation"
    kind: str = "gate"

    def _normalize(self, params: Params) -> Params:
        _positive(params, "batch", "seq_len", "head_dim")
        side = math.isqrt(params.seq_len)
        if side * side != params.seq_len:
            raise InputError(
                f"attention_gate needs seq_len = pixels of a square image (a perfect square such as "
                f"{side * side} or {(side + 1) ** 2}), got {params.seq_len}"
            )
        if params.causal:
            raise InputError("causal does not apply to attention_gate")
        if params.kv_heads is not None:
            raise InputError("kv_heads does not apply to attention_gate (it has no keys and values)")
        return replace(params, heads=1)

    channels = staticmethod(shapes.gate_channels)

    def make_inputs(self, params: Params, dtype: str | None = None, device: str | None = None, seed: int = 0) -> Inputs:
        import torch

        params = self.normalize(params)
        torch_type = torch_dtype(dtype or params.dtype)
        device = device or params.device
        gen = torch.Generator().manual_seed(seed)
        side = math.isqrt(params.seq_len)
        cx, cg, f_int = self.channels(params)
        x = _randn((params.batch, cx, side, side), gen, torch_type, device)
        g = _randn((params.batch, cg, side, side), gen, torch_type, device)
        # Kaiming-like scaling keeps the pre-activations O(1), so the sigmoid is not saturated.
        weights = GateWeights(
            w_g=_randn((f_int, cg), gen, torch.float32, "cpu") / math.sqrt(cg),
            b_g=_randn((f_int,), gen, torch.float32, "cpu") * 0.1,
            w_x=_randn((f_int, cx), gen, torch.float32, "cpu") / math.sqrt(cx),
            b_x=_randn((f_int,), gen, torch.float32, "cpu") * 0.1,
            w_psi=_randn((1, f_int), gen, torch.float32, "cpu") / math.sqrt(f_int),
            b_psi=_randn((1,), gen, torch.float32, "cpu") * 0.1,
        ).to(dtype=torch_type, device=device)
        return Inputs((x, g, weights))

    def flops(self, params: Params, seed: int = 0) -> float:
        return shapes.gate_flops(params)

    def bytes_moved(self, params: Params, seed: int = 0) -> float:
        return shapes.gate_bytes(params)

    def reference(self, inputs: Inputs) -> torch.Tensor:
        x, g, weights = inputs.args
        return reference_gate(x, g, weights)


def reference_gate(x: torch.Tensor, g: torch.Tensor, weights: GateWeights) -> torch.Tensor:
    import torch

    w = weights.to(dtype=torch.float64)
    x64, g64 = x.double(), g.double()
    pre = torch.einsum("fc,bchw->bfhw", w.w_g, g64) + w.b_g[:, None, None]
    pre = pre + torch.einsum("fc,bchw->bfhw", w.w_x, x64) + w.b_x[:, None, None]
    alpha = torch.sigmoid(torch.einsum("of,bfhw->bohw", w.w_psi, torch.relu(pre)) + w.b_psi[:, None, None])
    return x64 * alpha


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        DotProductVariant(
            "self_attention",
            "single-head self-attention (the article's SelfAttention module)",
            "text classification",
            single_head=True,
        ),
        DotProductVariant("multi_head", "multi-head self-attention", "image captioning"),
        DotProductVariant("causal", "causal (GPT-style) multi-head attention", "chatbot", always_causal=True),
        DotProductVariant("cross_attention", "cross-modal attention, Nq != Nkv", "image-text retrieval", cross=True),
        GateVariant(),
        DecodeVariant(),
    )
}


# The variants whose kernels share the top-left `causal` of torch's is_causal: one kernel serves them
# all. decode is a dot product too, but its `causal` is bottom-right, so a kernel registers for it on
# purpose (implementations.masks.bottom_right adapts a top-left kernel).
DOT_PRODUCT_VARIANTS: tuple[str, ...] = tuple(
    n for n, v in VARIANTS.items() if v.kind == "dot_product" and not isinstance(v, DecodeVariant)
)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise unknown_name("variant", name, VARIANTS)
    return VARIANTS[name]
