"""The case model without torch: a point of a sweep (`Params`), one measurement (`Case`), its id and
its work (FLOPs, tokens).

Suite validation, expansion, sharding, compare and the report all need these, and none of them
should pay a torch import (several seconds) to answer "is this suite valid?".
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
# What a case times: the forward pass, the backward pass (after an untimed forward), or both.
DIRECTIONS: tuple[str, ...] = ("fwd", "bwd", "fwd_bwd")
# FLOPs of a direction as multiples of the forward's: flash-attention's benchmark convention for
# attention (the backward's five matmuls against the forward's two); a 1x1-convolution gate needs
# two GEMMs (input and weight gradients) per forward GEMM.
ATTENTION_DIRECTION_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
GATE_DIRECTION_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class Axis:
    """How one sweep axis is declared: the only place its type, bounds, applicability and id are written.

    Each field of `Params` carries one (as dataclass metadata). The suite's `Sweep` and `ExcludeRule`
    models, case ids, the report's shape columns, the plot groups and the roofline's params all derive
    from these declarations, so adding an axis is one field here plus its meaning in the kernels and
    the reference.
    """

    kind: type  # int, float, str or bool: what a value of the axis is
    doc: str
    optional: bool = False  # None allowed: "derived" (kv_heads = heads, seq_len_kv = seq_len, ...), or "off"
    gt: float | None = None  # numeric bounds
    le: float | None = None
    choices: tuple[str, ...] = ()  # the allowed strings (empty: any, or `pattern`)
    pattern: str = ""  # a regular expression a string value must match fully
    allowed: str = ""  # how `pattern` is put to a user ("cpu, cuda, cuda:N, mps")
    variants: tuple[str, ...] | None = None  # the variants it means something to (None: every variant)
    required: bool = False  # a sweep must give it (it has no sensible default)
    tag: Callable[[Any, Any], str] | None = None  # (value, params) -> its part of the case id; '' adds nothing
    # A score modifier: the keyword argument kernels receive for it (window=, softcap=, alibi_slopes=,
    # cu_seqlens=); an implementation runs a case that sets it only if it says it applies it.
    kernel_kwarg: str = ""


def axis(default: Any, kind: type, doc: str, **declaration: Any) -> Any:
    """A `Params` field declared as a sweep axis (see `Axis`)."""
    return field(default=default, metadata={"axis": Axis(kind, doc, **declaration)})


def _kv_heads_tag(value: int | None, p: Params) -> str:
    return "" if value in (None, p.heads) else f"g{value}"  # h32g8: 32 query heads, 8 kv heads


# The variants a window, softcap or ALiBi means something to (documents: only where Nq = Nkv).
_MODIFIED = ("multi_head", "causal", "cross_attention", "decode")


@dataclass(frozen=True)
class Params:
    """One point of a sweep: the shape and placement of a case (the record's `params`).

    The field order is the order of a case id's parts and of a sweep's product.
    """

    batch: int = axis(1, int, "batch size B", gt=0, le=1 << 24, tag=lambda v, p: f"b{v}")
    heads: int = axis(1, int, "query heads H", gt=0, le=1 << 24, tag=lambda v, p: f"-h{v}")
    kv_heads: int | None = axis(
        None,
        int,
        "key/value heads (grouped-query attention; None: `heads`)",
        optional=True,
        gt=0,
        le=1 << 24,
        tag=_kv_heads_tag,
    )
    seq_len: int = axis(128, int, "query length N (Nq)", gt=0, le=1 << 24, required=True, tag=lambda v, p: f"-n{v}")
    seq_len_kv: int | None = axis(
        None,
        int,
        "key/value length Nkv (None: seq_len)",
        optional=True,
        gt=0,
        le=1 << 24,
        variants=("cross_attention", "decode"),
        tag=lambda v, p: "" if v is None else f"-kv{v}",
    )
    head_dim: int = axis(64, int, "head dimension D", gt=0, le=1 << 24, tag=lambda v, p: f"-d{v}")
    dtype: str = axis("float32", str, "element type", choices=DTYPE_NAMES, tag=lambda v, p: f"-{v}")
    device: str = axis(
        "cpu",
        str,
        "torch device",
        pattern=r"cpu|cuda|cuda:\d+|mps",
        allowed="cpu, cuda, cuda:N, mps",
        tag=lambda v, p: f"-{v}",
    )
    threads: int | None = axis(
        None,
        int,
        "CPU threads (None: torch's default)",
        optional=True,
        gt=0,
        le=1024,
        tag=lambda v, p: "" if v is None else f"-t{v}",
    )
    causal: bool = axis(False, bool, "causal mask", tag=lambda v, p: "-causal" if v else "")
    # Score modifiers (DESIGN.md, "Score modifiers and packed documents"), applied in flash-attn's order:
    # scale, softcap, ALiBi, then the window/document/causal masks. Aligned as the variant's causality:
    # top-left, or bottom-right for decode.
    window: int | None = axis(
        None,
        int,
        "sliding window W: query i sees key j only when i - W <= j (and j <= i + W without causal)",
        optional=True,
        gt=-1,
        le=1 << 24,
        variants=_MODIFIED,
        tag=lambda v, p: "" if v is None else f"-w{v}",
        kernel_kwarg="window",
    )
    softcap: float | None = axis(
        None,
        float,
        "soft-capping c: score <- c * tanh(score / c), after scaling (Gemma 2: 50)",
        optional=True,
        gt=0,
        le=1e6,
        variants=_MODIFIED,
        tag=lambda v, p: "" if v is None else f"-softcap{v:g}",
        kernel_kwarg="softcap",
    )
    alibi: bool = axis(
        False,
        bool,
        "ALiBi: score <- score - slope_h * |i - j|, slopes 2^(-8(h+1)/H)",
        variants=_MODIFIED,
        tag=lambda v, p: "-alibi" if v else "",
        kernel_kwarg="alibi_slopes",
    )
    documents: int | None = axis(
        None,
        int,
        "packed documents K per batch row (seeded random lengths); attention stays inside a document",
        optional=True,
        gt=0,
        le=1 << 24,
        variants=("self_attention", "multi_head", "causal"),
        tag=lambda v, p: "" if v is None else f"-docs{v}",
        kernel_kwarg="cu_seqlens",
    )
    # Serving (DESIGN.md, "Paged KV caches"): decode against a pool of pages through a block table, and
    # requests of different cache lengths.
    page_size: int | None = axis(
        None,
        int,
        "KV cache page size P: k, v a pool of pages (num_pages, P, H_kv, D) read through a block table",
        optional=True,
        gt=0,
        le=1 << 20,
        variants=("decode",),
        tag=lambda v, p: "" if v is None else f"-p{v}",
        kernel_kwarg="block_table",
    )
    ragged: bool = axis(
        False,
        bool,
        "each request its own cache length, seeded in [max(Nq, Nkv/8), Nkv] (the first exactly Nkv)",
        variants=("decode",),
        tag=lambda v, p: "-ragged" if v else "",
        kernel_kwarg="cache_lens",
    )
    direction: str = axis(
        "fwd",
        str,
        "what is timed: forward, backward, both",
        choices=DIRECTIONS,
        tag=lambda v, p: "" if v == "fwd" else f"-{v}",  # forward ids stay what they were
    )

    @property
    def kv_len(self) -> int:
        return self.seq_len if self.seq_len_kv is None else self.seq_len_kv

    @property
    def kv_head_count(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Params:
        """Params from a record's `params` or a frame row: axes it lacks (older records) at their
        defaults, keys it has that are not axes (newer records) ignored, pandas' NaN read as None."""
        known = {}
        for name, declared in AXES.items():
            value = values.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            known[name] = declared.kind(value)
        return cls(**known)


# The sweep axes, declared once (above), in the order a case id and a sweep's product use them.
AXES: dict[str, Axis] = {f.name: f.metadata["axis"] for f in fields(Params)}
PARAM_AXES: tuple[str, ...] = tuple(AXES)
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Params)}
# A case's shape in the report's tables and plot groups: the variant, the direction, then every other axis.
SHAPE_KEYS: tuple[str, ...] = ("variant", "direction", *(a for a in PARAM_AXES if a != "direction"))
# The axes kernels receive as keyword arguments (score modifiers, documents, paging): axis name -> keyword.
MODIFIERS: dict[str, str] = {name: a.kernel_kwarg for name, a in AXES.items() if a.kernel_kwarg}


def modifiers_set(p: Params) -> tuple[str, ...]:
    """The modifier axes a case turns on (away from their default)."""
    return tuple(name for name in MODIFIERS if getattr(p, name) != DEFAULTS[name])


def inapplicable(variant: str, p: Params) -> str:
    """Why an axis set away from its default means nothing to `variant` (''): the axes' `variants`."""
    for name, declared in AXES.items():
        value = getattr(p, name)
        if declared.variants is not None and variant not in declared.variants and value != DEFAULTS[name]:
            meant = " and ".join(declared.variants)
            return f"{name} is only for {meant}; {variant} does not take it (got {name}={value!r})"
    return ""


def case_id(variant: str, implementation: str, p: Params) -> str:
    """Stable across runs: the same variant, implementation and params give the same id; an axis at its
    default adds nothing, so the ids of older cases survive new axes."""
    parts = "".join(declared.tag(getattr(p, name), p) for name, declared in AXES.items() if declared.tag)
    return f"{variant}/{implementation}/{parts}"


@dataclass(frozen=True)
class Case:
    """One measurement: a variant, an implementation and a point of the sweep (or a task)."""

    suite: str
    variant: str
    implementation: str
    params: Params
    skip_reason: str = ""
    task: str = ""

    @property
    def case_id(self) -> str:
        if self.task:
            return f"task/{self.task}/{self.implementation}"
        return case_id(self.variant, self.implementation, self.params)


def document_lengths(p: Params, seed: int = 0) -> list[list[int]] | None:
    """Each batch row's packed document lengths (None without `documents`): a uniformly random composition
    of seq_len into `documents` positive parts, K - 1 distinct cut points drawn from the case's seed."""
    if p.documents is None:
        return None
    if p.documents > p.seq_len:
        raise ValueError(f"documents ({p.documents}) cannot exceed seq_len ({p.seq_len}): a document has a token")
    rng = random.Random(seed)
    lengths = []
    for _ in range(p.batch):
        cuts = [0, *sorted(rng.sample(range(1, p.seq_len), p.documents - 1)), p.seq_len]
        lengths.append([b - a for a, b in itertools.pairwise(cuts)])
    return lengths


def cache_lengths(p: Params, seed: int = 0) -> list[int] | None:
    """Each request's KV cache length (None for one contiguous cache of Nkv per request): drawn from the
    case's seed uniformly in [max(Nq, Nkv/8), Nkv] when `ragged`, the first request exactly Nkv; all Nkv
    for a paged cache of equal lengths."""
    if not p.ragged and p.page_size is None:
        return None
    n_kv = p.kv_len
    if not p.ragged:
        return [n_kv] * p.batch
    rng = random.Random(seed)
    low = max(p.seq_len, n_kv // 8)
    return [n_kv] + [rng.randint(low, n_kv) for _ in range(p.batch - 1)]


def cache_bytes(p: Params, seed: int = 0) -> float:
    """Bytes of k and v a decode call must read: each request's own length, and whole pages when paged
    (a page's unused tail is fetched with it)."""
    lengths = cache_lengths(p, seed) or [p.kv_len] * p.batch
    if p.page_size is not None:
        lengths = [-(-n // p.page_size) * p.page_size for n in lengths]
    return float(2 * DTYPE_BYTES[p.dtype] * p.kv_head_count * p.head_dim * sum(lengths))


def visible_pairs(p: Params, seed: int = 0, bottom_right: bool = False) -> int:
    """(query, key) pairs one head computes over the batch: what causality, the window and the documents
    leave visible. Query i sits at position i (top-left) or Nkv - Nq + i (`bottom_right`, decode, which is
    always causal: its new tokens follow the cache)."""
    import numpy as np

    lengths = cache_lengths(p, seed) if bottom_right else None
    if lengths is not None:  # each request against its own cache, bottom-right
        return sum(
            visible_pairs(replace(p, batch=1, seq_len_kv=n, ragged=False, page_size=None), seed, True) for n in lengths
        )
    n_q, n_kv = p.seq_len, p.kv_len
    causal = p.causal or bottom_right
    pos = np.arange(n_q, dtype=np.int64) + (n_kv - n_q if bottom_right else 0)
    lo = np.zeros(n_q, dtype=np.int64)
    hi = np.full(n_q, n_kv - 1, dtype=np.int64)
    if causal:
        hi = np.minimum(hi, pos)
    if p.window is not None:
        lo = np.maximum(lo, pos - p.window)
        if not causal:
            hi = np.minimum(hi, pos + p.window)
    rows = [(lo, hi)] * p.batch
    lengths = document_lengths(p, seed)
    if lengths is not None:
        rows = []
        for lens in lengths:
            ends = np.cumsum(lens)
            doc_end = np.repeat(ends, lens) - 1  # each token's document: its first and last position
            doc_start = np.repeat(ends - np.asarray(lens), lens)
            rows.append((np.maximum(lo, doc_start), np.minimum(hi, doc_end)))
    return int(sum(np.clip(h - low + 1, 0, None).sum() for low, h in rows))


def density(p: Params, seed: int = 0, bottom_right: bool = False) -> float:
    """Visible pairs over all Nq x Nkv pairs: the share of the dense work a case needs."""
    return visible_pairs(p, seed, bottom_right) / (p.batch * p.seq_len * p.kv_len)


def dot_product_flops(p: Params, seed: int = 0, bottom_right: bool = False) -> float:
    """Two matmuls of 2·D per visible (query, key) pair per head for the forward (× 2.5 backward, × 3.5
    both): causality, a window and documents count only the pairs they leave (causal: N(N+1)/2)."""
    pairs = visible_pairs(p, seed, bottom_right)
    return 4.0 * p.heads * pairs * p.head_dim * ATTENTION_DIRECTION_FACTOR[p.direction]


def decode_flops(p: Params, seed: int = 0) -> float:
    """Two matmuls per (query, key) pair a decode step computes: query i of Nq sees Nkv − Nq + i + 1 keys."""
    return dot_product_flops(p, seed, bottom_right=True)


def gate_channels(p: Params) -> tuple[int, int, int]:
    """(Cx, Cg, F_int) of an attention-gate case: head_dim is the channel count, F_int half of it."""
    return p.head_dim, p.head_dim, max(1, p.head_dim // 2)


def gate_flops(p: Params) -> float:
    cx, cg, f_int = gate_channels(p)
    pixels = p.batch * p.seq_len
    convs = 2.0 * pixels * f_int * (cg + cx + 1)
    pointwise = pixels * (2 * f_int + cx + 1)  # add + relu, the final multiply, the sigmoid
    return (convs + pointwise) * GATE_DIRECTION_FACTOR[p.direction]


def gate_side(p: Params) -> int:
    """The image side of an attention-gate case (seq_len is its pixel count)."""
    return math.isqrt(p.seq_len)


def tokens(p: Params) -> int:
    """Query tokens (or pixels) one call processes: the unit of tokens_per_s."""
    return p.batch * p.seq_len


def dot_product_bytes(p: Params) -> float:
    """Each input read once and the output written once: q and out (B, H, Nq, D), k and v (B, H, Nkv, D).

    The least traffic any implementation can have; a kernel that re-reads k and v per query tile
    moves more, which is exactly what a memory-bound fraction below 1 shows.
    """
    queries, keys = p.heads * p.seq_len, p.kv_head_count * p.kv_len  # rows of q/out and of k/v
    forward = 2 * queries + 2 * keys  # q, k, v read; out written
    backward = 4 * queries + 4 * keys  # q, out, dout, k, v read; dq, dk, dv written
    rows = {"fwd": forward, "bwd": backward, "fwd_bwd": forward + backward}[p.direction]
    return float(DTYPE_BYTES[p.dtype] * p.batch * p.head_dim * rows)


def decode_bytes(p: Params, seed: int = 0) -> float:
    """q read and out written (B, H, Nq, D), and the cache as `cache_bytes` reads it: the real lengths of a
    ragged batch, the whole pages of a paged one, so GB/s and the roofline stay honest."""
    return float(2 * DTYPE_BYTES[p.dtype] * p.batch * p.heads * p.seq_len * p.head_dim) + cache_bytes(p, seed)


def gate_bytes(p: Params) -> float:
    """x and g read, the output written (B, C, side, side) each, and the three 1x1 convolutions' weights."""
    cx, cg, f_int = gate_channels(p)
    pixels = p.batch * p.seq_len
    weights = f_int * (cg + 1) + f_int * (cx + 1) + (f_int + 1)
    forward = pixels * (cx + cg + cx) + weights
    backward = pixels * (cx + cg + cx + cx + cg) + 2 * weights  # x, g, dout read, dx, dg written; dW
    total = {"fwd": forward, "bwd": backward, "fwd_bwd": forward + backward}[p.direction]
    return float(DTYPE_BYTES[p.dtype] * total)
