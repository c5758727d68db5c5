"""Ordered compaction (kernel 3 of `docs/design.md#kernels`).

Once the threshold key T (with its bit mask M) and the number ``krem`` of ties to take are known,
selected = every entry with (key & M) > T plus the first ``krem`` entries with (key & M) == T in
global flat order (earlier tensors first). Two passes over the chunks:

* ``count_kernel``: per chunk, the number of entries above T and equal to T (no atomics);
* the launcher scans these small per-chunk vectors (torch.cumsum) into each chunk's number of
  ties taken and output position;
* ``write_kernel``: each chunk writes its selected local indices, in order, at its position in
  its tensor's output (an in-register exclusive scan per tile). Chunks taking nothing skip reading.
"""

import triton
import triton.language as tl

from gallop_kernels.ops.triton.score import chunk_of, row_pointers, tile_key


@triton.jit
def count_kernel(
    table_ptr, n_slots, state_ptr, gt_ptr, eq_ptr, eps, seed_mix,
    LOG_SLOTS: tl.constexpr, THETA_T: tl.constexpr, G_T: tl.constexpr,
    SCORE: tl.constexpr, HAS_G: tl.constexpr, SIGNED: tl.constexpr,
    BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    row, chunk, numel, base = chunk_of(table_ptr, pid, n_slots, LOG_SLOTS, BLOCK * TILES)
    theta_ptr, g_ptr = row_pointers(row, THETA_T, G_T)
    goff = tl.load(row + 3)
    thr = tl.load(state_ptr + 0).to(tl.uint32)
    kmask = tl.load(state_ptr + 1).to(tl.uint32)
    n_tiles = tl.minimum(tl.cdiv(numel - base, BLOCK), TILES).to(tl.int32)
    # With captured candidates, candidate_count_kernel counts instead (cnt_gt already holds the
    # counts above the captured bucket).
    not_captured = tl.load(state_ptr + 5) != 2
    n_tiles = tl.where(not_captured, n_tiles, 0)
    gt = tl.zeros([BLOCK], tl.int32)
    eq = tl.zeros([BLOCK], tl.int32)
    for t in range(0, n_tiles):
        offs = base + t * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        key, bad = tile_key(theta_ptr, g_ptr, offs, m, goff + offs, eps, seed_mix,
                            SCORE, HAS_G, SIGNED, THETA_T, G_T)
        km = key & kmask
        gt += (m & (km > thr)).to(tl.int32)
        eq += (m & (km == thr)).to(tl.int32)
    gchunk = tl.load(row + 4) + chunk
    tl.store(gt_ptr + gchunk, tl.sum(gt, 0), mask=not_captured)
    tl.store(eq_ptr + gchunk, tl.sum(eq, 0), mask=not_captured)


@triton.jit
def candidate_count_kernel(
    cand_key_ptr, cand_chunk_ptr, state_ptr, gt_ptr, eq_ptr, cap,
    BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    """Adds the captured candidates above / equal to the threshold to their chunk's counts
    (``eq`` starts at zero, ``gt`` at the counts above the captured bucket). Runs only when
    S_CAPTURE == 2."""
    pid = tl.program_id(0)
    n = tl.minimum(tl.load(state_ptr + 6), cap)
    base = pid.to(tl.int64) * (BLOCK * TILES)
    active = tl.load(state_ptr + 5) == 2
    n_tiles = tl.minimum(tl.maximum(tl.cdiv(n - base, BLOCK), 0), TILES).to(tl.int32)
    n_tiles = tl.where(active, n_tiles, 0)
    thr = tl.load(state_ptr + 0).to(tl.uint32)
    kmask = tl.load(state_ptr + 1).to(tl.uint32)
    for t in range(0, n_tiles):
        offs = base + t * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        key = tl.load(cand_key_ptr + offs, mask=m, other=0).to(tl.uint32, bitcast=True)
        chunk = tl.load(cand_chunk_ptr + offs, mask=m, other=0)
        km = key & kmask
        ones = tl.full([BLOCK], 1, tl.int32)
        tl.atomic_add(gt_ptr + chunk, ones, mask=m & (km > thr))
        tl.atomic_add(eq_ptr + chunk, ones, mask=m & (km == thr))


@triton.jit
def write_kernel(
    table_ptr, n_slots, state_ptr, take_ptr, take_excl_ptr, ties_ptr, eps, seed_mix,
    LOG_SLOTS: tl.constexpr, THETA_T: tl.constexpr, G_T: tl.constexpr, IDX_T: tl.constexpr,
    SCORE: tl.constexpr, HAS_G: tl.constexpr, SIGNED: tl.constexpr,
    BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    row, chunk, numel, base = chunk_of(table_ptr, pid, n_slots, LOG_SLOTS, BLOCK * TILES)
    theta_ptr, g_ptr = row_pointers(row, THETA_T, G_T)
    out_ptr = tl.load(row + 7).to(tl.pointer_type(IDX_T))
    goff = tl.load(row + 3)
    first = tl.load(row + 4)
    gchunk = first + chunk
    thr = tl.load(state_ptr + 0).to(tl.uint32)
    kmask = tl.load(state_ptr + 1).to(tl.uint32)
    ntake = tl.load(take_ptr + gchunk)
    ties = tl.load(ties_ptr + gchunk)
    # Position of this chunk's first selected entry within its tensor's output.
    run = tl.load(take_excl_ptr + gchunk) - tl.load(take_excl_ptr + first)
    tie_run = tl.zeros([], tl.int64)
    n_tiles = tl.minimum(tl.cdiv(numel - base, BLOCK), TILES).to(tl.int32)
    n_tiles = tl.where(ntake == 0, 0, n_tiles)
    for t in range(0, n_tiles):
        offs = base + t * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        key, bad = tile_key(theta_ptr, g_ptr, offs, m, goff + offs, eps, seed_mix,
                            SCORE, HAS_G, SIGNED, THETA_T, G_T)
        km = key & kmask
        is_gt = m & (km > thr)
        is_eq = m & (km == thr)
        eqi = is_eq.to(tl.int32)
        tie_rank = tie_run + (tl.cumsum(eqi, 0) - eqi)
        take = is_gt | (is_eq & (tie_rank < ties))
        ti = take.to(tl.int32)
        pos = run + (tl.cumsum(ti, 0) - ti)
        tl.store(out_ptr + pos, offs.to(IDX_T), mask=take)
        run += tl.sum(ti, 0)
        tie_run += tl.sum(eqi, 0)
