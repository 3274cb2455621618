"""FlashAttention-2 in Triton: the forward, and the backward recomputed from the saved log-sum-exp.

Read it beside `implementations/memory_efficient.py`, the same algorithm in PyTorch ops: there a
Python loop walks tiles and each tile is several library calls through memory; here one program
(a thread block) owns one tile of query rows and keeps it, its running maximum, denominator and
accumulator in registers while it streams the key/value tiles past them, so the scores never leave
the chip. Shapes in comments: M = BLOCK_M query rows, N = BLOCK_N keys, D = BLOCK_D (head_dim padded
to a power of two, which tl.dot and tl.arange need).

Imported on first use, after the caller has decided whether TRITON_INTERPRET applies: triton reads
it when a kernel is decorated, not when it runs.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from implementations.masks import doc_ids

LOG2E = 1.4426950408889634
# Under the interpreter the kernels run on CPU tensors through numpy: one fixed tile, no autotuning.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(backward: bool = False) -> list[triton.Config]:
    """A small set of tiles to autotune on a GPU; the autotuner drops those a GPU cannot hold.

    128-row query tiles keep the tensor cores fed on Hopper and Ampere; 8 warps share a 128x128
    tile's work; more pipeline stages hide the latency of loading k/v tiles, at the cost of shared
    memory (which head_dim 256 runs out of, hence the smaller entries).
    """
    if backward:
        shapes = [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2)]
    else:
        shapes = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _tuned(fn, backward: bool = False):
    if INTERPRETED:
        return fn
    # Retuned per head_dim, causality and length class (a power of two), as a serving stack would.
    key = ["BLOCK_D", "CAUSAL", "N_Q_CLASS", "N_KV_CLASS", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_DOCS"]
    return triton.autotune(_configs(backward), key=key)(fn)


@triton.jit
def _load(ptr, rows, cols, n_rows, n_cols, stride_row, stride_col, UPCAST: tl.constexpr):
    """A (rows x cols) tile, zeros outside the tensor; float32 when UPCAST (the interpreter's bf16)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _load_rows(
    base, row_offsets, dims, keys, n_keys, HEAD_DIM, stride_dim, UPCAST: tl.constexpr, TRANSPOSED: tl.constexpr
):
    """Keys at arbitrary row offsets (a paged cache's slots): (D, N) when TRANSPOSED, else (N, D); zeros
    past `n_keys` (a request's length: the unused slots of its last page are never read)."""
    if TRANSPOSED:
        mask = (dims[:, None] < HEAD_DIM) & (keys[None, :] < n_keys)
        tile = tl.load(base + row_offsets[None, :] + dims[:, None] * stride_dim, mask=mask, other=0.0)
    else:
        mask = (keys[:, None] < n_keys) & (dims[None, :] < HEAD_DIM)
        tile = tl.load(base + row_offsets[:, None] + dims[None, :] * stride_dim, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _scores(
    q, k_t, rows, keys, b, h, scale, N_Q, N_KV, OFFSET, W, CAP, SLOPES, DOC,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One (M, N) tile of scores in base 2 with every modifier applied (flash-attn's order: scale,
    softcap, ALiBi, then the masks; hidden pairs -inf), and tanh of the cap (its derivative's input;
    zeros without one). Query row i sits at position i + OFFSET (0 top-left, Nkv - Nq decode)."""
    s = tl.dot(q, k_t, input_precision=PRECISION) * scale  # natural units
    t = tl.zeros_like(s)
    if HAS_SOFTCAP:
        x = s / CAP
        t = 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)  # tanh(x), saturating cleanly
        s = CAP * t
    pos = rows[:, None] + OFFSET
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
        s = s - slope * tl.abs(pos - keys[None, :]).to(tl.float32)
    s = s * 1.4426950408889634  # base 2: exp2 (one instruction) replaces exp
    visible = (keys[None, :] < N_KV) & (rows[:, None] < N_Q)
    if CAUSAL:
        visible = visible & (keys[None, :] <= pos)
    if HAS_WINDOW:
        visible = visible & (keys[None, :] >= pos - W)
        if not CAUSAL:
            visible = visible & (keys[None, :] <= pos + W)
    if HAS_DOCS:
        doc_q = tl.load(DOC + b * N_Q + rows, mask=rows < N_Q, other=-1)
        doc_k = tl.load(DOC + b * N_KV + keys, mask=keys < N_KV, other=-2)
        visible = visible & (doc_q[:, None] == doc_k[None, :])
    return tl.where(visible, s, float("-inf")), t


@triton.jit
def _key_bounds(
    b, start_m, N_Q, N_KV, OFFSET, W, START, END,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The keys rows start_m..start_m+BLOCK_M may see, [lo, hi): the tile loop's bounds, so tiles wholly
    outside causality, the window or the rows' documents are skipped, not masked."""
    last = tl.minimum(start_m + BLOCK_M, N_Q) - 1
    lo = 0
    hi = N_KV
    if CAUSAL:
        hi = tl.minimum(hi, last + OFFSET + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, start_m + OFFSET - W)
        if not CAUSAL:
            hi = tl.minimum(hi, last + OFFSET + W + 1)
    if HAS_DOCS:
        lo = tl.maximum(lo, tl.load(START + b * N_Q + start_m))
        hi = tl.minimum(hi, tl.load(END + b * N_Q + last))
    return lo, hi


@triton.jit
def _query_bounds(
    b, start_n, N_Q, N_KV, OFFSET, W, START, END,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The query rows that may see keys start_n..start_n+BLOCK_N, [lo, hi): the dK/dV loop's bounds."""
    last = tl.minimum(start_n + BLOCK_N, N_KV) - 1
    lo = 0
    hi = N_Q
    if CAUSAL:
        lo = tl.maximum(lo, start_n - OFFSET)
    if HAS_WINDOW:
        hi = tl.minimum(hi, last - OFFSET + W + 1)
        if not CAUSAL:
            lo = tl.maximum(lo, start_n - OFFSET - W)
    if HAS_DOCS:  # documents only where Nq = Nkv: a key's document is a query's
        lo = tl.maximum(lo, tl.load(START + b * N_KV + start_n))
        hi = tl.minimum(hi, tl.load(END + b * N_KV + last))
    return lo, hi


@triton.jit
def _forward_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    scale,  # the softmax scale; scores leave _scores in base 2, so exp2 replaces exp
    H, GROUP, N_Q, N_KV, HEAD_DIM, OFFSET,  # OFFSET: query i sits at position i + OFFSET
    W, CAP, SLOPES, DOC, START, END,  # window, softcap, ALiBi slopes (H,), documents: ids, first, last + 1
    CACHE_LENS, BLOCK_TABLE, PAGE, MAX_PAGES,  # a ragged batch's lengths (B,); a paged cache's table (B, MAX_PAGES)
    N_Q_CLASS, N_KV_CLASS,  # autotuning keys only
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr,
    HAS_LENS: tl.constexpr, HAS_PAGES: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kv = h // GROUP  # grouped-query attention: GROUP query heads read one kv head
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    if HAS_LENS:  # this request's own cache length; its new tokens are its last N_Q keys
        N_KV = tl.load(CACHE_LENS + b)
        OFFSET = N_KV - N_Q

    q = _load(Q + b * sqb + h * sqh, rows, dims, N_Q, HEAD_DIM, sqm, sqd, UPCAST)  # (M, D), stays on chip
    k_base = K + b * skb + kv * skh
    v_base = V + b * svb + kv * svh
    if HAS_PAGES:  # k, v are a pool (pages, PAGE, H_kv, D): strides skb/svb step pages, skn/svn tokens
        k_base = K + kv * skh
        v_base = V + kv * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row maximum (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # unnormalised output

    # Key tiles wholly outside causality, the window or the rows' documents are skipped, not masked.
    lo, hi = _key_bounds(b, start_m, N_Q, N_KV, OFFSET, W, START, END, CAUSAL, HAS_WINDOW, HAS_DOCS, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + cols
        if HAS_PAGES:  # every key through its page: table entry key // PAGE, slot key % PAGE
            page = tl.load(BLOCK_TABLE + b * MAX_PAGES + keys // PAGE, mask=keys < hi, other=0).to(tl.int64)
            k_t = _load_rows(k_base, page * skb + (keys % PAGE) * skn, dims, keys, hi, HEAD_DIM, skd, UPCAST, True)
        else:
            k_t = _load(k_base, dims, keys, HEAD_DIM, hi, skd, skn, UPCAST)  # (D, N): k read transposed
        s, _ = _scores(
            q, k_t, rows, keys, b, h, scale, N_Q, N_KV, OFFSET, W, CAP, SLOPES, DOC,
            CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, HAS_DOCS, PRECISION,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps maximum -inf; 0 in its place keeps exp2 away from NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)  # rescales what earlier tiles accumulated
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_PAGES:
            v = _load_rows(v_base, page * svb + (keys % PAGE) * svn, dims, keys, hi, HEAD_DIM, svd, UPCAST, False)
        else:
            v = _load(v_base, keys, dims, hi, HEAD_DIM, svn, svd, UPCAST)  # (N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Rows that saw no key (a fully masked row) give zeros, not 0/0, and lse -inf.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptr = O + b * sob + h * soh + rows[:, None] * som + dims[None, :] * sod
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(rows[:, None] < N_Q) & (dims[None, :] < HEAD_DIM))
    lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_i), float("-inf"))
    tl.store(LSE + (b * H + h) * N_Q + rows, lse, mask=rows < N_Q)


@triton.jit
def _preprocess_kernel(O, DO, DELTA, N_Q, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Δ = rowsum(dO ∘ O) per query row, the softmax's share of every row's gradient."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    base = tl.program_id(1) * N_Q * HEAD_DIM  # O and dO arrive contiguous (B·H, Nq, D)
    mask = (rows[:, None] < N_Q) & (dims[None, :] < HEAD_DIM)
    ptrs = base + rows[:, None] * HEAD_DIM + dims[None, :]
    o = tl.load(O + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + tl.program_id(1) * N_Q + rows, tl.sum(o * do, 1), mask=rows < N_Q)


@triton.jit
def _backward_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    scale,
    H, GROUP, N_Q, N_KV, HEAD_DIM, OFFSET,
    W, CAP, SLOPES, DOC, START, END,
    N_Q_CLASS, N_KV_CLASS,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """dK and dV of one key tile, accumulated on chip over every query tile of its GROUP query heads.

    Owning the key tile means no two programs write the same dK/dV rows: no atomics. dO and O are
    contiguous (B·H, Nq, D) here; dK and dV are written contiguous (B·H_kv, Nkv, D).
    """
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1) // (H // GROUP)
    kv = tl.program_id(1) % (H // GROUP)
    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load(K + b * skb + kv * skh, keys, dims, N_KV, HEAD_DIM, skn, skd, UPCAST)  # (N, D)
    v = _load(V + b * svb + kv * svh, keys, dims, N_KV, HEAD_DIM, svn, svd, UPCAST)  # (N, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query rows outside causality, the window or the keys' documents cannot see this key tile at all.
    first, stop = _query_bounds(b, start_n, N_Q, N_KV, OFFSET, W, START, END, CAUSAL, HAS_WINDOW, HAS_DOCS, BLOCK_N)
    for g in range(0, GROUP):
        h = kv * GROUP + g
        row_base = (b * H + h) * N_Q
        for start_m in range(first, stop, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = _load(Q + b * sqb + h * sqh, rows, dims, N_Q, HEAD_DIM, sqm, sqd, UPCAST)  # (M, D)
            do = _load(DO + row_base * HEAD_DIM, rows, dims, N_Q, HEAD_DIM, HEAD_DIM, 1, UPCAST)  # (M, D)
            lse = tl.load(LSE + row_base + rows, mask=rows < N_Q, other=float("inf"))  # (M,)
            delta = tl.load(DELTA + row_base + rows, mask=rows < N_Q, other=0.0)
            # A row that saw no key has lse -inf: +inf makes its P exactly 0, as in the forward.
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            s, t = _scores(
                q, tl.trans(k), rows, keys, b, h, scale, N_Q, N_KV, OFFSET, W, CAP, SLOPES, DOC,
                CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, HAS_DOCS, PRECISION,
            )  # fmt: skip
            p = tl.math.exp2(s - lse[:, None])  # the forward's probabilities (hidden pairs: 0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (M, N)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:  # through the cap: d(c·tanh(s/c))/ds = 1 - tanh²
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out_base = (b * (H // GROUP) + kv) * N_KV * HEAD_DIM
    ptrs = out_base + keys[:, None] * HEAD_DIM + dims[None, :]
    mask = (keys[:, None] < N_KV) & (dims[None, :] < HEAD_DIM)
    tl.store(DK + ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _backward_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    scale,
    H, GROUP, N_Q, N_KV, HEAD_DIM, OFFSET,
    W, CAP, SLOPES, DOC, START, END,
    N_Q_CLASS, N_KV_CLASS,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile over the key tiles it sees (a second pass, so dQ needs no atomics either)."""
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kv = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_base = (b * H + h) * N_Q
    q = _load(Q + b * sqb + h * sqh, rows, dims, N_Q, HEAD_DIM, sqm, sqd, UPCAST)
    do = _load(DO + row_base * HEAD_DIM, rows, dims, N_Q, HEAD_DIM, HEAD_DIM, 1, UPCAST)
    lse = tl.load(LSE + row_base + rows, mask=rows < N_Q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row_base + rows, mask=rows < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_bounds(b, start_m, N_Q, N_KV, OFFSET, W, START, END, CAUSAL, HAS_WINDOW, HAS_DOCS, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + cols
        k = _load(K + b * skb + kv * skh, keys, dims, hi, HEAD_DIM, skn, skd, UPCAST)  # (N, D)
        v = _load(V + b * svb + kv * svh, keys, dims, hi, HEAD_DIM, svn, svd, UPCAST)
        s, t = _scores(
            q, tl.trans(k), rows, keys, b, h, scale, N_Q, N_KV, OFFSET, W, CAP, SLOPES, DOC,
            CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, HAS_DOCS, PRECISION,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    ptrs = DQ + row_base * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    tl.store(ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(rows[:, None] < N_Q) & (dims[None, :] < HEAD_DIM))


_forward = _tuned(_forward_kernel)
_backward_kv = _tuned(_backward_kv_kernel, backward=True)
_backward_q = _tuned(_backward_q_kernel, backward=True)
FIXED = {"BLOCK_M": 32, "BLOCK_N": 32}  # the interpreter's tile: small, so a test's ragged edges show


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def _length_class(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def documents(cu_seqlens: torch.Tensor, batch: int, n: int) -> dict[str, torch.Tensor]:
    """Per token of each batch row (B·N int32 each): its document's index, first position and last + 1:
    what the kernels read to mask pairs across documents and to bound their tile loops."""
    cu = cu_seqlens.long()
    doc = doc_ids(cu_seqlens, batch, n).flatten()
    row_start = torch.arange(batch * n, device=cu.device) // n * n  # positions count from each row's first token
    return {
        "DOC": doc.to(torch.int32),
        "START": (cu[doc] - row_start).to(torch.int32),
        "END": (cu[doc + 1] - row_start).to(torch.int32),
    }


def _common(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    offset: int,
    allow_tf32: bool,
    mods: dict | None = None,
) -> dict:
    """The kernels' shared arguments; `mods`: window, softcap, alibi_slopes and (as `documents` made) the
    per-token document arrays DOC, START, END."""
    mods = mods or {}
    paged = mods.get("block_table") is not None
    heads, kv_heads = q.shape[1], k.shape[2] if paged else k.shape[1]
    upcast = INTERPRETED and q.dtype == torch.bfloat16  # the interpreter's bf16 dot is wrong (triton#11584)
    # float32: IEEE dots (CUDA cores) unless TF32 is allowed, as torch's own matmul decides. Half types
    # take the tensor cores whatever is asked; "tf32" is triton's default, so theirs stays the default.
    precision = "ieee" if q.dtype == torch.float32 and not allow_tf32 else "tf32"
    unused = torch.zeros(1, dtype=torch.int32, device=q.device)  # a pointer a disabled modifier never reads
    slopes = mods.get("alibi_slopes")
    return {
        "H": heads,
        "GROUP": heads // kv_heads,
        "N_Q": q.shape[2],
        "N_KV": k.shape[2] if not paged else int(mods["block_table"].shape[1]) * k.shape[1],
        "HEAD_DIM": q.shape[3],
        "OFFSET": offset,
        "W": int(mods.get("window") or 0),
        "CAP": float(mods.get("softcap") or 1.0),
        "SLOPES": unused if slopes is None else slopes.to(device=q.device, dtype=torch.float32),
        "DOC": mods.get("DOC", unused),
        "START": mods.get("START", unused),
        "END": mods.get("END", unused),
        "N_Q_CLASS": _length_class(q.shape[2]),
        "N_KV_CLASS": _length_class(k.shape[2] if not paged else int(mods["block_table"].shape[1]) * k.shape[1]),
        "CAUSAL": causal,
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[3])),
        "UPCAST": upcast,
        "PRECISION": precision,
        "HAS_WINDOW": mods.get("window") is not None,
        "HAS_SOFTCAP": mods.get("softcap") is not None,
        "HAS_ALIBI": slopes is not None,
        "HAS_DOCS": "DOC" in mods,
    } | (FIXED if INTERPRETED else {})


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    offset: int,
    allow_tf32: bool,
    mods: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Nq, D) in q's dtype and the rows' log-sum-exp in base 2 (B, H, Nq), float32."""
    batch, heads, n_q, head_dim = q.shape
    out = torch.empty((batch, heads, n_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    meta = _common(q, k, causal, offset, allow_tf32, mods)

    def grid(config: dict) -> tuple[int, int]:
        return (triton.cdiv(n_q, config["BLOCK_M"]), batch * heads)

    lens, table = (mods or {}).get("cache_lens"), (mods or {}).get("block_table")
    unused = meta["DOC"]
    paging = {
        "CACHE_LENS": unused if lens is None else lens,
        "BLOCK_TABLE": unused if table is None else table,
        "PAGE": k.shape[1] if table is not None else 1,
        "MAX_PAGES": table.shape[1] if table is not None else 1,
        "HAS_LENS": lens is not None,
        "HAS_PAGES": table is not None,
    }
    if table is not None:  # the pool's strides, in the (batch, head, token, dim) slots the kernel reads
        strides = [s for t in (q,) for s in t.stride()]
        for t in (k, v):
            pages, tokens, heads_, dims_ = t.stride()
            strides += [pages, heads_, tokens, dims_]
        strides += list(out.stride())
    else:
        strides = _strides(q, k, v, out)
    _forward[grid](q, k, v, out, lse, *strides, scale, **meta, **paging)
    return out, lse


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    causal: bool,
    scale: float,
    offset: int,
    allow_tf32: bool,
    mods: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2's backward: dq, dk, dv in the inputs' dtypes and shapes."""
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_kv = k.shape[1], k.shape[2]
    out, dout = out.contiguous(), dout.contiguous()
    delta = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    meta = _common(q, k, causal, offset, allow_tf32, mods)
    block_d = meta["BLOCK_D"]
    _preprocess_kernel[(triton.cdiv(n_q, 64), batch * heads)](out, dout, delta, n_q, head_dim, 64, block_d)
    dq = torch.empty((batch, heads, n_q, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, kv_heads, n_kv, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((batch, kv_heads, n_kv, head_dim), dtype=v.dtype, device=q.device)
    strides = _strides(q, k, v)
    common = (scale,)

    def kv_grid(config: dict) -> tuple[int, int]:
        return (triton.cdiv(n_kv, config["BLOCK_N"]), batch * kv_heads)

    def q_grid(config: dict) -> tuple[int, int]:
        return (triton.cdiv(n_q, config["BLOCK_M"]), batch * heads)

    _backward_kv[kv_grid](q, k, v, dout, lse, delta, dk, dv, *strides, *common, **meta)
    _backward_q[q_grid](q, k, v, dout, lse, delta, dq, *strides, *common, **meta)
    return dq, dk, dv
