"""The radix passes (`docs/design.md#kernels`: kernels 1 and 2): histogram, capture, candidate histogram.

Every full pass is a persistent launch over the tiles (BLOCK entries of one tensor) of several
tensors (`score.program_tiles`, `score.slot_fields`): it reads θ and g once per tile, computes the
float32 score in registers (never stored) and its radix key.

* ``histogram_kernel``: pass 0 histograms the first digit of every key; later (FILTER) passes
  histogram the next digit of the keys matching the prefix chosen so far, and skip the
  histogram on tiles where nothing matches. Each program accumulates its histogram in registers
  over all its tiles and adds the non-zero bins to the global one at the end (relaxed atomics:
  the counts are read only after the launch), so a hot bin costs one atomic per program.
  NaN/inf scores need no separate count: their keys fill the top bins of pass 0 (see
  launcher.py, `bad_bins`).
* ``capture_kernel``: the pass after the bucket choice that decided to capture (S_CAPTURE):
  appends the tile's entries at/above or in the bucket (key << 16 | offset in the tile) to the
  candidate buffer as one segment per tile (one relaxed atomic reserves it, only on tiles that
  capture something) and stores, per tile, the segment and the count of entries above the bucket.
* ``candidate_histogram_kernel``: the later radix passes over the candidate buffer only.

A pass whose mode is not active exits after reading the state (one load per program).
"""

import triton
import triton.language as tl

from gallop_kernels.ops.select.bucket import (
    CAPTURE_GE_NEXT,
    CAPTURE_NONE,
    S_CAP_LOCAL,
    S_CAPTURE,
    S_DONE,
    S_NCAND,
    S_PREFIX,
    S_SEED_MIX,
    capture_pending,
    captured,
)
from gallop_kernels.ops.select.score import (
    first_slot,
    program_tiles,
    slot_fields,
    row_floor,
    tile_key,
    tile_of,
)


@triton.jit
def histogram_kernel(
    table_ptr, state_ptr, hist_ptr, eps,
    THETA_T: tl.constexpr, G_T: tl.constexpr, SCORE: tl.constexpr, HAS_G: tl.constexpr,
    SIGNED: tl.constexpr, ALIGNED: tl.constexpr, FILTER: tl.constexpr, FLOOR: tl.constexpr,
    SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, HI_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    BINS: tl.constexpr = 1 << DIGIT_BITS
    t0, t1 = program_tiles(table_ptr)
    seed_mix = tl.load(state_ptr + S_SEED_MIX)
    if FILTER:  # only while nothing is captured and the threshold is not final
        active = (tl.load(state_ptr + S_DONE) == 0) & (tl.load(state_ptr + S_CAPTURE) == CAPTURE_NONE)
        t1 = tl.where(active, t1, t0)
        prefix = tl.load(state_ptr + S_PREFIX).to(tl.uint32)
    acc = tl.zeros([BINS], tl.int32)
    slot = first_slot(table_ptr, t0)
    row, start, nxt = slot_fields(table_ptr, slot)
    for t in range(t0, t1):
        if t >= nxt:  # the next tensor (every tensor of a launch has at least one tile)
            slot += 1
            row, start, nxt = slot_fields(table_ptr, slot)
        theta_ptr, g_ptr, offs, m, base, gbase, gtile0 = tile_of(
            row, t - start, THETA_T, G_T, ALIGNED, BLOCK)
        gidx = gbase + offs
        key, _ = tile_key(theta_ptr, g_ptr, offs, m, gidx, eps, seed_mix,
                          SCORE, HAS_G, SIGNED, THETA_T, G_T, FLOOR, row_floor(row, FLOOR))
        digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
        if FILTER:
            hm = m & ((key & HI_MASK) == prefix)
            if tl.max(hm.to(tl.int32), 0) > 0:  # most tiles of a late pass match nothing
                acc += tl.histogram(digit, BINS, mask=hm)
        else:
            acc += tl.histogram(digit, BINS, mask=m)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + bins, acc.to(tl.int64), mask=acc > 0, sem="relaxed")


@triton.jit
def capture_kernel(
    table_ptr, state_ptr, cand_ptr, seg_start_ptr, seg_count_ptr, cnt_gt_ptr, eps,
    THETA_T: tl.constexpr, G_T: tl.constexpr, SCORE: tl.constexpr, HAS_G: tl.constexpr,
    SIGNED: tl.constexpr, ALIGNED: tl.constexpr, HI_MASK: tl.constexpr, BLOCK: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """Captures the candidates of every tile (active while S_CAPTURE is pending).

    A candidate is one int64, ``key << 16 | offset in the tile``. CAPTURE_GE_NEXT captures every
    entry whose key prefix is >= the chosen one (the bucket and all above it); CAPTURE_EQ_NEXT
    the bucket only, and then ``cnt_gt`` gets the count above it per tile. As a range: the
    prefixes in [lo, hi] are captured, with hi = HI_MASK (GE) or the prefix (EQ), and the entries
    above hi are counted (none for GE), so the per-element work is two comparisons with uniform
    bounds. Per tile: ``seg_count`` (0 when nothing is captured) and, when not 0,
    ``seg_start``. Offsets in a segment increase, so the write can emit indices in order."""
    tl.static_assert(BLOCK <= 32768)  # two in-tile counts packed into one int32 sum
    t0, t1 = program_tiles(table_ptr)
    capture = tl.load(state_ptr + S_CAPTURE)
    t1 = tl.where(capture_pending(capture), t1, t0)
    seed_mix = tl.load(state_ptr + S_SEED_MIX)
    lo = tl.load(state_ptr + S_PREFIX).to(tl.uint32)
    hi = tl.where(capture == CAPTURE_GE_NEXT, HI_MASK, lo.to(tl.int64)).to(tl.uint32)
    span = hi - lo
    cap_local = tl.load(state_ptr + S_CAP_LOCAL).to(tl.int32)
    slot = first_slot(table_ptr, t0)
    row, start, nxt = slot_fields(table_ptr, slot)
    for t in range(t0, t1):
        if t >= nxt:
            slot += 1
            row, start, nxt = slot_fields(table_ptr, slot)
        local = t - start
        theta_ptr, g_ptr, offs, m, base, gbase, gtile0 = tile_of(
            row, local, THETA_T, G_T, ALIGNED, BLOCK)
        gidx = gbase + offs
        key, _ = tile_key(theta_ptr, g_ptr, offs, m, gidx, eps, seed_mix,
                          SCORE, HAS_G, SIGNED, THETA_T, G_T, FLOOR, row_floor(row, FLOOR))
        high = key & HI_MASK
        # low 16 bits: entries with prefix >= lo; high 16 bits: entries with prefix > hi
        packed = tl.sum((m & (high >= lo)).to(tl.int32) + ((m & (high > hi)).to(tl.int32) << 16), 0)
        n_above = packed >> 16
        n = (packed & 0xFFFF) - n_above
        gtile = gtile0 + local
        if n > 0:  # the capture machinery runs only on tiles that capture something
            first = tl.atomic_add(state_ptr + S_NCAND, n.to(tl.int64), sem="relaxed").to(tl.int32)
            # The bucket choice admitted at most S_CAP_LOCAL candidates and this pass finds the
            # same keys, so the tile always fits; checked per tile to stay in bounds regardless.
            at = tl.where(first + n <= cap_local, first, -BLOCK)
            # (an unsigned range test, not the comparisons above: recomputed here rather than
            # kept alive as predicates through the reduction)
            cm = m & ((high - lo) <= span)
            ci = cm.to(tl.int32)
            # one int32 carries the position and the mask (-1: not stored)
            pos = tl.where(cm, at + (tl.cumsum(ci, 0) - ci), -1)
            cand = (key.to(tl.int64) << 16) | offs.to(tl.int64)
            tl.store(cand_ptr + pos, cand, mask=pos >= 0)
            tl.store(seg_start_ptr + gtile, first)
        tl.store(seg_count_ptr + gtile, n)
        tl.store(cnt_gt_ptr + gtile, n_above)


@triton.jit
def candidate_histogram_kernel(
    cand_ptr, state_ptr, hist_ptr,
    SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, HI_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    """A radix pass over the captured candidates instead of θ and g (active once the capture
    has happened and while the threshold is not final)."""
    BINS: tl.constexpr = 1 << DIGIT_BITS
    capture = tl.load(state_ptr + S_CAPTURE)
    active = (capture_pending(capture) | captured(capture)) & (tl.load(state_ptr + S_DONE) == 0)
    n = tl.minimum(tl.load(state_ptr + S_NCAND), tl.load(state_ptr + S_CAP_LOCAL))
    work = tl.where(active, tl.cdiv(n, BLOCK), 0)
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    prefix = tl.load(state_ptr + S_PREFIX).to(tl.uint32)
    acc = tl.zeros([BINS], tl.int32)
    for t in range(pid * work // nprog, (pid + 1) * work // nprog):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        key = (tl.load(cand_ptr + offs, mask=m, other=0) >> 16).to(tl.uint32)
        digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
        acc += tl.histogram(digit, BINS, mask=m & ((key & HI_MASK) == prefix))
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + bins, acc.to(tl.int64), mask=acc > 0, sem="relaxed")
