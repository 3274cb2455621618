"""The case model without torch: a point of a sweep (`Params`), one measurement (`Case`), its id and
its work (FLOPs, tokens).

Suite validation, expansion, sharding, compare and the report all need these, and none of them
should pay a torch import (several seconds) to answer "is this suite valid?".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
class Params:
    """One point of a sweep: the shape and placement of a case (the record's `params`)."""

    batch: int = 1
    heads: int = 1
    kv_heads: int | None = None  # grouped-query attention: k and v have this many heads (None: `heads`)
    seq_len: int = 128
    seq_len_kv: int | None = None
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    causal: bool = False
    direction: str = "fwd"

    @property
    def kv_len(self) -> int:
        return self.seq_len if self.seq_len_kv is None else self.seq_len_kv

    @property
    def kv_head_count(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "seq_len": self.seq_len,
            "seq_len_kv": self.seq_len_kv,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "device": self.device,
            "threads": self.threads,
            "causal": self.causal,
            "direction": self.direction,
        }


# The sweep axes, in the order a case id and a sweep's product use them.
PARAM_AXES: tuple[str, ...] = tuple(Params().as_dict())


def case_id(variant: str, implementation: str, p: Params) -> str:
    """Stable across runs: the same variant, implementation and params give the same id."""
    kv = f"-kv{p.seq_len_kv}" if p.seq_len_kv is not None else ""
    threads = f"-t{p.threads}" if p.threads is not None else ""
    causal = "-causal" if p.causal else ""
    direction = "" if p.direction == "fwd" else f"-{p.direction}"  # forward ids stay what they were
    groups = "" if p.kv_heads in (None, p.heads) else f"g{p.kv_heads}"  # h32g8: 32 query heads, 8 kv heads
    shape = f"b{p.batch}-h{p.heads}{groups}-n{p.seq_len}{kv}-d{p.head_dim}"
    return f"{variant}/{implementation}/{shape}-{p.dtype}-{p.device}{threads}{causal}{direction}"


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
