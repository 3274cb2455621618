"""The case model without torch: a point of a sweep (`Params`), one measurement (`Case`), its id and
its work (FLOPs, tokens).

Suite validation, expansion, sharding, compare and the report all need these, and none of them
should pay a torch import (several seconds) to answer "is this suite valid?".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
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

    kind: type  # int, str or bool: what a value of the axis is
    doc: str
    optional: bool = False  # None allowed: "derived" (kv_heads = heads, seq_len_kv = seq_len, ...)
    gt: int | None = None  # integer bounds
    le: int | None = None
    choices: tuple[str, ...] = ()  # the allowed strings (empty: any, or `pattern`)
    pattern: str = ""  # a regular expression a string value must match fully
    allowed: str = ""  # how `pattern` is put to a user ("cpu, cuda, cuda:N, mps")
    variants: tuple[str, ...] | None = None  # the variants it means something to (None: every variant)
    required: bool = False  # a sweep must give it (it has no sensible default)
    tag: Callable[[Any, Any], str] | None = None  # (value, params) -> its part of the case id; '' adds nothing


def axis(default: Any, kind: type, doc: str, **declaration: Any) -> Any:
    """A `Params` field declared as a sweep axis (see `Axis`)."""
    return field(default=default, metadata={"axis": Axis(kind, doc, **declaration)})


def _kv_heads_tag(value: int | None, p: Params) -> str:
    return "" if value in (None, p.heads) else f"g{value}"  # h32g8: 32 query heads, 8 kv heads


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


def dot_product_flops(p: Params) -> float:
    """Two matmuls of 2·Nq·Nkv·D each per head for the forward (× 2.5 backward, × 3.5 both); a
    causal mask skips half of the pairs."""
    total = 4.0 * p.batch * p.heads * p.seq_len * p.kv_len * p.head_dim * ATTENTION_DIRECTION_FACTOR[p.direction]
    return total / 2 if p.causal else total


def decode_flops(p: Params) -> float:
    """Two matmuls per (query, key) pair a decode step computes: query i of Nq sees Nkv − Nq + i + 1 keys."""
    pairs = p.seq_len * p.kv_len - p.seq_len * (p.seq_len - 1) / 2
    return 4.0 * p.batch * p.heads * pairs * p.head_dim


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


def gate_bytes(p: Params) -> float:
    """x and g read, the output written (B, C, side, side) each, and the three 1x1 convolutions' weights."""
    cx, cg, f_int = gate_channels(p)
    pixels = p.batch * p.seq_len
    weights = f_int * (cg + 1) + f_int * (cx + 1) + (f_int + 1)
    forward = pixels * (cx + cg + cx) + weights
    backward = pixels * (cx + cg + cx + cx + cg) + 2 * weights  # x, g, dout read, dx, dg written; dW
    total = {"fwd": forward, "bwd": backward, "fwd_bwd": forward + backward}[p.direction]
    return float(DTYPE_BYTES[p.dtype] * total)
