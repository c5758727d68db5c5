"""Ordered compaction (kernel 3 of `docs/design.md#kernels`).

Once the threshold key T (with its bit mask M, state S_PREFIX / S_MASK) is known, selected =
every entry with (key & M) > T plus the first ties (key & M == T) in global flat order, as many
as the launcher's tie quota gives each tile. Two steps, per tile (global tile ids):

* counts: entries above T and equal to T per tile, from θ and g (``count_kernel``) or, once
  candidates were captured, from the candidate segments (``candidate_count_kernel``);
* the launcher scans these per-tile vectors (torch.cumsum) into each tile's number of ties
  taken and output position;
* write: each tile writes its selected local indices, in order, at its position in its
  tensor's output (in-register exclusive scans), from θ and g (``write_kernel``) or from its
  candidate segment when every selectable entry was captured (``candidate_write_kernel``).
  Tiles taking nothing skip reading.

Each kernel exits at once (one state read per program) unless the capture mode says it is the
one that runs.
"""

import triton
import triton.language as tl

from gallop_kernels.ops.select.bucket import (
    CAPTURED_GE,
    S_CAPTURE,
    S_MASK,
    S_PREFIX,
    S_SEED_MIX,
    S_TILES,
    captured,
)
from gallop_kernels.ops.select.score import (
    ROW_GTILE,
    ROW_OUT,
    first_slot,
    program_tiles,
    slot_fields,
    row_floor,
    tile_key,
    tile_of,
)


@triton.jit
def count_kernel(
    table_ptr, state_ptr, gt_ptr, eq_ptr, eps,
    THETA_T: tl.constexpr, G_T: tl.constexpr, SCORE: tl.constexpr, HAS_G: tl.constexpr,
    SIGNED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FLOOR: tl.constexpr,
):
    """Per tile: entries above / equal to the threshold (active when nothing was captured)."""
    t0, t1 = program_tiles(table_ptr)
    t1 = tl.where(captured(tl.load(state_ptr + S_CAPTURE)), t0, t1)
    seed_mix = tl.load(state_ptr + S_SEED_MIX)
    thr = tl.load(state_ptr + S_PREFIX).to(tl.uint32)
    kmask = tl.load(state_ptr + S_MASK).to(tl.uint32)
    slot = first_slot(table_ptr, t0)
    row, start, nxt = slot_fields(table_ptr, slot)
    for t in range(t0, t1):
        if t >= nxt:
            slot += 1
            row, start, nxt = slot_fields(table_ptr, slot)
        local = t - start
        theta_ptr, g_ptr, offs, m, lim, base, gbase, gtile0 = tile_of(
            row, local, THETA_T, G_T, ALIGNED, BLOCK)
        gidx = gbase + offs
        key, _ = tile_key(theta_ptr, g_ptr, offs, m, gidx, eps, seed_mix,
                          SCORE, HAS_G, SIGNED, THETA_T, G_T, FLOOR, row_floor(row, FLOOR),
                          ALIGNED, lim)
        km = key & kmask
        packed = tl.sum((m & (km > thr)).to(tl.int32) + ((m & (km == thr)).to(tl.int32) << 16), 0)
        gtile = gtile0 + local
        tl.store(gt_ptr + gtile, packed & 0xFFFF)
        tl.store(eq_ptr + gtile, packed >> 16)


@triton.jit
def candidate_count_kernel(
    state_ptr, cand_ptr, seg_start_ptr, seg_count_ptr, gt_ptr, eq_ptr, CBLOCK: tl.constexpr,
):
    """Per tile, from its candidate segment: ``gt`` += captured entries above the threshold
    (``gt`` holds the counts above the captured bucket, 0 with CAPTURED_GE) and ``eq`` = the
    captured ties. Active when candidates were captured. A segment is read CBLOCK candidates
    at a time (a tile holds ~1% of its BLOCK entries as candidates at typical densities)."""
    capture = tl.load(state_ptr + S_CAPTURE)
    work = tl.where(captured(capture), tl.load(state_ptr + S_TILES), 0)
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    thr = tl.load(state_ptr + S_PREFIX).to(tl.uint32)
    kmask = tl.load(state_ptr + S_MASK).to(tl.uint32)
    for t in range(pid * work // nprog, (pid + 1) * work // nprog):
        n = tl.load(seg_count_ptr + t)
        first = tl.load(seg_start_ptr + t, mask=n > 0, other=0).to(tl.int64)
        packed = n * 0
        for j in range(0, n, CBLOCK):
            offs = j + tl.arange(0, CBLOCK)
            m = offs < n
            key = (tl.load(cand_ptr + first + offs, mask=m, other=0) >> 16).to(tl.uint32)
            km = key & kmask
            packed += tl.sum((m & (km > thr)).to(tl.int32) + ((m & (km == thr)).to(tl.int32) << 16), 0)
        tl.store(gt_ptr + t, tl.load(gt_ptr + t) + (packed & 0xFFFF))
        tl.store(eq_ptr + t, packed >> 16)


@triton.jit
def _ordered_take(km, valid, thr, ties, partial, tie_run):
    """Which entries of a tile (or of one chunk of its candidates) are taken: above the
    threshold, or among the tile's first ``ties`` ties in order (``tie_run`` ties came in earlier
    chunks; only a ``partial`` tile, taking some but not all of its ties, ranks them). Returns
    the mask, each taken entry's exclusive rank among the taken, and the chunk's ties."""
    is_gt = valid & (km > thr)
    is_eq = valid & (km == thr)
    eqi = is_eq.to(tl.int32)
    if partial:  # the one boundary tile takes part of its ties
        take = is_gt | (is_eq & ((tie_run + tl.cumsum(eqi, 0) - eqi) < ties))
    else:
        # (ties as a vector: the interpreter turns a vector & scalar-bool into integers)
        take = is_gt | (is_eq & ((tl.zeros(km.shape, tl.int64) + ties) > 0))
    ti = take.to(tl.int32)
    return take, tl.cumsum(ti, 0) - ti, tl.sum(eqi, 0)


@triton.jit
def write_kernel(
    table_ptr, state_ptr, take_ptr, take_excl_ptr, ties_ptr, eq_ptr, eps,
    THETA_T: tl.constexpr, G_T: tl.constexpr, IDX_T: tl.constexpr, SCORE: tl.constexpr,
    HAS_G: tl.constexpr, SIGNED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """Writes the selected local indices of every tile from θ and g (active unless every
    selectable entry was captured)."""
    t0, t1 = program_tiles(table_ptr)
    t1 = tl.where(tl.load(state_ptr + S_CAPTURE) == CAPTURED_GE, t0, t1)
    seed_mix = tl.load(state_ptr + S_SEED_MIX)
    thr = tl.load(state_ptr + S_PREFIX).to(tl.uint32)
    kmask = tl.load(state_ptr + S_MASK).to(tl.uint32)
    slot = first_slot(table_ptr, t0)
    row, start, nxt = slot_fields(table_ptr, slot)
    for t in range(t0, t1):
        if t >= nxt:
            slot += 1
            row, start, nxt = slot_fields(table_ptr, slot)
        local = t - start
        gtile0 = tl.load(row + ROW_GTILE)
        gtile = gtile0 + local
        if tl.load(take_ptr + gtile) > 0:
            theta_ptr, g_ptr, offs, m, lim, base, gbase, _ = tile_of(
                row, local, THETA_T, G_T, ALIGNED, BLOCK)
            gidx = gbase + offs
            key, _ = tile_key(theta_ptr, g_ptr, offs, m, gidx, eps, seed_mix,
                              SCORE, HAS_G, SIGNED, THETA_T, G_T, FLOOR, row_floor(row, FLOOR),
                              ALIGNED, lim)
            ties = tl.load(ties_ptr + gtile)
            partial = (ties > 0) & (ties < tl.load(eq_ptr + gtile))
            take, rank, _ = _ordered_take(key & kmask, m, thr, ties, partial, 0)
            # position of the tile's first selected entry within its tensor's output
            run = tl.load(take_excl_ptr + gtile) - tl.load(take_excl_ptr + gtile0)
            out_ptr = tl.load(row + ROW_OUT).to(tl.pointer_type(IDX_T))
            tl.store(out_ptr + run + rank, (base + offs).to(IDX_T), mask=take)


@triton.jit
def candidate_write_kernel(
    table_ptr, state_ptr, cand_ptr, seg_start_ptr, seg_count_ptr,
    take_ptr, take_excl_ptr, ties_ptr, eq_ptr, IDX_T: tl.constexpr, BLOCK: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    """Writes the selected local indices of every tile from its candidate segment, CBLOCK
    candidates at a time (active when every selectable entry was captured: CAPTURED_GE)."""
    t0, t1 = program_tiles(table_ptr)
    t1 = tl.where(tl.load(state_ptr + S_CAPTURE) == CAPTURED_GE, t1, t0)
    thr = tl.load(state_ptr + S_PREFIX).to(tl.uint32)
    kmask = tl.load(state_ptr + S_MASK).to(tl.uint32)
    slot = first_slot(table_ptr, t0)
    row, start, nxt = slot_fields(table_ptr, slot)
    for t in range(t0, t1):
        if t >= nxt:
            slot += 1
            row, start, nxt = slot_fields(table_ptr, slot)
        local = t - start
        gtile0 = tl.load(row + ROW_GTILE)
        gtile = gtile0 + local
        if tl.load(take_ptr + gtile) > 0:
            n = tl.load(seg_count_ptr + gtile)
            first = tl.load(seg_start_ptr + gtile).to(tl.int64)
            ties = tl.load(ties_ptr + gtile)
            partial = (ties > 0) & (ties < tl.load(eq_ptr + gtile))
            run = tl.load(take_excl_ptr + gtile) - tl.load(take_excl_ptr + gtile0)
            out_ptr = tl.load(row + ROW_OUT).to(tl.pointer_type(IDX_T))
            tie_run = n * 0
            for j in range(0, n, CBLOCK):  # the segment, CBLOCK candidates at a time
                offs = j + tl.arange(0, CBLOCK)
                valid = offs < n
                cand = tl.load(cand_ptr + first + offs, mask=valid, other=0)
                take, rank, n_eq = _ordered_take((cand >> 16).to(tl.uint32) & kmask, valid, thr,
                                                 ties, partial, tie_run)
                tl.store(out_ptr + run + rank, (local * BLOCK + (cand & 0xFFFF)).to(IDX_T),
                         mask=take)
                run += tl.sum(take.to(tl.int32), 0)
                tie_run += n_eq
