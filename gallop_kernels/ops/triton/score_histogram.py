"""Fused score + radix histogram pass (`docs/design.md#kernels`: kernel 1, the passes of kernel 2).

One program per chunk of ``BLOCK * TILES`` entries of one tensor (a multi-tensor launch: the
program finds its tensor in the launch table). It reads θ and g once, computes the float32 score
in registers (never stored), turns it into a radix key and histograms one digit of the key with
``tl.histogram`` into a per-program register histogram. Later passes keep only the entries whose
higher key bits equal the prefix chosen so far (read from the device state buffer, no host round
trip). At the end the program adds its non-zero bins to the global histogram with one atomic per
bin, so a hot bin (all-equal or all-zero scores) costs one atomic per program, not per entry.

Pass 0 also counts NaN/inf scores per tensor (``bad``), so the launcher can raise naming it.
"""

import triton
import triton.language as tl

from gallop_kernels.ops.triton.score import chunk_of, row_pointers, tile_key


@triton.jit
def score_histogram_kernel(
    table_ptr, n_slots, state_ptr, hist_ptr, bad_ptr, eps, seed_mix,
    cand_key_ptr, cand_chunk_ptr, cnt_gt_ptr, cap,
    LOG_SLOTS: tl.constexpr, THETA_T: tl.constexpr, G_T: tl.constexpr,
    SCORE: tl.constexpr, HAS_G: tl.constexpr, SIGNED: tl.constexpr,
    FILTER: tl.constexpr, CHECK_BAD: tl.constexpr,
    SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, HI_MASK: tl.constexpr,
    BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    """One radix pass over the chunks of a launch.

    FILTER (passes after the first): only entries whose key bits under HI_MASK equal the prefix
    in the state count. The pass is skipped when the threshold is already final (S_DONE) or the
    candidates were captured (S_CAPTURE == 2: ``candidate_histogram_kernel`` runs instead). When
    S_CAPTURE == 1 the pass also captures: it appends every matching entry (key, global chunk id)
    to the candidate buffer (one atomic per tile that has any) and stores, per chunk, the number
    of entries above the prefix (``cnt_gt``), so compaction needs no full counting pass.
    """
    BINS: tl.constexpr = 1 << DIGIT_BITS
    pid = tl.program_id(0)
    row, chunk, numel, base = chunk_of(table_ptr, pid, n_slots, LOG_SLOTS, BLOCK * TILES)
    theta_ptr, g_ptr = row_pointers(row, THETA_T, G_T)
    goff = tl.load(row + 3)
    gchunk = tl.load(row + 4) + chunk
    n_tiles = tl.minimum(tl.cdiv(numel - base, BLOCK), TILES).to(tl.int32)
    if FILTER:
        capture = tl.load(state_ptr + 5)
        skip = (tl.load(state_ptr + 3) != 0) | (capture == 2)
        n_tiles = tl.where(skip, 0, n_tiles)
        prefix = tl.load(state_ptr + 0).to(tl.uint32)
        capturing = capture == 1
        # (as a vector: the interpreter turns vector & scalar-bool into integers)
        capturing_vec = (tl.zeros([BLOCK], tl.int64) + capture) == 1
        n_above = tl.zeros([BLOCK], tl.int32)
    acc = tl.zeros([BINS], tl.int32)
    nbad = tl.zeros([BLOCK], tl.int32)
    for t in range(0, n_tiles):
        offs = base + t * BLOCK + tl.arange(0, BLOCK)  # int64
        m = offs < numel
        key, bad = tile_key(theta_ptr, g_ptr, offs, m, goff + offs, eps, seed_mix,
                            SCORE, HAS_G, SIGNED, THETA_T, G_T)
        digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
        if FILTER:
            high = key & HI_MASK
            hm = m & (high == prefix)
            # capture (a no-op unless S_CAPTURE == 1)
            n_above += (m & (high > prefix)).to(tl.int32)
            cm = hm & capturing_vec
            ci = cm.to(tl.int32)
            n_cand = tl.sum(ci, 0)
            start = tl.atomic_add(state_ptr + 6, n_cand.to(tl.int64), mask=n_cand > 0)
            pos = start + (tl.cumsum(ci, 0) - ci)
            cw = cm & (pos < cap)
            tl.store(cand_key_ptr + pos, key.to(tl.int32, bitcast=True), mask=cw)
            tl.store(cand_chunk_ptr + pos, gchunk.to(tl.int32) + tl.zeros([BLOCK], tl.int32),
                     mask=cw)
            # Most tiles of a late pass match nothing: skip the histogram's ballots there.
            if tl.sum(hm.to(tl.int32), 0) > 0:
                acc += tl.histogram(digit, BINS, mask=hm)
        else:
            acc += tl.histogram(digit, BINS, mask=m)
        if CHECK_BAD:
            nbad += (bad & m).to(tl.int32)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + bins, acc.to(tl.int64), mask=acc > 0)
    if FILTER:
        tl.store(cnt_gt_ptr + gchunk, tl.sum(n_above, 0), mask=capturing)
    if CHECK_BAD:
        total_bad = tl.sum(nbad, 0).to(tl.int64)
        tl.atomic_add(bad_ptr + tl.load(row + 6), total_bad, mask=total_bad > 0)


@triton.jit
def candidate_histogram_kernel(
    cand_key_ptr, state_ptr, hist_ptr, cap,
    SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, HI_MASK: tl.constexpr,
    BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    """A radix pass over the captured candidates instead of θ and g (runs when S_CAPTURE == 2
    and the threshold is not final yet; otherwise every program exits at once)."""
    BINS: tl.constexpr = 1 << DIGIT_BITS
    pid = tl.program_id(0)
    n = tl.minimum(tl.load(state_ptr + 6), cap)
    base = pid.to(tl.int64) * (BLOCK * TILES)
    active = (tl.load(state_ptr + 5) == 2) & (tl.load(state_ptr + 3) == 0)
    n_tiles = tl.minimum(tl.maximum(tl.cdiv(n - base, BLOCK), 0), TILES).to(tl.int32)
    n_tiles = tl.where(active, n_tiles, 0)
    prefix = tl.load(state_ptr + 0).to(tl.uint32)
    acc = tl.zeros([BINS], tl.int32)
    for t in range(0, n_tiles):
        offs = base + t * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        key = tl.load(cand_key_ptr + offs, mask=m, other=0).to(tl.uint32, bitcast=True)
        digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
        acc += tl.histogram(digit, BINS, mask=m & ((key & HI_MASK) == prefix))
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + bins, acc.to(tl.int64), mask=acc > 0)
