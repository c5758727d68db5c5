"""Shared @triton.jit helpers for selection: the score of an entry and its radix key.

Every selection pass (histogram, count, write) recomputes the score from θ and g with exactly
these functions, so all passes see bit-identical keys and the score vector is never stored.
The arithmetic mirrors `gallop_kernels.reference.compute_score` bit for bit:

* ``gallop``    |g| / (|θ| + ε)     IEEE division (``div_rn``), ε rounded to float32
* ``gradient``  |g|
* ``magnitude`` 1 / (|θ| + ε)       (torch computes ``reciprocal() * 1.0``: the same IEEE value)
* ``random``    lowbias32 counter hash of (seed, flat index in the group), uint32 arithmetic
* ``precomputed`` a float32 score read from memory (may be negative; -0.0 folds onto +0.0)
"""

import triton
import triton.language as tl

from gallop_kernels.ops.triton.multi_tensor import find_slot

SCORE_GALLOP = 0
SCORE_GRADIENT = 1
SCORE_MAGNITUDE = 2
SCORE_RANDOM = 3
SCORE_PRECOMPUTED = 4

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
    """reference.hash_uniform: uniform float32 in [0, 1) from an int64 flat index (>= 0).

    ``seed_mix`` is ``lowbias32(seed & 0xFFFFFFFF)``, computed once on the host (an int64 scalar).
    """
    high_in = ((gidx >> 32) + seed_mix) & 0xFFFFFFFF
    high = lowbias32(high_in.to(tl.uint32))
    low = (gidx & 0xFFFFFFFF).to(tl.uint32)
    bits = lowbias32(low ^ high)
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24, exact


@triton.jit
def tile_key(theta_ptr, g_ptr, offs, mask, gidx, eps, seed_mix,
             SCORE: tl.constexpr, HAS_G: tl.constexpr, SIGNED: tl.constexpr,
             THETA_T: tl.constexpr, G_T: tl.constexpr):
    """Radix key of the scores of entries ``offs`` (int64) of one tensor, and their NaN/inf flags.

    ``gidx`` is the flat index in the group's concatenation (only the random score reads it).
    ``theta_ptr`` points at the precomputed float32 scores when SCORE == SCORE_PRECOMPUTED.
    bf16 tensors are addressed as uint16 and upcast through their bits (see multi_tensor.py).
    Masked-off lanes get a harmless finite score; callers mask every use.

    Keys: unsigned comparison of keys orders like the scores. Named scores are >= 0, so their
    raw bits already order correctly (31 significant bits, the first digit starts at bit 30).
    Precomputed scores may be negative (SIGNED): flip all bits of negatives, set the sign bit of
    the others, and map -0.0 onto +0.0 (32 significant bits).
    (One function rather than several small ones: every nested call costs the interpreter.)
    """
    if SCORE == 3:  # random
        s = hash_uniform(gidx, seed_mix)
    elif SCORE == 4:  # precomputed (float32)
        s = tl.load(theta_ptr + offs, mask=mask, other=0.0)
    elif SCORE == 1:  # gradient
        if HAS_G:
            if G_T == tl.bfloat16:
                graw = tl.load(g_ptr + offs, mask=mask, other=0)
                g = (graw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            else:
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.abs(g)
        else:
            s = tl.zeros(offs.shape, tl.float32)
    else:
        if THETA_T == tl.bfloat16:
            traw = tl.load(theta_ptr + offs, mask=mask, other=0)
            theta = (traw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        denom = tl.abs(theta) + eps
        if SCORE == 2:  # magnitude
            s = tl.math.div_rn(tl.full(offs.shape, 1.0, tl.float32), denom)
        else:  # gallop
            if HAS_G:
                if G_T == tl.bfloat16:
                    graw = tl.load(g_ptr + offs, mask=mask, other=0)
                    g = (graw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
                else:
                    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                s = tl.math.div_rn(tl.abs(g), denom)
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
# The selection launch table: one int64 row per tensor of a launch (see ops/select.py).
# ----------------------------------------------------------------------------------------------

F_THETA = 0  # data_ptr of θ (or of the precomputed float32 scores)
F_GRAD = 1  # data_ptr of g (0 when the gradient is None)
F_NUMEL = 2  # number of entries of the tensor
F_GOFF = 3  # flat offset of the tensor's first entry in the group's concatenation
F_GCHUNK = 4  # global id of the tensor's first chunk (chunks numbered in group order)
F_START = 5  # id, within this launch, of the tensor's first program (= first chunk)
F_TID = 6  # index of the tensor in the group
F_OUT = 7  # data_ptr of the tensor's output indices (write pass only)
NF = 8


@triton.jit
def chunk_of(table_ptr, pid, n_slots, LOG_SLOTS: tl.constexpr, CHUNK: tl.constexpr):
    """Slot row, local chunk number and element range of program ``pid`` of a selection launch."""
    slot = find_slot(table_ptr, pid, n_slots, 8, 5, LOG_SLOTS)
    row = table_ptr + slot.to(tl.int64) * 8
    chunk = pid - tl.load(row + 5)  # int64: chunk number within the tensor
    numel = tl.load(row + 2)
    base = chunk * CHUNK  # int64 offset of the chunk's first entry
    return row, chunk, numel, base


@triton.jit
def row_pointers(row, THETA_T: tl.constexpr, G_T: tl.constexpr):
    if THETA_T == tl.bfloat16:
        theta_ptr = tl.load(row + 0).to(tl.pointer_type(tl.uint16))
    else:
        theta_ptr = tl.load(row + 0).to(tl.pointer_type(THETA_T))
    if G_T == tl.bfloat16:
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.uint16))
    else:
        g_ptr = tl.load(row + 1).to(tl.pointer_type(G_T))
    return theta_ptr, g_ptr
