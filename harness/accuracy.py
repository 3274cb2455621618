"""Error against the float64 reference, and the one tolerance rule every check uses.

The rule, as fast-attention kernels are held to it (FlashAttention's tests do the same): an
implementation's max absolute error against the float64 reference may be at most

    tolerance = 2 × (max abs error of `naive` computed in the same dtype on the same inputs)
                + max|v| × (eps(dtype) + eps(accumulator) × √Nkv)

The factor 2 allows a different but equally good summation order. The floor is what rounding alone
may leave when naive happens to be lucky: one rounding of an output of magnitude up to max|v| (an
attention output is a convex combination of the rows of v), plus the rounding a sum of Nkv terms
accumulates in the kernel's accumulator (float32 for half types, as every kernel here and torch's
accumulate; the typical √n growth of a sum's rounding error). Without the √Nkv term torch's own
SDPA was judged inaccurate on long float32 caches (decode, 12k keys: up to 1.7x the old floor of
one eps) while naive happened to be exact to 3e-8. A real bug moves the output by far more: a dropped
key by its softmax weight times |v_j − out| (~1e-3 and more at 12k keys, ~1e-2 at the tests' 67),
a wrong scale or a top-left decode by O(1). NaN or Inf in an output is inaccurate, always. Fully
masked query rows must give zeros (the policy all built-ins follow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.variants import (
    Inputs,
    Variant,
    combine_masks,
    position_bias,
    reference_doc_ids,
    reference_request_cache,
)

NAIVE_FACTOR = 2.0
# Beyond this many score elements (B·H·Nq·Nkv) the check uses an evenly strided subset of query rows:
# every row is independent given all keys, so a subset measures the same per-row error.
FULL_CHECK_ELEMENTS = 1 << 26


def floor(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """What kernels sum a half-precision dot product in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounding_floor(dtype: torch.dtype, magnitude: float, terms: int) -> float:
    """What rounding alone may leave in an output of `magnitude` that sums `terms` products (module doc)."""
    return magnitude * (floor(dtype) + floor(accumulator(dtype)) * math.sqrt(max(terms, 1)))


def tolerance(dtype: torch.dtype, naive_error: float, magnitude: float = 1.0, terms: int = 1) -> float:
    """The allowed max abs error for `dtype` given naive's error in that dtype (see module doc)."""
    return NAIVE_FACTOR * naive_error + rounding_floor(dtype, magnitude, terms)


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


def judge(
    output: torch.Tensor,
    reference: torch.Tensor,
    naive_output: torch.Tensor,
    dtype: torch.dtype,
    magnitude: float = 1.0,
    terms: int = 1,
) -> Accuracy:
    """Apply the tolerance rule to one output (`magnitude` and `terms`: the floor's, see module doc)."""
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
    tol = tolerance(dtype, base.max_abs_err if base.finite else 0.0, magnitude, terms)
    if not err.finite:
        return Accuracy(err.max_abs_err, err.max_rel_err, tol, False, "output contains NaN or Inf")
    ok = err.max_abs_err <= tol
    reason = "" if ok else f"max_abs_err {err.max_abs_err:.3g} > tolerance {tol:.3g}"
    return Accuracy(err.max_abs_err, err.max_rel_err, tol, ok, reason)


def check_rows(variant: Variant, inputs: Inputs) -> slice | None:
    """Which query rows the accuracy check compares (None: all of them)."""
    if variant.kind != "dot_product" or inputs.kwargs.get("cache_lens") is not None:
        return None  # a ragged or paged cache is checked whole, request by request (the decode reference)
    q, k, _ = inputs.args
    elements = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    if elements <= FULL_CHECK_ELEMENTS:
        return None
    step = math.ceil(elements / FULL_CHECK_ELEMENTS)
    return slice(0, q.shape[2], step)


# The kernel keywords that place a query row: the explicit-mask subsets below turn them into a mask.
POSITIONAL_KWARGS = ("causal", "window", "alibi_slopes", "cu_seqlens")


def explicit(
    inputs: Inputs,
    rows: slice,
    causal_offset: int = 0,
    dtype: torch.dtype | None = None,
    batch: slice | None = None,
    heads: slice | None = None,
) -> Inputs:
    """The same problem restricted to some query rows (and batch rows and heads), with everything that
    depends on a row's position (causality, window, ALiBi, documents; query i sits at i + causal_offset,
    the variant's alignment) made one explicit additive mask in `dtype` (float64 by default: the
    reference's; a kernel's own dtype for naive's side). Softcap, elementwise, stays a keyword."""
    q, k, v = inputs.args
    batch, heads = batch or slice(None), heads or slice(None)
    kwargs = {key: value for key, value in inputs.kwargs.items() if key not in POSITIONAL_KWARGS}
    mask = kwargs.pop("mask", None)
    ids = torch.arange(q.shape[2], device=q.device)[rows]
    if mask is not None:
        mask = mask if mask.shape[-2] == 1 else mask[..., rows, :]
        mask = mask.expand(q.shape[0], q.shape[1], len(ids), k.shape[2])[batch, heads]
    slopes = inputs.kwargs.get("alibi_slopes")
    cu = inputs.kwargs.get("cu_seqlens")
    # Built here, not with the kernels' mask helpers: the check shares no code with what it judges.
    bias = position_bias(
        ids,
        k.shape[2],
        offset=causal_offset,
        causal=bool(inputs.kwargs.get("causal", False)),
        window=inputs.kwargs.get("window"),
        alibi_slopes=None if slopes is None else slopes[heads],
        doc_ids=None if cu is None else reference_doc_ids(cu, q.shape[0], q.shape[2])[batch],
        dtype=dtype,
    )
    mask = combine_masks(mask, bias)
    if mask is not None:
        kwargs["mask"] = mask if dtype is None or mask.dtype == torch.bool else mask.to(dtype)
    group = q.shape[1] // k.shape[1]
    kv_heads = heads if heads == slice(None) else slice(heads.start // group, heads.start // group + 1)
    return Inputs((q[batch, heads][:, :, rows], k[batch, kv_heads], v[batch, kv_heads]), kwargs)


@dataclass
class Baseline:
    """What every implementation of one case is compared with: reference and naive's output."""

    reference: torch.Tensor
    naive_output: torch.Tensor
    rows: slice | None
    dtype: torch.dtype
    magnitude: float = 1.0  # max|v| (dot products) or max|x| (the gate): the output's scale
    terms: int = 1  # how many products an output element sums (Nkv)

    def judge(self, output: torch.Tensor) -> Accuracy:
        if self.rows is not None and output.dim() == 4:
            output = output[:, :, self.rows]
        return judge(output, self.reference, self.naive_output, self.dtype, self.magnitude, self.terms)


def baseline(variant: Variant, inputs: Inputs, naive_fn) -> Baseline:
    """Compute the float64 reference and naive-in-dtype output once per case shape."""
    rows = check_rows(variant, inputs)
    if rows is None:
        subset = naive_subset = inputs
    else:
        q, k, _ = inputs.args
        offset = variant.causal_offset(q.shape[2], k.shape[2])
        subset = explicit(inputs, rows, offset)  # float64 positions for the reference
        naive_subset = explicit(inputs, rows, offset, q.dtype)  # what a user of naive would pass
    with torch.no_grad():
        reference = variant.reference(subset)
        naive_output = naive_subset.call(naive_fn)
    # The output is a convex combination of v's rows (of x, times a sigmoid, for the gate).
    lens = inputs.kwargs.get("cache_lens")
    if lens is not None:  # the cache's real values only: a page's unused slots are not part of the problem
        k, v, table = inputs.args[1], inputs.args[2], inputs.kwargs.get("block_table")
        caches = [reference_request_cache(k, v, b, n, table)[1] for b, n in enumerate(lens.tolist())]
        magnitude, terms = max(float(c.abs().max()) for c in caches), max(lens.tolist())
    else:
        scaled = inputs.args[2] if variant.kind == "dot_product" else inputs.args[0]
        magnitude = float(scaled.detach().abs().max()) if scaled.numel() else 1.0
        terms = inputs.args[1].shape[2] if variant.kind == "dot_product" else 1
    return Baseline(reference, naive_output, rows, inputs.args[0].dtype, magnitude, terms)


@dataclass(frozen=True)
class GradAccuracy:
    """Each gradient held to the output's rule: max abs error ≤ 2 × naive's (same dtype) + a floor, the
    floor being the rounding a sum of that many terms may carry (GradBaseline.judge)."""

    max_abs_err: dict[str, float]
    tolerance: dict[str, float]
    accurate: bool
    reason: str = ""

    def as_record(self) -> dict:
        return {"grad_max_abs_err": self.max_abs_err, "grad_tolerance": self.tolerance}


@dataclass
class GradBaseline:
    """The float64 gradients of one case (same inputs, same dout) and naive's in the case's dtype."""

    reference: dict[str, torch.Tensor]
    naive: dict[str, torch.Tensor]
    dtype: torch.dtype
    terms: dict[str, int]  # how many products each gradient element sums (its reduction's length)

    def judge(self, grads: dict[str, torch.Tensor | None]) -> GradAccuracy:
        errs, tols, bad = {}, {}, []
        for name, ref in self.reference.items():
            grad = grads.get(name)
            if grad is None:
                errs[name], tols[name] = math.inf, math.nan
                bad.append(f"{name} missing")
                continue
            err = errors(grad, ref)
            base = errors(self.naive[name], ref)
            # A gradient element is a sum of many products (dV over the Nq query rows, a bias over B·N
            # pixels), summed in a different order by each kernel: the floor is the rounding error such
            # a sum may have, eps × its magnitude × √(terms), not the output's single eps.
            magnitude = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            spread = math.sqrt(self.terms.get(name, 1))
            tol = NAIVE_FACTOR * (base.max_abs_err if base.finite else 0.0) + floor(self.dtype) * magnitude * spread
            errs[name], tols[name] = err.max_abs_err, tol
            if not err.finite:
                bad.append(f"{name} contains NaN or Inf")
            elif err.max_abs_err > tol:
                bad.append(f"{name} max_abs_err {err.max_abs_err:.3g} > tolerance {tol:.3g}")
        return GradAccuracy(errs, tols, not bad, "; ".join(bad))


def reference_grads(variant: Variant, inputs: Inputs, dout: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 autograd of the variant's reference on the same inputs and dout.

    Dot-product attention is differentiated one (batch, head) at a time, so the float64 graph holds
    one head's score matrix, not all of them (N=4096: 128 MiB instead of 1 GiB per head group).
    """

    def as64(t):
        return t.detach().double().requires_grad_(True) if isinstance(t, torch.Tensor) else t

    if variant.kind != "dot_product":
        x, g, w = inputs.args
        x64, g64 = as64(x), as64(g)
        w64 = type(w)(*(as64(t) for t in w.tensors()))
        with torch.enable_grad():
            variant.reference(Inputs((x64, g64, w64))).backward(dout.double())
        names = ("w_g", "b_g", "w_x", "b_x", "w_psi", "b_psi")
        return {"dx": x64.grad, "dg": g64.grad} | {f"d{n}": t.grad for n, t in zip(names, w64.tensors(), strict=True)}
    q, k, v = inputs.args
    grads = {
        name: torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        for name, t in zip(("dq", "dk", "dv"), (q, k, v), strict=True)
    }
    group = q.shape[1] // k.shape[1]  # query heads per kv head (1 without grouped-query attention)
    offset = variant.causal_offset(q.shape[2], k.shape[2])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            hk = h // group
            # One (batch row, head) with its positions as an explicit mask (its ALiBi slope, its documents).
            one = explicit(inputs, slice(None), offset, batch=slice(b, b + 1), heads=slice(h, h + 1))
            leaves = [as64(t) for t in one.args]
            with torch.enable_grad():
                variant.reference(Inputs(tuple(leaves), one.kwargs)).backward(dout[b : b + 1, h : h + 1].double())
            grads["dq"][b, h] = leaves[0].grad[0, 0]
            grads["dk"][b, hk] += leaves[1].grad[0, 0]  # a kv head's gradient sums over its query heads
            grads["dv"][b, hk] += leaves[2].grad[0, 0]
    return grads


def grad_baseline(variant: Variant, inputs: Inputs, dout: torch.Tensor, naive_fn) -> GradBaseline:
    """The reference gradients and naive's gradients in the inputs' dtype, once per case shape."""
    reference = reference_grads(variant, inputs, dout)
    leaves = inputs.with_grad()
    with torch.enable_grad():
        leaves.call(naive_fn).backward(dout)
    naive = {name: t.grad for name, t in leaves.grad_leaves().items()}
    return GradBaseline(reference, naive, inputs.args[0].dtype, reduction_terms(inputs))


def reduction_terms(inputs: Inputs) -> dict[str, int]:
    """The length of the sum behind each gradient element (see GradBaseline.judge)."""
    if len(inputs.args) == 3 and not isinstance(inputs.args[2], torch.Tensor):
        x, _, w = inputs.args
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        f_int = w.w_g.shape[0]
        weights = {f"d{n}": pixels for n in ("w_g", "b_g", "w_x", "b_x", "w_psi", "b_psi")}
        return {"dx": f_int, "dg": f_int} | weights
    q, k, _ = inputs.args
    group = q.shape[1] // k.shape[1]  # a kv head's gradient also sums over its query heads
    return {"dq": k.shape[2], "dk": q.shape[2] * group, "dv": q.shape[2] * group}
