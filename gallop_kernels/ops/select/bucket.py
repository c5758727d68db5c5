"""Choosing the radix bucket that holds the k-th largest key (kernel 2 of `docs/design.md#kernels`).

The selection state lives in a small int64 device buffer (fields named below), so every pass
reads the prefix chosen by the previous one without a host round trip:

    S_PREFIX     key bits chosen so far; the threshold once all digits are chosen
    S_MASK       which key bits are chosen (all of them, unless stopped early)
    S_KREM       how many entries with key prefix == S_PREFIX still have to be taken
    S_DONE       1 once the bucket holds exactly S_KREM entries (AIR top-k's early stop): every
                 entry with that prefix is selected, the later digits do not matter
    S_COUNT      number of entries in the chosen bucket
    S_CAPTURE    the candidate buffer's mode, CAPTURE_* below
    S_NCAND      number of captured candidates (the capture pass's atomic counter)
    S_K          k
    S_CAP        the capture threshold (the same on every rank): capture when it holds
    S_CAP_LOCAL  this buffer's capacity (no write beyond it, whatever the data)
    S_SEED_MIX   lowbias32(seed) for the random score
    S_TILES      number of tiles of the group (per-tile arrays are this long)

Candidates (AIR top-k's rule, adapted): once the entries at or above the chosen bucket number at
most S_CAP (typical at small densities: the 11-bit first digit leaves a bucket of ~0.1% of N),
the next full pass captures all of them (key, offset in the tile): later radix passes, the
compaction counts and the write then read only the buffer, so a typical large group reads θ and
g twice. If only the bucket itself fits, the pass captures the bucket and counts, per tile, the
entries above it; the write then reads θ and g a third time.

``choose_bucket_kernel`` takes the *summed* histogram of a pass (one program scans all bins), so
with sharded parameters an ``all_reduce`` of the histogram sits between a pass and this kernel
and every rank takes the same decisions.
"""

import triton
import triton.language as tl

S_PREFIX = tl.constexpr(0)
S_MASK = tl.constexpr(1)
S_KREM = tl.constexpr(2)
S_DONE = tl.constexpr(3)
S_COUNT = tl.constexpr(4)
S_CAPTURE = tl.constexpr(5)
S_NCAND = tl.constexpr(6)
S_K = tl.constexpr(7)
S_CAP = tl.constexpr(8)
S_CAP_LOCAL = tl.constexpr(9)
S_SEED_MIX = tl.constexpr(10)
S_TILES = tl.constexpr(11)
STATE_SIZE = tl.constexpr(16)

CAPTURE_NONE = tl.constexpr(0)
CAPTURE_EQ_NEXT = tl.constexpr(1)  # the next full pass captures the bucket
CAPTURE_GE_NEXT = tl.constexpr(2)  # the next full pass captures the bucket and all above it
CAPTURED_EQ = tl.constexpr(3)  # the buffer holds the bucket; cnt_gt the counts above it
CAPTURED_GE = tl.constexpr(4)  # the buffer holds every entry that can be selected


@triton.jit
def capture_pending(capture):
    return (capture == CAPTURE_EQ_NEXT) | (capture == CAPTURE_GE_NEXT)


@triton.jit
def captured(capture):
    return (capture == CAPTURED_EQ) | (capture == CAPTURED_GE)


@triton.jit
def choose_bucket_kernel(hist_ptr, state_ptr, SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr,
                         CAN_CAPTURE: tl.constexpr):
    BINS: tl.constexpr = 1 << DIGIT_BITS
    DIGIT_MASK: tl.constexpr = (BINS - 1) << SHIFT
    b = tl.arange(0, BINS)
    h = tl.load(hist_ptr + b)  # int64 counts of the entries matching the prefix, by digit
    old_prefix = tl.load(state_ptr + S_PREFIX)
    old_mask = tl.load(state_ptr + S_MASK)
    krem = tl.load(state_ptr + S_KREM)
    done = tl.load(state_ptr + S_DONE)
    old_count = tl.load(state_ptr + S_COUNT)
    capture = tl.load(state_ptr + S_CAPTURE)
    # at_or_above[d] = number of matching entries whose digit is >= d
    at_or_above = tl.sum(h, 0) - tl.cumsum(h, 0) + h
    # The bucket holding the krem-th largest: the highest digit with at_or_above >= krem.
    bstar = tl.max(tl.where(at_or_above >= krem, b, 0), 0)
    count = tl.sum(tl.where(b == bstar, h, 0), 0)
    above = tl.sum(tl.where(b > bstar, h, 0), 0)
    new_krem = krem - above
    new_prefix = old_prefix | (bstar.to(tl.int64) << SHIFT)
    new_mask = old_mask | tl.full([], DIGIT_MASK, tl.int64)
    new_done = (new_krem == count).to(tl.int64)
    keep = done != 0
    # a capture that was pending has happened in this level's pass
    now = tl.where(capture == CAPTURE_EQ_NEXT, CAPTURED_EQ,
                   tl.where(capture == CAPTURE_GE_NEXT, CAPTURED_GE, capture))
    if CAN_CAPTURE:  # a later full pass exists that can capture
        cap = tl.load(state_ptr + S_CAP)
        at_or_above_bucket = tl.load(state_ptr + S_K) - new_krem + count
        start = (now == CAPTURE_NONE) & (done == 0) & (new_done == 0)
        mode = tl.where(at_or_above_bucket <= cap, CAPTURE_GE_NEXT,
                        tl.where(count <= cap, CAPTURE_EQ_NEXT, CAPTURE_NONE))
        now = tl.where(start, mode, now)
    tl.store(state_ptr + S_CAPTURE, now.to(tl.int64))
    tl.store(state_ptr + S_PREFIX, tl.where(keep, old_prefix, new_prefix))
    tl.store(state_ptr + S_MASK, tl.where(keep, old_mask, new_mask))
    tl.store(state_ptr + S_KREM, tl.where(keep, krem, new_krem))
    tl.store(state_ptr + S_DONE, tl.where(keep, done, new_done))
    tl.store(state_ptr + S_COUNT, tl.where(keep, old_count, count))
