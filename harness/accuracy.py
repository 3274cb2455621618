"""Error against the float64 reference, and the one tolerance rule every check uses.

The rule, as fast-attention kernels are held to it (FlashAttention's tests do the same): an
implementation's max absolute error against the float64 reference may be at most

    tolerance = 2 × (max abs error of `naive` computed in the same dtype on the same inputs)
                + eps(dtype)

The factor 2 allows a different but equally good summation order; the floor of one machine
epsilon keeps the rule meaningful when naive happens to be exact. NaN or Inf in an output is
inaccurate, always. Fully masked query rows must give zeros (the policy all built-ins follow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.variants import Inputs, Variant

NAIVE_FACTOR = 2.0
# Beyond this many score elements (B·H·Nq·Nkv) the check uses an evenly strided subset of query rows:
# every row is independent given all keys, so a subset measures the same per-row error.
FULL_CHECK_ELEMENTS = 1 << 26


def floor(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def tolerance(dtype: torch.dtype, naive_error: float) -> float:
    """The allowed max abs error for `dtype` given naive's error in that dtype (see module doc)."""
    return NAIVE_FACTOR * naive_error + floor(dtype)


@dataclass(frozen=True)
class Errors:
    max_abs_err: float
    max_rel_err: float
    finite: bool


def errors(output: torch.Tensor, reference: torch.Tensor) -> Errors:
    """Max abs error, and max abs error relative to the reference's largest magnitude.

    Relative error per element explodes where the reference is near zero, so it is normalised by
    the reference's max |value|, the usual choice for attention outputs.
    """
    if output.shape != reference.shape:
        raise ValueError(f"output shape {tuple(output.shape)} != expected {tuple(reference.shape)}")
    out = output.detach().to(device=reference.device, dtype=torch.float64)
    finite = bool(torch.isfinite(out).all())
    if not finite:
        return Errors(math.inf, math.inf, False)
    diff = (out - reference).abs().max().item() if out.numel() else 0.0
    scale = reference.abs().max().item() if reference.numel() else 0.0
    return Errors(diff, diff / scale if scale > 0 else diff, True)


@dataclass(frozen=True)
class Accuracy:
    max_abs_err: float
    max_rel_err: float
    tolerance: float
    accurate: bool
    reason: str = ""

    def as_record(self) -> dict:
        return {
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "tolerance": self.tolerance,
            "accurate": self.accurate,
        }


def judge(output: torch.Tensor, reference: torch.Tensor, naive_output: torch.Tensor, dtype: torch.dtype) -> Accuracy:
    """Apply the tolerance rule to one output."""
    if output.shape != reference.shape:
        return Accuracy(
            math.inf,
            math.inf,
            math.nan,
            False,
            f"wrong output shape {tuple(output.shape)}, expected {tuple(reference.shape)}",
        )
    err = errors(output, reference)
    base = errors(naive_output, reference)
    tol = tolerance(dtype, base.max_abs_err if base.finite else 0.0)
    if not err.finite:
        return Accuracy(err.max_abs_err, err.max_rel_err, tol, False, "output contains NaN or Inf")
    ok = err.max_abs_err <= tol
    reason = "" if ok else f"max_abs_err {err.max_abs_err:.3g} > tolerance {tol:.3g}"
    return Accuracy(err.max_abs_err, err.max_rel_err, tol, ok, reason)


def check_rows(variant: Variant, inputs: Inputs) -> slice | None:
    """Which query rows the accuracy check compares (None: all of them)."""
    if variant.kind != "dot_product":
        return None
    q, k, _ = inputs.args
    elements = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    if elements <= FULL_CHECK_ELEMENTS:
        return None
    step = math.ceil(elements / FULL_CHECK_ELEMENTS)
    return slice(0, q.shape[2], step)


def row_subset(inputs: Inputs, rows: slice) -> Inputs:
    """The same problem restricted to some query rows, with causality made an explicit mask."""
    q, k, v = inputs.args
    kwargs = dict(inputs.kwargs)
    mask, causal = kwargs.pop("mask", None), kwargs.pop("causal", False)
    ids = torch.arange(q.shape[2], device=q.device)[rows]
    if mask is not None and mask.shape[-2] != 1:
        mask = mask[..., rows, :]
    if causal:
        # Built here, not with the kernels' mask helpers: the check shares no code with what it judges.
        allowed = torch.arange(k.shape[2], device=q.device)[None, :] <= ids[:, None]
        if mask is None:
            mask = allowed
        elif mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        kwargs["mask"] = mask
    return Inputs((q[:, :, rows], k, v), kwargs)


@dataclass
class Baseline:
    """What every implementation of one case is compared with: reference and naive's output."""

    reference: torch.Tensor
    naive_output: torch.Tensor
    rows: slice | None
    dtype: torch.dtype

    def judge(self, output: torch.Tensor) -> Accuracy:
        if self.rows is not None and output.dim() == 4:
            output = output[:, :, self.rows]
        return judge(output, self.reference, self.naive_output, self.dtype)


def baseline(variant: Variant, inputs: Inputs, naive_fn) -> Baseline:
    """Compute the float64 reference and naive-in-dtype output once per case shape."""
    rows = check_rows(variant, inputs)
    subset = inputs if rows is None else row_subset(inputs, rows)
    with torch.no_grad():
        reference = variant.reference(subset)
        naive_output = subset.call(naive_fn)
    return Baseline(reference, naive_output, rows, inputs.args[0].dtype)
