"""Fused score + radix histogram pass (DESIGN §4, kernel 1 and the passes of kernel 2).

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
    LOG_SLOTS: tl.constexpr, THETA_T: tl.constexpr, G_T: tl.constexpr,
    SCORE: tl.constexpr, HAS_G: tl.constexpr, SIGNED: tl.constexpr,
    FILTER: tl.constexpr, CHECK_BAD: tl.constexpr,
    SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, HI_MASK: tl.constexpr,
    BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    BINS: tl.constexpr = 1 << DIGIT_BITS
    pid = tl.program_id(0)
    row, chunk, numel, base = chunk_of(table_ptr, pid, n_slots, LOG_SLOTS, BLOCK * TILES)
    theta_ptr, g_ptr = row_pointers(row, THETA_T, G_T)
    goff = tl.load(row + 3)
    n_tiles = tl.minimum(tl.cdiv(numel - base, BLOCK), TILES).to(tl.int32)
    if FILTER:
        # The threshold is already exact (early stop): nothing left to refine.
        n_tiles = tl.where(tl.load(state_ptr + 3) != 0, 0, n_tiles)
        prefix = tl.load(state_ptr + 0).to(tl.uint32)
    acc = tl.zeros([BINS], tl.int32)
    nbad = tl.zeros([BLOCK], tl.int32)
    for t in range(0, n_tiles):
        offs = base + t * BLOCK + tl.arange(0, BLOCK)  # int64
        m = offs < numel
        key, bad = tile_key(theta_ptr, g_ptr, offs, m, goff + offs, eps, seed_mix,
                            SCORE, HAS_G, SIGNED, THETA_T, G_T)
        digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
        if FILTER:
            hm = m & ((key & HI_MASK) == prefix)
        else:
            hm = m
        acc += tl.histogram(digit, BINS, mask=hm)
        if CHECK_BAD:
            nbad += (bad & m).to(tl.int32)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + bins, acc.to(tl.int64), mask=acc > 0)
    if CHECK_BAD:
        total_bad = tl.sum(nbad, 0).to(tl.int64)
        tl.atomic_add(bad_ptr + tl.load(row + 6), total_bad, mask=total_bad > 0)
