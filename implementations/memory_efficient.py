"""Exact attention tiled over queries and keys with an online softmax: extra memory O(N), not O(N²).

The recurrence is Rabe & Staats' / FlashAttention's: per query tile keep a running row maximum m,
a running denominator l and an unnormalised accumulator; each key tile rescales them. Four tricks
make it fast on a CPU without leaving Python:

* scores are computed in base 2 (q pre-scaled by scale·log2 e) because torch's exp2 is many times
  faster than exp on CPUs, the same move FlashAttention makes on GPUs;
* once every row has seen a finite score, later key tiles reuse that (lagged) maximum, subtracted
  inside the score GEMM (baddbmm with -m as its input), and accumulate in place: the common case
  is GEMM, exp2, GEMM; a query tile whose row sums show the lagged maximum was too low is redone
  with exact steps (checked once per query tile, not per key tile);
* a column of ones appended to v makes the second GEMM produce l alongside the accumulator;
* low-precision inputs are computed in float32, as FlashAttention accumulates, and cast back.

Tiles are chosen for the device: on a CPU from a short tuning run cached per machine (cpu_tiles), on a
GPU every head in one group, larger tiles and no host synchronisation (_tile_sizes, _forward).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch

from harness.registry import register, register_tuner
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.masks import Positions, per_request, positions
from implementations.naive import DECODE_MODS, MODS

LOG2E = 1.4426950408889634
# A score tile holds at most this many elements per head group on a CPU (float32: 4 MiB).
TILE_ELEMENTS = 1 << 20
# CPU forward tiles (query rows, keys): None takes this machine's, tuned once and cached (cpu_tiles);
# tests and experiments set them. Tall query tiles matter most: each key tile is then read once for
# more rows (2-core AVX512 EPYC, N=4096: 1024x512 0.91-0.96x sdpa, 512x512 0.82x).
Q_TILE: int | None = None
K_TILE: int | None = None
DEFAULT_TILES = (1024, 512)
TILE_CANDIDATES = ((1024, 512), (512, 512), (1024, 256), (2048, 256), (512, 256), (256, 256))
TILES_ENV = "HARNESS_TILES"  # "1024x512": fixed CPU tiles, no tuning
TUNING_MARGIN = 0.05  # a candidate must beat DEFAULT_TILES by this much to replace them
BACKWARD_TILE = 512
# The fewest query rows per tile when a window or documents shrink the tiles (see _window_tiles).
MIN_WINDOW_TILE = 64
# On a GPU every head is in one group and a score tile (heads x rows x keys) holds at most this many
# elements (float32: 32 MiB, about an H100's L2), with keys per tile fixed; rows fill the rest.
CUDA_TILE_ELEMENTS = 1 << 23
CUDA_K_TILE = 512
# Decode (Flash-Decoding): the KV cache is split into partitions, each giving a partial output and
# log-sum-exp that are merged exactly at the end; a partition's scores hold at most
# DECODE_STEP_ELEMENTS elements (float32: 16 MiB on a CPU), and it has at least DECODE_MIN_PARTITION keys.
DECODE_MIN_PARTITION = 256
# Up to this many rows per kv head, float32 scores are computed as cache x rows (see _decode).
DECODE_CACHE_MAJOR_ROWS = 8
DECODE_STEP_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
# Keys per partition of a paged cache (whole pages): its pages are copied into one reused buffer that the
# two GEMMs then read. Measured on a 2-core Xeon, float32 B=8, H=32/8, D=128, ragged to 32k, GB/s at page
# size 16 / 256: 512 keys 7.2 / 7.7, 1024 8.0 / 8.0, 2048 8.4 / 9.1, 4096 8.3 / 8.7, 8192 6.9 / 7.4 (the
# contiguous cache, whole requests per partition: 14.6).
PAGED_PARTITION_KEYS = 2048
# A query tile whose row sums exceed this under the lagged maximum is redone exactly: far below
# float32's 2**127, so nothing on the fast path can overflow unnoticed.
OVERFLOW_LIMIT = 2.0**40


def _on_gpu(device: torch.device) -> bool:
    """GPU plan (all heads in one group, exact steps without host synchronisation) or CPU plan."""
    return device.type == "cuda"


def _tile_sizes(
    kv_heads: int,
    n_q: int,
    n_kv: int,
    ratio: int = 1,
    backward: bool = False,
    device: torch.device | None = None,
    tiles: tuple[int, int] | None = None,
) -> tuple[int, int, int]:
    """(kv heads per tile, query rows per head per tile, keys per tile). A tile's scores hold
    kv heads × ratio × query rows × keys elements: with grouped-query attention the `ratio` query heads
    of a kv head share its key tile, so fewer rows per head fit."""
    device = device or torch.device("cpu")
    if _on_gpu(device):
        # Thousands of threads want one large launch per step, not a Python loop over head groups.
        k_tile = min(n_kv, CUDA_K_TILE)
        q_tile = min(n_q, max(16, CUDA_TILE_ELEMENTS // (kv_heads * ratio * k_tile)))
        return kv_heads, q_tile, k_tile
    # The backward holds two score-sized tiles (P and dS) and writes dK, dV per key tile: square tiles.
    q_pref, k_pref = (BACKWARD_TILE, BACKWARD_TILE) if backward else tiles or forward_tiles()
    k_tile = min(n_kv, k_pref)
    q_tile = min(n_q, q_pref, max(1, TILE_ELEMENTS // (k_tile * ratio)))
    group = max(1, min(kv_heads, TILE_ELEMENTS // (ratio * q_tile * k_tile)))
    return group, q_tile, k_tile


def forward_tiles() -> tuple[int, int]:
    """The CPU forward's (query rows, keys) per tile: the module's, else this machine's tuned ones."""
    if Q_TILE and K_TILE:
        return Q_TILE, K_TILE
    return cpu_tiles(torch.get_num_threads())


def _parse_tiles(text: str) -> tuple[int, int]:
    rows, _, keys = text.lower().partition("x")
    if not (rows.isdigit() and keys.isdigit() and int(rows) > 0 and int(keys) > 0):
        raise ValueError(f"{TILES_ENV}={text!r}: expected ROWSxKEYS, e.g. 1024x512")
    return int(rows), int(keys)


def _isa() -> str:
    """The vector ISA torch's kernels use here (AVX512, AVX2 ...): the same CPU model can differ in it."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch < 2.1
        return ""


def tiles_path(threads: int) -> Path:
    """Beside the ceilings of this machine and thread count (harness.cache: ceilings/...-cpu-t<threads>-tiles.json)."""
    from harness.ceilings import cache_path

    path = cache_path("cpu", threads)
    return path.with_name(f"{path.stem}-tiles.json")


@functools.cache
def cpu_tiles(threads: int) -> tuple[int, int]:
    """This CPU's forward tiles: HARNESS_TILES if set, else tuned once per machine, thread count, torch and
    vector ISA (a second or two: tune_tiles) and cached. Tiles tuned on an AVX512 EPYC measured 0.70-0.82x sdpa
    on an AVX2 EPYC of the same machine kind, so they are measured where they run."""
    if os.environ.get(TILES_ENV):
        return _parse_tiles(os.environ[TILES_ENV])
    path = tiles_path(threads)
    try:
        saved = json.loads(path.read_text())
        if saved.get("torch") == torch.__version__ and saved.get("threads") == threads and saved.get("isa") == _isa():
            return _parse_tiles(saved["tiles"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none yet, or unreadable: tuned again, never trusted
    tiles, medians = tune_tiles()
    record = {
        "tiles": f"{tiles[0]}x{tiles[1]}",
        "threads": threads,
        "torch": torch.__version__,
        "isa": _isa(),
        "medians_s": {f"{q}x{k}": t for (q, k), t in medians.items()},
        "shape": "multi_head float32 B=1 H=8 N=2048 D=64, forward, 5 interleaved rounds",
        "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        from harness.results import write_atomically

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(record, indent=2) + "\n")
    except OSError:
        pass  # a read-only checkout still runs, with tiles tuned in this process
    return tiles


def tune_tiles(
    candidates: tuple[tuple[int, int], ...] = TILE_CANDIDATES,
    seq_len: int = 2048,
    heads: int = 8,
    head_dim: int = 64,
    rounds: int = 5,
) -> tuple[tuple[int, int], dict[tuple[int, int], float]]:
    """The fastest candidate tiles for the CPU forward, timed in interleaved rounds (a busy neighbour
    slows every candidate of a round alike); returns it and each candidate's median seconds."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    scale = head_dim**-0.5
    times: dict[tuple[int, int], list[float]] = {c: [] for c in candidates}
    with torch.inference_mode():
        for tiles in candidates:
            _forward(q, k, v, _dense(q, k), scale, None, tiles)  # warm-up: allocator, thread pool
        for _ in range(rounds):
            for tiles in candidates:
                started = time.perf_counter()
                _forward(q, k, v, _dense(q, k), scale, None, tiles)
                times[tiles].append(time.perf_counter() - started)
    medians = {c: statistics.median(t) for c, t in times.items()}
    best = min(candidates, key=medians.__getitem__)
    if DEFAULT_TILES in medians and medians[DEFAULT_TILES] <= medians[best] * (1 + TUNING_MARGIN):
        best = DEFAULT_TILES  # within noise of the default: keep the tiles measured on a quiet machine
    return best, medians


def retune(threads: int | None = None) -> tuple[tuple[int, int], Path]:
    """Tune this CPU's tiles again (`python -m harness ceilings`) and cache them; returns them and the file."""
    threads = threads or torch.get_num_threads()
    if not os.environ.get(TILES_ENV):
        tiles_path(threads).unlink(missing_ok=True)
    cpu_tiles.cache_clear()
    return cpu_tiles(threads), tiles_path(threads)


def _retune_report(threads: int | None) -> str:
    tiles, path = retune(threads)
    where = f"fixed by {TILES_ENV}" if os.environ.get(TILES_ENV) else f"saved: {path}"
    return f"tiles {tiles[0]}x{tiles[1]} (query rows x keys), {where}"


register_tuner("memory_efficient", "cpu", _retune_report)


def _apply_masks(scores: torch.Tensor, masks: list[torch.Tensor]) -> None:
    for mask in masks:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask, alpha=LOG2E)  # scores are in base 2, so is the additive mask


def _query_tile(
    q_i: torch.Tensor,
    k_t: torch.Tensor,
    v_ones: torch.Tensor,
    tiles: list[tuple[int, int, list[torch.Tensor]]],
    scores_buffer: torch.Tensor,
    exact: bool,
    softcap2: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One query tile's unnormalised output with its row sums in the last column, and the maximum
    (base 2) they are relative to, for the log-sum-exp the backward needs.

    Key tiles take exact steps (own maximum, rescaling what came before) until every row has seen a
    finite score; after that they use that lagged maximum: GEMM, exp2, GEMM accumulated in place.
    Returns None when the lagged path may have overflowed, so the caller redoes the tile exactly.
    """
    g, n, head_dim = q_i.shape[0], q_i.shape[1], v_ones.shape[-1] - 1
    row_max = torch.full((g, n, 1), float("-inf"), dtype=q_i.dtype, device=q_i.device)
    acc = torch.zeros((g, n, head_dim + 1), dtype=q_i.dtype, device=q_i.device)
    neg_offset: torch.Tensor | None = None  # -row_max once every row has a finite one
    for j, w, masks in tiles:
        s = scores_buffer[: g * n * w].view(g, n, w)
        k_j, v_j = k_t[:, :, j : j + w], v_ones[:, j : j + w]
        if neg_offset is not None:
            if softcap2 is None:
                torch.baddbmm(neg_offset, q_i, k_j, out=s)
            else:  # the cap is nonlinear in the score: applied before the maximum comes off
                _softcap_(torch.bmm(q_i, k_j, out=s), softcap2).add_(neg_offset)
            _apply_masks(s, masks)
            acc.baddbmm_(s.exp2_(), v_j)
            continue
        torch.bmm(q_i, k_j, out=s)
        if softcap2 is not None:
            _softcap_(s, softcap2)
        _apply_masks(s, masks)
        new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
        offset = new_max.masked_fill(torch.isneginf(new_max), 0.0)
        acc.mul_(torch.exp2(row_max - offset)).baddbmm_(s.sub_(offset).exp2_(), v_j)
        row_max = new_max
        if not exact and not bool(torch.isneginf(row_max).any()):
            neg_offset = row_max.neg()
    if neg_offset is not None and not (acc[..., head_dim].max().item() <= OVERFLOW_LIMIT and acc.isfinite().all()):
        return None
    return acc, row_max.masked_fill(torch.isneginf(row_max), 0.0)  # (G, n, D + 1), (G, n, 1)


def _softcap_(s: torch.Tensor, cap2: float) -> torch.Tensor:
    """Soft-capping in base 2, in place: scores are s·log2(e), so the cap is c·log2(e) too."""
    return s.div_(cap2).tanh_().mul_(cap2)


def _key_tiles(
    where: Positions, b: int, i: int, n: int, k_tile: int, mask_rows, ratio: int, slopes, device, memo=None
) -> list:
    """The key tiles query rows i..i+n of batch row b see: (start, width, masks). Only the keys causality,
    the window and the documents leave are visited (the tile loop's bounds follow them: the work follows
    `density`); a tile some of whose pairs are hidden gets a boolean mask, ALiBi an additive one.

    Masks come folded like the queries: (kv heads, ratio · n, w), the ratio query heads of a kv head
    stacked row-wise (harness's grouped-query layout; ratio 1 without grouping). `slopes`: the ALiBi
    slopes of this tile's query heads (kv heads · ratio,), or None.
    """
    tiles = []
    lo, hi = where.key_range(b, i, n)
    rows = torch.arange(i, i + n, device=device)
    for j in range(lo, hi, k_tile):
        w = min(k_tile, hi - j)
        masks = []
        if mask_rows is not None:  # (kv heads · ratio, n, Nkv)
            tile = mask_rows[..., j : j + w]
            masks.append(tile.reshape(tile.shape[0] // ratio, ratio * n, w))
        cols = None
        if not where.all_visible(b, i, n, j, w):  # a tile on the diagonal, the window's edge or a document's
            key = None if memo is None or not where.one_document(b, i, n, j, w) else (i - j, n, w)
            allowed = None if key is None else memo.get(key)
            if allowed is None:
                cols = torch.arange(j, j + w, device=device)
                allowed = where.allowed(rows, cols, b)[0]  # (n, w)
                allowed = allowed.repeat(ratio, 1) if ratio > 1 else allowed
                if key is not None:
                    memo[key] = allowed
            masks.append(allowed)
        if slopes is not None:
            cols = torch.arange(j, j + w, device=device) if cols is None else cols
            distance = ((rows + where.offset)[:, None] - cols[None, :]).abs().to(slopes.dtype)  # (n, w)
            bias = slopes[:, None, None] * distance.neg()  # (kv heads · ratio, n, w), natural units
            masks.append(bias.reshape(bias.shape[0] // ratio, ratio * n, w))
        tiles.append((j, w, masks))
    return tiles


def _layout(q, k, v, mask, scale, where: Positions):
    """Work-dtype views shared by forward and backward: base-2 pre-scaled q, k, v, and the query heads
    per kv head. Batch and heads are fused into one axis when there is no mask, no grouping and nothing
    that differs per batch row or head (documents, ALiBi): fewer, larger tiles. k and v are never
    repeated for grouped-query attention."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_kv = k.shape[1], k.shape[2]
    ratio = heads // kv_heads
    qs = q.to(work) * (scale * LOG2E)  # (B, H, Nq, D), scores come out in base 2
    k_w, v_w = k.to(work), v.to(work)  # (B, H_kv, Nkv, D)
    if mask is None and ratio == 1 and where.cu_seqlens is None and where.alibi_slopes is None:
        qs, k_w, v_w = (t.reshape(1, batch * heads, *t.shape[2:]) for t in (qs, k_w, v_w))  # (1, B·H, N, D)
    elif mask is not None:
        if mask.dtype != torch.bool:
            # An additive mask at the dtype's limit (transformers' eager_mask: 0 / finfo.min) times log2(e)
            # would overflow to -inf and turn a fully masked row into zeros, where the reference's finite
            # scores give a uniform average. Clamped, the sum stays at the limit, as in naive.
            mask = mask.clamp(min=torch.finfo(mask.dtype).min / LOG2E)
        mask = mask.expand(batch, heads, n_q, n_kv)  # (B, H, Nq, Nkv), a view: no copy
    return work, qs, k_w, v_w, mask, ratio


def _fold(t: torch.Tensor, ratio: int) -> torch.Tensor:
    """(kv heads · ratio, n, X) → (kv heads, ratio · n, X): a kv head's query heads as one row block."""
    return t if ratio == 1 else t.reshape(t.shape[0] // ratio, ratio * t.shape[1], t.shape[2])


def _unfold(t: torch.Tensor, ratio: int) -> torch.Tensor:
    return t if ratio == 1 else t.reshape(t.shape[0] * ratio, t.shape[1] // ratio, t.shape[2])


def _head_groups(kv_heads: int, group: int, ratio: int):
    """(kv head slice, query head slice) per tile of `group` kv heads."""
    for h in range(0, kv_heads, group):
        ks = slice(h, min(h + group, kv_heads))
        yield ks, slice(ks.start * ratio, ks.stop * ratio)


def _dense(q: torch.Tensor, k: torch.Tensor) -> Positions:
    return positions(q, k, False)


def _window_tiles(where: Positions, q_tile: int, n_q: int) -> int:
    """Query rows per tile when a window or documents bound what rows see: a tile of n rows visits about
    n + W keys for W per row, so tall tiles waste most of their work on hidden pairs (causal N=8192,
    W=512: 1024-row tiles visit 3x the keys a row sees). Rows of W/4 (an eighth of an average document)
    keep that waste near 1.25x while the heads of a group still share one GEMM; measured on a 2-core
    Xeon, causal B=1 H=8 D=64 N=8192, speed-up over no window (W=512) / over one document (16):
    W/2 3.9x, W/4 4.4x, W/8 4.2x; len/2 3.7x, len/4 4.2x, len/8 5.5x."""
    spans = []
    if where.window is not None:
        spans.append(where.window // 4)
    if where.cu_seqlens is not None:
        spans.append(where.batch * n_q // max(1, where.cu_seqlens.numel() - 1) // 8)
    if not spans:
        return q_tile
    return max(MIN_WINDOW_TILE, min(q_tile, *spans))


def _forward(
    q, k, v, where: Positions, scale: float, mask, tiles=None, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, H, Nq, D) in the work dtype and the rows' log-sum-exp in base 2, (B, H, Nq).

    On a CPU a query tile takes the lagged-maximum fast path and checks once, on the host, whether to
    redo it exactly; on a GPU that check would stall the stream every tile, so steps are always exact.
    """
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    work, qs, k_w, v_w, mask, ratio = _layout(q, k, v, mask, scale, where)
    k_t = k_w.transpose(-2, -1)  # (., H_kv, D, Nkv)
    v_ones = torch.cat([v_w, v_w.new_ones((*v_w.shape[:3], 1))], dim=-1)  # (., H_kv, Nkv, D + 1)
    out = torch.empty(qs.shape, dtype=work, device=q.device)  # (., H, Nq, D)
    lse = torch.empty(qs.shape[:3], dtype=work, device=q.device)  # (., H, Nq)
    group, q_tile, k_tile = _tile_sizes(k_w.shape[1], n_q, n_kv, ratio, device=q.device, tiles=tiles)
    if not _on_gpu(q.device) and _window_tiles(where, q_tile, n_q) < q_tile:
        q_tile = _window_tiles(where, q_tile, n_q)
        if where.window is not None and q_tile + where.window <= 2 * k_tile:
            k_tile = min(n_kv, q_tile + where.window)  # a row tile's whole band in one key tile
        group = max(1, min(k_w.shape[1], TILE_ELEMENTS // (ratio * q_tile * k_tile)))
    gpu = _on_gpu(q.device)
    cap2 = None if softcap is None else softcap * LOG2E
    slopes = None if where.alibi_slopes is None else where.alibi_slopes.to(work)
    memo: dict = {}  # this call's tile masks (see _key_tiles), freed with it
    scores_buffer = torch.empty(group * ratio * q_tile * k_tile, dtype=work, device=q.device)  # one tile

    for b in range(qs.shape[0]):
        for ks, hs in _head_groups(k_w.shape[1], group, ratio):
            for i in range(0, n_q, q_tile):
                n = min(q_tile, n_q - i)
                rows = None if mask is None else mask[b, hs, i : i + n]
                head_slopes = None if slopes is None else slopes[hs]
                tiles = _key_tiles(where, b, i, n, k_tile, rows, ratio, head_slopes, q.device, memo)
                # q tile (G, ratio · n, D), the kv heads' keys (G, D, Nkv) and values (G, Nkv, D + 1)
                args = (_fold(qs[b, hs, i : i + n], ratio), k_t[b, ks], v_ones[b, ks], tiles, scores_buffer)
                done = (None if gpu else _query_tile(*args, exact=False, softcap2=cap2)) or _query_tile(
                    *args, exact=True, softcap2=cap2
                )
                acc, row_max = done  # (G, ratio · n, D + 1): unnormalised output | row sum; (G, ratio · n, 1)
                # Rows that saw no key have l = 0 and acc = 0: the clamp makes them 0, not NaN.
                total = acc[..., head_dim:]
                if ratio == 1:  # straight into the output, no temporary
                    torch.div(acc[..., :head_dim], total.clamp_min(1e-30), out=out[b, hs, i : i + n])
                else:
                    out[b, hs, i : i + n] = _unfold(acc[..., :head_dim] / total.clamp_min(1e-30), ratio)
                lse[b, hs, i : i + n] = _unfold(row_max + torch.log2(total), ratio).squeeze(-1)  # -inf: no key
    return out.reshape(batch, heads, n_q, head_dim), lse.reshape(batch, heads, n_q)


def _backward(q, k, v, out, lse, dout, where: Positions, scale: float, mask, softcap: float | None = None):
    """FlashAttention-2's backward: score tiles recomputed from the saved log-sum-exp, never stored whole.

    Per tile pair: S = q kᵀ (base 2), P = 2^(S − lse), dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − Δ) with
    Δ = rowsum(dO ∘ O), dQ += dS K · scale, dK += dSᵀ Q · scale: five GEMMs against the forward's two.
    With grouped-query attention a kv head's query heads are one row block, so dK and dV sum over them
    inside the GEMMs.
    """
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    work, qs, k_w, v_w, mask, ratio = _layout(q, k, v, mask, scale, where)
    shape = qs.shape[:2]
    do = dout.to(work).reshape(*shape, n_q, head_dim)  # (., H, Nq, D)
    delta = (do * out.to(work).reshape(*shape, n_q, head_dim)).sum(-1, keepdim=True)  # (., H, Nq, 1)
    # A row that saw no key has lse = -inf; +inf makes its P exactly 0 (gradients 0, not NaN).
    lse = lse.to(work).reshape(*shape, n_q, 1)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    dq = torch.zeros_like(qs)  # (., H, Nq, D)
    dk, dv = torch.zeros_like(k_w), torch.zeros_like(v_w)  # (., H_kv, Nkv, D)
    group, q_tile, k_tile = _tile_sizes(k_w.shape[1], n_q, n_kv, ratio, backward=True, device=q.device)
    cap2 = None if softcap is None else softcap * LOG2E
    slopes = None if where.alibi_slopes is None else where.alibi_slopes.to(work)
    buffers = torch.empty(2 if cap2 is None else 3, group * ratio * q_tile * k_tile, dtype=work, device=q.device)
    for b in range(shape[0]):
        for ks, hs in _head_groups(k_w.shape[1], group, ratio):
            g = ks.stop - ks.start
            for i in range(0, n_q, q_tile):
                n = min(q_tile, n_q - i)
                rows = None if mask is None else mask[b, hs, i : i + n]
                q_i, do_i = (_fold(t[b, hs, i : i + n], ratio) for t in (qs, do))  # (G, ratio · n, D)
                lse_i, delta_i = (_fold(t[b, hs, i : i + n], ratio) for t in (lse, delta))  # (G, ratio · n, 1)
                dq_i = torch.zeros_like(q_i)
                m = ratio * n
                head_slopes = None if slopes is None else slopes[hs]
                for j, w, masks in _key_tiles(where, b, i, n, k_tile, rows, ratio, head_slopes, q.device):
                    k_j, v_j = k_w[b, ks, j : j + w], v_w[b, ks, j : j + w]  # (G, w, D)
                    p = buffers[0, : g * m * w].view(g, m, w)
                    torch.bmm(q_i, k_j.transpose(-2, -1), out=p)
                    if cap2 is not None:
                        tanh = buffers[2, : g * m * w].view(g, m, w)
                        torch.div(p, cap2, out=tanh).tanh_()
                        torch.mul(tanh, cap2, out=p)
                    _apply_masks(p, masks)
                    p.sub_(lse_i).exp2_()  # P, the forward's probabilities, recomputed
                    dv[b, ks, j : j + w].baddbmm_(p.transpose(-2, -1), do_i)
                    ds = buffers[1, : g * m * w].view(g, m, w)
                    torch.bmm(do_i, v_j.transpose(-2, -1), out=ds)  # dP
                    ds.sub_(delta_i).mul_(p)  # dS = P ∘ (dP − Δ)
                    if cap2 is not None:  # through the cap: d(c·tanh(s/c))/ds = 1 − tanh²
                        ds.mul_(tanh.square_().neg_().add_(1.0))
                    dq_i.baddbmm_(ds, k_j, alpha=scale)
                    # q_i is q · scale · log2 e: dividing by log2 e leaves dK = dSᵀ q · scale.
                    dk[b, ks, j : j + w].baddbmm_(ds.transpose(-2, -1), q_i, alpha=1 / LOG2E)
                dq[b, hs, i : i + n] = _unfold(dq_i, ratio)
    return dq.reshape(batch, heads, n_q, head_dim), *(t.reshape(batch, -1, n_kv, head_dim) for t in (dk, dv))


class _MemoryEfficientAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the per-row log-sum-exp (O(N)); the backward recomputes tiles."""

    @staticmethod
    def forward(ctx, q, k, v, where, scale, mask, softcap):
        out, lse = _forward(q, k, v, where, scale, mask, softcap=softcap)
        result = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse, *([] if mask is None else [mask]))
        ctx.where, ctx.scale, ctx.softcap = where, scale, softcap
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        mask = rest[0] if rest else None
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.where, ctx.scale, mask, ctx.softcap)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    offset: int = 0,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The tiled kernel with query i at position i + offset (0: top-left; decode: bottom-right)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    where = positions(q, k, causal, offset, window, alibi_slopes, cu_seqlens)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _MemoryEfficientAttention.apply(q, k, v, where, scale, mask, softcap)
    return _forward(q, k, v, where, scale, mask, softcap=softcap)[0].to(q.dtype)


@register("memory_efficient", variants=DOT_PRODUCT_VARIANTS, mods=MODS)
def memory_efficient(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    **mods: object,
) -> torch.Tensor:
    """Tiled exact attention with an online (running max / log-sum-exp) softmax, O(N) extra memory."""
    return attend(q, k, v, causal=causal, scale=scale, mask=mask, **mods)


def _decode_partitions(n_kv: int, rows: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """Key ranges of one decode step's partitions: as few as the scratch budget allows (see _decode).
    `rows`: the step's heads x rows per kv head."""
    budget = DECODE_STEP_ELEMENTS.get(device.type, DECODE_STEP_ELEMENTS["cpu"])
    size = min(n_kv, max(DECODE_MIN_PARTITION, budget // rows))  # rows: B x kv heads x rows per kv head
    for start in range(0, n_kv, size):
        yield start, min(n_kv, start + size)


def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Flash-Decoding: per KV partition a partial output and log-sum-exp, merged exactly.

    The query heads of one kv head and their Nq new tokens are one block of rows, so each key and value
    is read once for all of them. With few rows in float32, scores come out as (keys, rows), the cache
    times the rows: the memory-bound shape MKL streams fastest (2-core EPYC, Nkv=32k, 8 kv heads, 4
    rows: 21 GB/s, against 10 GB/s for rows times the transposed cache), then turn into (rows, keys)
    for the softmax; with more rows, or in bfloat16, rows times the transposed cache is faster.
    On a CPU the BLAS already spreads one GEMM over the cores, so partitions are as long as the scratch
    budget allows (256 partitions of 1024 keys took 20 ms where one 32k-key GEMM per head took 6.7 ms):
    a step takes whole caches of as many heads as fit, and only a head too long for the budget is split.
    Low-precision caches are multiplied in their own dtype (read once, as a tensor-core GEMM would)
    with the softmax and the merge in float32.
    """
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_kv = k.shape[1], k.shape[2]
    rows = heads // kv_heads * n_q  # query heads of a kv head x new tokens
    gemm = q.dtype
    work = torch.float64 if gemm == torch.float64 else torch.float32
    q_rows = (q.to(work) * (scale * LOG2E)).to(gemm).reshape(batch * kv_heads, rows, head_dim)  # (B·H_kv, R, D)
    k_f, v_f = (t.reshape(batch * kv_heads, n_kv, head_dim) for t in (k, v))  # views of a cache
    # Which operand streams: measured on a 2-core EPYC at Nkv=32k (ms, cache x rows / rows x cache^T):
    # float32 with 4 rows 8.0 / 15.0, with 32 rows 62 / 41; bfloat16 with 4 rows 13.0 / 7.9.
    cache_major = gemm in (torch.float32, torch.float64) and rows <= DECODE_CACHE_MAJOR_ROWS
    # Row r is new token r % Nq: it sees keys j <= Nkv - Nq + r % Nq.
    last_key = torch.arange(rows, device=q.device)[:, None] % n_q + (n_kv - n_q) if causal and n_q > 1 else None
    budget = DECODE_STEP_ELEMENTS.get(q.device.type, DECODE_STEP_ELEMENTS["cpu"])
    # Whole (batch, kv head) caches per step while their scores fit the budget: those slices are
    # contiguous, and a bfloat16 GEMM on a key range of many heads (a strided batch) ran 6x slower.
    # A head whose scores alone exceed it is split into key partitions and merged (Flash-Decoding).
    head_step = max(1, budget // (rows * n_kv))
    out = torch.empty((batch * kv_heads, rows, head_dim), dtype=work, device=q.device)
    for h0 in range(0, batch * kv_heads, head_step):
        h1 = min(batch * kv_heads, h0 + head_step)
        q_h, k_h, v_h = q_rows[h0:h1], k_f[h0:h1], v_f[h0:h1]
        partials = [
            _partition(
                q_h,
                k_h[:, start:stop],
                v_h[:, start:stop],
                last_key if last_key is not None and stop - 1 > n_kv - n_q else None,
                start,
                cache_major,
                work,
            )
            for start, stop in _decode_partitions(n_kv, (h1 - h0) * rows, q.device)
        ]
        out[h0:h1] = _merge(partials)
    return out.view(batch, heads, n_q, head_dim).to(q.dtype)


def _partition(q_h, k_p, v_p, last_key, start: int, cache_major: bool, work) -> tuple:
    """One Flash-Decoding partition: rows q_h (heads, R, D) over keys k_p, v_p (heads, S, D) starting at
    key `start`; `last_key` (R, 1), each row's last visible key, or None when the partition needs no mask.
    Returns the unnormalised output (heads, R, D), the rows' maxima and sums (heads, R, 1), base 2."""
    if cache_major:
        scores = torch.bmm(k_p, q_h.transpose(1, 2))  # (heads, S, R), base 2
        s = scores.transpose(1, 2).to(work).contiguous()  # (heads, R, S): row-wise reductions run fast
    else:
        s = torch.bmm(q_h, k_p.transpose(1, 2)).to(work)  # (heads, R, S), base 2
    if last_key is not None:
        s.masked_fill_(torch.arange(start, start + k_p.shape[1], device=s.device) > last_key, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # (heads, R, 1)
    m = m.masked_fill(torch.isneginf(m), 0.0)  # a partition a row cannot see adds exactly 0
    p = s.sub_(m).exp2_()
    return torch.bmm(p.to(q_h.dtype), v_p).to(work), m, p.sum(dim=-1, keepdim=True)


def _merge(partials: list[tuple]) -> torch.Tensor:
    """The partitions' partial outputs merged exactly by their log-sum-exps: the rows' normalised output."""
    if len(partials) == 1:
        out, _, total = partials[0]
        return out / total
    outs, maxima, sums = (torch.stack(parts) for parts in zip(*partials, strict=True))  # (P, heads, R, .)
    weight = torch.exp2(maxima - maxima.amax(dim=0))  # each partition's share of the row's softmax
    return (outs * weight).sum(0) / (sums * weight).sum(0)


def _decode_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_lens: torch.Tensor,
    block_table: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Flash-Decoding over a ragged batch, its cache contiguous (B, H_kv, Nkv, D) or a pool of pages
    (num_pages, P, H_kv, D): per request, partitions of its own keys (a run of its pages, copied into one
    small reused buffer, never the whole cache) give partial outputs and log-sum-exps, merged exactly.
    Request b's Nq new tokens are the last Nq of its cache_lens[b] keys."""
    batch, heads, n_q, head_dim = q.shape
    paged = block_table is not None
    kv_heads = k.shape[2] if paged else k.shape[1]
    rows = heads // kv_heads * n_q  # query heads of a kv head x new tokens
    gemm = q.dtype
    work = torch.float64 if gemm == torch.float64 else torch.float32
    q_rows = (q.to(work) * (scale * LOG2E)).to(gemm).reshape(batch, kv_heads, rows, head_dim)
    cache_major = gemm in (torch.float32, torch.float64) and rows <= DECODE_CACHE_MAJOR_ROWS
    token = torch.arange(rows, device=q.device)[:, None] % n_q  # row r is new token r % Nq
    # Contiguous: partitions as long as the scratch budget allows (a whole request, mostly), as _decode.
    part = max(
        DECODE_MIN_PARTITION, DECODE_STEP_ELEMENTS.get(q.device.type, DECODE_STEP_ELEMENTS["cpu"]) // (kv_heads * rows)
    )
    if paged:
        part = PAGED_PARTITION_KEYS
        page = k.shape[1]
        part = max(page, part // page * page)  # whole pages per partition
        buffers = [torch.empty((part // page, page, kv_heads, head_dim), dtype=k.dtype, device=k.device) for _ in "kv"]
    out = torch.empty((batch, kv_heads, rows, head_dim), dtype=work, device=q.device)
    for b, n in enumerate(cache_lens.tolist()):
        q_b = q_rows[b]  # (H_kv, R, D)
        last_key = token + (n - n_q)  # each row's last visible key
        partials = []
        for start in range(0, n, part):
            stop = min(n, start + part)
            if paged:
                ids = block_table[b, start // page : -(-stop // page)]
                k_h, v_h = (
                    torch.index_select(t, 0, ids, out=buffer[: len(ids)]).flatten(0, 1)[: stop - start].transpose(0, 1)
                    for t, buffer in zip((k, v), buffers, strict=True)
                )  # (H_kv, L, D) views of this partition's pages
            else:
                k_h, v_h = k[b, :, start:stop], v[b, :, start:stop]
            masked = last_key if n_q > 1 and stop - 1 > n - n_q else None
            partials.append(_partition(q_b, k_h, v_h, masked, start, cache_major, work))
        out[b] = _merge(partials)
    return out.view(batch, heads, n_q, head_dim).to(q.dtype)


@register("memory_efficient", variants=("decode",), mods=DECODE_MODS)
def memory_efficient_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    cache_lens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    **mods: object,
) -> torch.Tensor:
    """Flash-Decoding: KV-cache partitions give partial outputs and log-sum-exps, merged exactly."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cache_lens is not None:
        if mask is not None:
            raise ValueError("memory_efficient: a user mask with a ragged or paged cache is not mapped")
        if mods:  # score modifiers on a ragged batch: the tiled kernel per request, its pages gathered
            return per_request(attend, q, k, v, cache_lens, block_table, scale=scale, **mods)
        return _decode_cache(q, k, v, cache_lens, block_table, scale)
    if mask is not None or mods or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        # A user mask, a score modifier or a gradient: the tiled kernel, its queries at the cache's end (its
        # tile loop then visits only the keys a window leaves).
        offset = k.shape[2] - q.shape[2]
        return attend(q, k, v, causal=True, scale=scale, mask=mask, offset=offset, **mods)
    return _decode(q, k, v, causal, scale)
