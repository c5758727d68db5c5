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
    CAPTURE_NONE,
    S_CAP_LOCAL,
    S_CAPTURE,
    S_DONE,
    S_HI,
    S_LO,
    S_MISS,
    S_NCAND,
    S_PREFIX,
    S_SAMPLE,
    S_SEED_MIX,
    S_WRITE,
    W_BAD,
    W_GT,
    W_IN,
    capture_pending,
    captured,
)
from gallop_kernels.ops.select.score import (
    ROW_GTILE,
    first_slot,
    program_tiles,
    slot_fields,
    row_floor,
    tile_key,
    tile_of,
)

# When histogram_kernel runs (its constexpr MODE)
HIST_EXACT = tl.constexpr(0)  # radix shape: pass 0 always, a filtered pass while nothing is captured
HIST_SAMPLE = tl.constexpr(1)  # sampled shape: the estimate, over every S_SAMPLE-th tile
HIST_MISS = tl.constexpr(2)  # sampled shape: the level's exact histogram after a window miss


@triton.jit
def histogram_kernel(
    table_ptr, state_ptr, hist_ptr, eps,
    THETA_T: tl.constexpr, G_T: tl.constexpr, SCORE: tl.constexpr, HAS_G: tl.constexpr,
    SIGNED: tl.constexpr, ALIGNED: tl.constexpr, FILTER: tl.constexpr, FLOOR: tl.constexpr,
    SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, HI_MASK: tl.constexpr, BLOCK: tl.constexpr,
    MODE: tl.constexpr = HIST_EXACT,
):
    BINS: tl.constexpr = 1 << DIGIT_BITS
    t0, t1 = program_tiles(table_ptr)
    seed_mix = tl.load(state_ptr + S_SEED_MIX)
    if MODE == HIST_MISS:
        t1 = tl.where(tl.load(state_ptr + S_MISS) != 0, t1, t0)
    elif FILTER or MODE == HIST_SAMPLE:  # only while nothing is captured and nothing is final
        active = (tl.load(state_ptr + S_DONE) == 0) & (tl.load(state_ptr + S_CAPTURE) == CAPTURE_NONE)
        t1 = tl.where(active, t1, t0)
    if MODE == HIST_SAMPLE:
        stride = tl.load(state_ptr + S_SAMPLE)
    if FILTER:
        prefix = tl.load(state_ptr + S_PREFIX).to(tl.uint32)
    acc = tl.zeros([BINS], tl.int32)
    slot = first_slot(table_ptr, t0)
    row, start, nxt = slot_fields(table_ptr, slot)
    for t in range(t0, t1):
        if t >= nxt:  # the next tensor (every tensor of a launch has at least one tile)
            slot += 1
            row, start, nxt = slot_fields(table_ptr, slot)
        take = True
        if MODE == HIST_SAMPLE:  # the sample: every stride-th tile of the group
            take = (tl.load(row + ROW_GTILE) + t - start) % stride == 0
        if take:
            theta_ptr, g_ptr, offs, m, lim, base, gbase, gtile0 = tile_of(
                row, t - start, THETA_T, G_T, ALIGNED, BLOCK)
            gidx = gbase + offs
            key, _ = tile_key(theta_ptr, g_ptr, offs, m, gidx, eps, seed_mix, SCORE, HAS_G,
                              SIGNED, THETA_T, G_T, FLOOR, row_floor(row, FLOOR), ALIGNED, lim)
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
    table_ptr, state_ptr, cand_ptr, seg_start_ptr, seg_count_ptr, cnt_gt_ptr, wcount_ptr, eps,
    THETA_T: tl.constexpr, G_T: tl.constexpr, SCORE: tl.constexpr, HAS_G: tl.constexpr,
    SIGNED: tl.constexpr, ALIGNED: tl.constexpr, HI_MASK: tl.constexpr, BLOCK: tl.constexpr,
    FLOOR: tl.constexpr, WINDOWED: tl.constexpr = False,
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
    lo = tl.load(state_ptr + S_LO).to(tl.uint32)
    hi = (tl.load(state_ptr + S_HI) & HI_MASK).to(tl.uint32)
    span = hi - lo
    cap_local = tl.load(state_ptr + S_CAP_LOCAL).to(tl.int32)
    if WINDOWED:  # the window check needs the pass's totals (and counts NaN/inf on the way)
        write = tl.load(state_ptr + S_WRITE) != 0
        tot_in = tl.zeros([], tl.int64)
        tot_gt = tl.zeros([], tl.int64)
        # NaN/inf keys are the largest keys (signed: and the smallest): an elementwise max (and
        # min) over the program's tiles, reduced once after the loop, finds them
        kmax = tl.zeros([BLOCK], tl.uint32)
        kmin = tl.full([BLOCK], 0xFFFFFFFF, tl.uint32)
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
        key, _ = tile_key(theta_ptr, g_ptr, offs, m, gidx, eps, seed_mix, SCORE, HAS_G, SIGNED,
                          THETA_T, G_T, FLOOR, row_floor(row, FLOOR), ALIGNED, lim)
        high = key & HI_MASK
        # low 16 bits: entries with prefix >= lo; high 16 bits: entries with prefix > hi
        packed = tl.sum((m & (high >= lo)).to(tl.int32) + ((m & (high > hi)).to(tl.int32) << 16), 0)
        n_above = packed >> 16
        n = (packed & 0xFFFF) - n_above
        gtile = gtile0 + local
        if WINDOWED:
            tot_in += n
            tot_gt += n_above
            kmax = tl.maximum(kmax, key)  # (masked-off lanes hold a finite score's key)
            if SIGNED:
                kmin = tl.minimum(kmin, key)
            stores = (n > 0) & write
        else:
            stores = n > 0
        if stores:  # the capture machinery runs only on tiles that capture something
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
    if WINDOWED:
        tl.atomic_add(wcount_ptr + W_IN, tot_in, mask=tot_in > 0, sem="relaxed")
        tl.atomic_add(wcount_ptr + W_GT, tot_gt, mask=tot_gt > 0, sem="relaxed")
        if SIGNED:  # +inf/NaN: 0xFF800000 and up; -inf/NaN: 0x007FFFFF and down
            bad = (tl.max(kmax, 0) >= 0xFF800000) | (tl.min(kmin, 0) <= 0x007FFFFF)
        else:  # inf/NaN: exponent all ones (a NaN with its sign bit set is larger still)
            bad = tl.max(kmax, 0) >= 0x7F800000
        tl.atomic_add(wcount_ptr + W_BAD, bad.to(tl.int64), mask=bad, sem="relaxed")


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
