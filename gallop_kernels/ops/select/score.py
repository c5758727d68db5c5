"""Shared @triton.jit helpers for selection: the score of an entry and its radix key.

Every selection pass (histogram, count, write) recomputes the score from θ and g with exactly
these functions, so all passes see bit-identical keys and the score vector is never stored.
The arithmetic mirrors `naive.compute_score` bit for bit:

* ``gallop``    |g| / (|θ| + ε)     IEEE division (``div_rn``), ε rounded to float32
* ``gradient``  |g|
* ``magnitude`` 1 / (|θ| + ε)       (torch computes ``reciprocal() * 1.0``: the same IEEE value)
* ``random``    lowbias32 counter hash of (seed, flat index in the group), uint32 arithmetic
* ``precomputed`` a float32 score read from memory (may be negative; -0.0 folds onto +0.0)
"""

import triton
import triton.language as tl

from gallop_kernels.ops._triton.tables import (
    HEAD_LOG_SLOTS,
    HEAD_SLOTS,
    HEAD_WORK,
    as_pointer,
    find_slot,
)

SCORE_GALLOP = tl.constexpr(0)
SCORE_GRADIENT = tl.constexpr(1)
SCORE_MAGNITUDE = tl.constexpr(2)
SCORE_RANDOM = tl.constexpr(3)
SCORE_PRECOMPUTED = tl.constexpr(4)

SCORE_CODES = {
    "gallop": SCORE_GALLOP,
    "gradient": SCORE_GRADIENT,
    "magnitude": SCORE_MAGNITUDE,
    "random": SCORE_RANDOM,
    "precomputed": SCORE_PRECOMPUTED,
}


@triton.jit
def lowbias32(x):
    """The lowbias32 integer mixer (C. Wellons) on uint32 values; wraps mod 2^32."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def hash_uniform(gidx, seed_mix):
    """naive.hash_uniform: uniform float32 in [0, 1) from an int64 flat index (>= 0).

    ``seed_mix`` is ``lowbias32(seed & 0xFFFFFFFF)``, computed once on the host (an int64 scalar).
    """
    high_in = ((gidx >> 32) + seed_mix) & 0xFFFFFFFF
    high = lowbias32(high_in.to(tl.uint32))
    low = (gidx & 0xFFFFFFFF).to(tl.uint32)
    bits = lowbias32(low ^ high)
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24, exact


@triton.jit
def abs_f32(ptr, offs, mask, lim, DT: tl.constexpr, PAIRS: tl.constexpr):
    """|x| in float32 for the entries ``offs`` (0, 1, ... BLOCK-1) of a tensor of dtype DT.

    bf16 (addressed as uint16): the raw bits shifted into the high half, the sign cleared; with
    PAIRS (the tile is 4-byte aligned and whole words), two entries per 32-bit load: one AND
    clears both signs, then a shift (even entries) and an AND (odd entries) widen them, 1.5
    instructions per entry instead of 2.5. (A bitcast to bf16 and an upcast is no cheaper
    compiled, and the interpreter flushes bf16 subnormals in it.)"""
    if DT == tl.bfloat16:
        if PAIRS:
            HALF: tl.constexpr = offs.shape[0] // 2
            wptr = tl.multiple_of(ptr.to(tl.pointer_type(tl.uint32)), 16)
            words = tl.arange(0, HALF)
            w = tl.load(wptr + words, mask=words < lim // 2, other=0)
            w = w & 0x7FFF7FFF
            lo = (w << 16).to(tl.float32, bitcast=True)
            hi = (w & 0xFFFF0000).to(tl.float32, bitcast=True)
            return tl.reshape(tl.join(lo, hi), offs.shape)
        else:
            raw = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint32)
            return ((raw << 16) & 0x7FFF0000).to(tl.float32, bitcast=True)
    else:
        return tl.abs(tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def tile_key(theta_ptr, g_ptr, offs, mask, gidx, eps, seed_mix,
             SCORE: tl.constexpr, HAS_G: tl.constexpr, SIGNED: tl.constexpr,
             THETA_T: tl.constexpr, G_T: tl.constexpr, FLOOR: tl.constexpr = False, floor=0.0,
             PAIRS: tl.constexpr = False, lim=None):
    """Radix key of the scores of entries ``offs`` of one tensor, and their NaN/inf flags.

    ``gidx`` is the flat index in the group's concatenation (only the random score reads it).
    ``theta_ptr`` points at the precomputed float32 scores when SCORE == SCORE_PRECOMPUTED.
    bf16 tensors are addressed as uint16 (see _triton/tables.py) and widened by `abs_f32`: two
    entries per 32-bit load when PAIRS (an aligned launch; ``lim``: the tile's entries).
    Masked-off lanes get a harmless finite score; callers mask every use.

    Keys: unsigned comparison of keys orders like the scores. Named scores are >= 0, so their
    raw bits already order correctly (31 significant bits, the first digit starts at bit 30).
    Precomputed scores may be negative (SIGNED): flip all bits of negatives, set the sign bit of
    the others, and map -0.0 onto +0.0 (32 significant bits).
    FLOOR: the gallop and magnitude scores read max(|θ|, floor) (`docs/design.md#score-floor`),
    as a ``tl.where`` that keeps a NaN θ NaN; without it this compiles as it always did.
    (One function rather than several small ones: every nested call costs the interpreter.)
    """
    if SCORE == SCORE_RANDOM:
        s = hash_uniform(gidx, seed_mix)
    elif SCORE == SCORE_PRECOMPUTED:  # float32
        s = tl.load(theta_ptr + offs, mask=mask, other=0.0)
    elif SCORE == SCORE_GRADIENT:
        if HAS_G:
            s = abs_f32(g_ptr, offs, mask, lim, G_T, PAIRS)
        else:
            s = tl.zeros(offs.shape, tl.float32)
    else:
        mag = abs_f32(theta_ptr, offs, mask, lim, THETA_T, PAIRS)
        if FLOOR:
            mag = tl.where(mag < floor, floor, mag)
        denom = mag + eps
        if SCORE == SCORE_MAGNITUDE:
            s = tl.math.div_rn(tl.full(offs.shape, 1.0, tl.float32), denom)
        else:  # gallop
            if HAS_G:
                s = tl.math.div_rn(abs_f32(g_ptr, offs, mask, lim, G_T, PAIRS), denom)
            else:
                s = tl.math.div_rn(tl.zeros(offs.shape, tl.float32), denom)
    bits = s.to(tl.uint32, bitcast=True)
    bad = (bits & 0x7F800000) == 0x7F800000
    if SIGNED:
        neg = (bits >> 31) != 0
        key = tl.where(neg, ~bits, bits | 0x80000000)
        key = tl.where(s == 0.0, tl.full(s.shape, 0x80000000, tl.uint32), key)
    else:
        key = bits
    return key, bad


# ----------------------------------------------------------------------------------------------
# The selection launch table (see launcher.py): a header row (tables.HEAD_*; HEAD_WORK is
# the number of tiles of the launch), then one int64 row per tensor, named fields below. Tiles
# are BLOCK entries of one tensor; "global" tile ids number the tiles of the whole group in
# order (per-tile counts and candidate segments are indexed by them).
# ----------------------------------------------------------------------------------------------

ROW_THETA = tl.constexpr(0)  # data_ptr of θ (or of the precomputed float32 scores)
ROW_GRAD = tl.constexpr(1)  # data_ptr of g (0 when the gradient is None)
ROW_NUMEL = tl.constexpr(2)  # number of entries of the tensor
ROW_GOFF = tl.constexpr(3)  # global flat offset of the tensor's first entry (random score)
ROW_GTILE = tl.constexpr(4)  # global id of the tensor's first tile
ROW_START = tl.constexpr(5)  # id, within this launch, of the tensor's first tile
ROW_OUT = tl.constexpr(6)  # data_ptr of the tensor's output indices (write passes only)
ROW_TID = tl.constexpr(7)  # index of the tensor in the group
ROW_FLOOR = tl.constexpr(8)  # float32 bits of the tensor's magnitude floor (FLOOR launches only)
ROW_FIELDS = tl.constexpr(10)  # (even: every row starts 16-byte aligned; field 9 is padding)


@triton.jit
def row_floor(row, FLOOR: tl.constexpr):
    """The tensor's magnitude floor (float32) on a FLOOR launch; 0 (unused) otherwise."""
    if FLOOR:
        return tl.load(row + ROW_FLOOR).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        return 0.0


@triton.jit
def program_tiles(table_ptr):
    """This program's contiguous range [t0, t1) of the launch's tiles: a persistent grid of a
    few programs per SM walks all tiles, so a pass that has nothing to do costs one state read
    per program, not one program per tile."""
    work = tl.load(table_ptr + HEAD_WORK)
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    return pid * work // nprog, (pid + 1) * work // nprog


@triton.jit
def first_slot(table_ptr, t):
    """The slot (row number) holding launch tile ``t``."""
    return find_slot(table_ptr + ROW_FIELDS, t, tl.load(table_ptr + HEAD_SLOTS),
                     tl.load(table_ptr + HEAD_LOG_SLOTS), ROW_FIELDS, ROW_START)


@triton.jit
def slot_fields(table_ptr, slot):
    """Row pointer of slot ``slot``, its first launch tile and the next slot's first tile (the
    launch's end for the last slot). (Only these are carried through the tile loop: fields
    reloaded per tile are L1 hits, and carrying them costs more instructions than it saves.)"""
    row = table_ptr + ROW_FIELDS + slot.to(tl.int64) * ROW_FIELDS
    start = tl.load(row + ROW_START)
    has_next = slot + 1 < tl.load(table_ptr + HEAD_SLOTS)
    nxt = tl.load(row + ROW_FIELDS + ROW_START, mask=has_next, other=0)
    nxt = tl.where(has_next, nxt, tl.load(table_ptr + HEAD_WORK))
    return row, start, nxt


@triton.jit
def tile_of(row, local, THETA_T: tl.constexpr, G_T: tl.constexpr, ALIGNED: tl.constexpr,
            BLOCK: tl.constexpr):
    """θ and g pointers at the start of the tensor's tile ``local``, in-tile offsets (int32),
    their mask, the tile's first flat index in the tensor (int64), the tile's global flat index
    base (random score) and its global tile id.

    ALIGNED (the launcher checked that every θ and g of the launch is 16-byte aligned and has a
    multiple of 16 entries) tells the compiler so, which turns the loads into 16-byte vectors."""
    numel = tl.load(row + ROW_NUMEL)
    theta_ptr = as_pointer(tl.load(row + ROW_THETA), THETA_T, ALIGNED)
    g_ptr = as_pointer(tl.load(row + ROW_GRAD), G_T, ALIGNED)
    if ALIGNED:
        numel = tl.multiple_of(numel, 16)
    base = local * BLOCK
    lim = tl.minimum(numel - base, BLOCK).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    m = offs < lim
    theta_ptr += base
    g_ptr += base
    return theta_ptr, g_ptr, offs, m, lim, base, tl.load(row + ROW_GOFF) + base, tl.load(row + ROW_GTILE)
