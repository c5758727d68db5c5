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
    S_LO, S_HI   the range of key prefixes the next capture pass captures (S_HI = -1: everything
                 from S_LO up), at that pass's granularity (its HI_MASK)
    S_WRITE      0: that pass only counts (the sampled shape's one-digit guess too big to store)
    S_TOTAL      entries of the whole group (the sample's counts are scaled by it)
    S_SKIP       1: the window check decided this level's bucket; its bucket choice keeps it
    S_MISS       1: the window check missed; the level's exact histogram is taken over θ and g
    S_SAMPLE     the sample's stride in tiles (sampled shape)

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
S_LO = tl.constexpr(12)
S_HI = tl.constexpr(13)
S_WRITE = tl.constexpr(14)
S_TOTAL = tl.constexpr(15)
S_SKIP = tl.constexpr(16)
S_MISS = tl.constexpr(17)
S_SAMPLE = tl.constexpr(18)
STATE_SIZE = tl.constexpr(24)

CAPTURE_NONE = tl.constexpr(0)
CAPTURE_EQ_NEXT = tl.constexpr(1)  # the next full pass captures the bucket
CAPTURE_GE_NEXT = tl.constexpr(2)  # the next full pass captures the bucket and all above it
CAPTURED_EQ = tl.constexpr(3)  # the buffer holds the bucket; cnt_gt the counts above it
CAPTURED_GE = tl.constexpr(4)  # the buffer holds every entry that can be selected
CAPTURE_WINDOW = tl.constexpr(5)  # the next full pass captures [S_LO, S_HI], a sampled guess

# The window pass's exact counts (per level, summed over ranks before `window_check_kernel`).
W_IN = tl.constexpr(0)  # entries whose key prefix lies in [S_LO, S_HI]
W_GT = tl.constexpr(1)  # entries whose key prefix lies above S_HI
W_BAD = tl.constexpr(2)  # programs that met a NaN/inf score (0: none)
W_FIELDS = tl.constexpr(4)


@triton.jit
def capture_pending(capture):
    return (capture == CAPTURE_EQ_NEXT) | (capture == CAPTURE_GE_NEXT) | (capture == CAPTURE_WINDOW)


@triton.jit
def captured(capture):
    return (capture == CAPTURED_EQ) | (capture == CAPTURED_GE)


@triton.jit
def next_capture(at_or_above, count, cap):
    """What the next full pass captures once a bucket is chosen: the bucket and everything above
    it when all of that fits the buffer, else the bucket when it fits, else nothing."""
    return tl.where(at_or_above <= cap, CAPTURE_GE_NEXT,
                    tl.where(count <= cap, CAPTURE_EQ_NEXT, CAPTURE_NONE))


@triton.jit
def choose_bucket_kernel(hist_ptr, state_ptr, SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr,
                         CAN_CAPTURE: tl.constexpr, NEXT_DIGIT_MASK: tl.constexpr):
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
    skip = tl.load(state_ptr + S_SKIP) != 0  # the window check committed this level already
    keep = (done != 0) | skip
    # a capture that was pending has happened in this level's pass (unless the window check
    # committed this level and set it pending for the next one)
    now = tl.where(capture == CAPTURE_EQ_NEXT, CAPTURED_EQ,
                   tl.where(capture == CAPTURE_GE_NEXT, CAPTURED_GE, capture))
    now = tl.where(skip, capture, now)
    if CAN_CAPTURE:  # a later full pass exists that can capture
        cap = tl.load(state_ptr + S_CAP)
        at_or_above_bucket = tl.load(state_ptr + S_K) - new_krem + count
        start = (now == CAPTURE_NONE) & (done == 0) & (new_done == 0) & ~skip
        mode = next_capture(at_or_above_bucket, count, cap)
        now = tl.where(start, mode, now)
        # the capture pass's range, at its granularity (the chosen bits and NEXT_DIGIT_MASK)
        tl.store(state_ptr + S_LO, tl.where(start, new_prefix, tl.load(state_ptr + S_LO)))
        tl.store(state_ptr + S_HI, tl.where(
            start, tl.where(mode == CAPTURE_GE_NEXT, -1, new_prefix | NEXT_DIGIT_MASK),
            tl.load(state_ptr + S_HI)))
        tl.store(state_ptr + S_WRITE, tl.where(start, 1, tl.load(state_ptr + S_WRITE)))
    tl.store(state_ptr + S_SKIP, 0)
    tl.store(state_ptr + S_MISS, 0)
    tl.store(state_ptr + S_CAPTURE, now.to(tl.int64))
    tl.store(state_ptr + S_PREFIX, tl.where(keep, old_prefix, new_prefix))
    tl.store(state_ptr + S_MASK, tl.where(keep, old_mask, new_mask))
    tl.store(state_ptr + S_KREM, tl.where(keep, krem, new_krem))
    tl.store(state_ptr + S_DONE, tl.where(keep, done, new_done))
    tl.store(state_ptr + S_COUNT, tl.where(keep, old_count, count))


# ----------------------------------------------------------------------------------------------
# The sampled shape (`docs/design.md#kernels`): the digit of a level is first histogrammed over a
# sample of the tiles; `choose_window_kernel` turns that estimate into a range of prefixes that
# the next full pass captures (or only counts); `window_check_kernel` checks the guess with that
# pass's exact counts. A wrong guess costs the level's exact full-pass histogram (S_MISS).
# ----------------------------------------------------------------------------------------------


@triton.jit
def choose_window_kernel(shist_ptr, state_ptr, SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr,
                         SAMPLED_SLOT: tl.constexpr):
    """From the sample's histogram of this level's digit (entries matching the prefix), scaled
    to the whole group, the range of digits [lo, hi] that the next full pass captures: every
    digit >= lo (GE: hi = all ones) when all of it fits the buffer with margin, else the
    narrowest range holding the krem-th largest with margin, else one digit counted only.
    The margin is 4 sampling standard deviations (none when every tile is sampled: then the
    estimate is exact and so is every choice). Active while nothing is captured or decided."""
    BINS: tl.constexpr = 1 << DIGIT_BITS
    active = (tl.load(state_ptr + S_DONE) == 0) & (tl.load(state_ptr + S_CAPTURE) == CAPTURE_NONE)
    if active:
        b = tl.arange(0, BINS)
        h = tl.load(shist_ptr + b).to(tl.float64)
        sampled = tl.maximum(tl.load(shist_ptr + SAMPLED_SLOT), 1)
        total = tl.load(state_ptr + S_TOTAL)
        scale = total.to(tl.float64) / sampled.to(tl.float64)
        est = h * scale
        aoa = (tl.sum(h, 0) - tl.cumsum(h, 0) + h) * scale  # estimated count at or above d
        above_next = aoa - est  # ... strictly above d
        k = tl.load(state_ptr + S_K)
        krem = tl.load(state_ptr + S_KREM)
        kf = krem.to(tl.float64)
        cap = tl.load(state_ptr + S_CAP).to(tl.float64)
        above = (k - krem).to(tl.float64)  # entries above the prefix (exact)
        # a count c estimated from a 1/scale sample has a standard deviation of ~sqrt(scale c)
        margin = tl.where(sampled >= total, 0.0, 4.0 * tl.sqrt(scale * (kf + 1.0)) + scale)
        d_lo = tl.max(tl.where(aoa >= kf + margin, b, 0), 0)
        d_hi = tl.min(tl.where(above_next < kf - margin, b, BINS - 1), 0)
        d_star = tl.max(tl.where(aoa >= kf, b, 0), 0)
        aoa_lo = tl.sum(tl.where(b == d_lo, aoa, 0.0), 0)
        range_est = aoa_lo - tl.sum(tl.where(b == d_hi, above_next, 0.0), 0)
        ge = above + aoa_lo + margin <= cap
        fits = range_est + margin <= cap
        one = d_lo == d_hi
        lo_d = tl.where(ge | fits | one, d_lo, d_star)
        hi_d = tl.where(fits, d_hi, lo_d)
        prefix = tl.load(state_ptr + S_PREFIX)
        tl.store(state_ptr + S_LO, prefix | (lo_d.to(tl.int64) << SHIFT))
        tl.store(state_ptr + S_HI, tl.where(ge, -1, prefix | (hi_d.to(tl.int64) << SHIFT)))
        tl.store(state_ptr + S_WRITE, (ge | fits).to(tl.int64))
        tl.store(state_ptr + S_CAPTURE, CAPTURE_WINDOW.value + tl.zeros([], tl.int64))


@triton.jit
def window_check_kernel(wcount_ptr, state_ptr, SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr,
                        CAN_CAPTURE: tl.constexpr, NEXT_DIGIT_MASK: tl.constexpr):
    """After the window pass: from its exact counts (summed over ranks), keep the capture when
    it holds the k-th largest and fit (CAPTURED_GE / CAPTURED_EQ; the level's exact histogram
    then comes from the buffer), or commit the level's digit when one digit was counted and
    holds it (S_SKIP: the bucket choice of this level is made), or declare a miss (S_MISS: the
    level's exact full-pass histogram runs)."""
    DIGIT_MASK: tl.constexpr = ((1 << DIGIT_BITS) - 1) << SHIFT
    if tl.load(state_ptr + S_CAPTURE) == CAPTURE_WINDOW:
        n_in = tl.load(wcount_ptr + W_IN)
        n_gt = tl.load(wcount_ptr + W_GT)
        k = tl.load(state_ptr + S_K)
        krem = tl.load(state_ptr + S_KREM)
        cap = tl.load(state_ptr + S_CAP)
        lo = tl.load(state_ptr + S_LO)
        hi = tl.load(state_ptr + S_HI)
        ge = hi == -1
        holds = tl.where(ge, n_in >= k, (n_gt < k) & (k <= n_gt + n_in))
        kept = holds & (n_in <= cap) & (tl.load(state_ptr + S_WRITE) != 0)
        commit = holds & ~kept & (lo == hi)  # one digit, counted: its bucket is decided
        new_krem = k - n_gt
        new_done = (n_in == new_krem) & commit
        capture = tl.where(kept, tl.where(ge, CAPTURED_GE, CAPTURED_EQ), CAPTURE_NONE)
        if CAN_CAPTURE:  # as choose_bucket_kernel decides after choosing a bucket
            nxt = next_capture(k - new_krem + n_in, n_in, cap)
            start = commit & ~new_done
            capture = tl.where(start, nxt, capture)
            tl.store(state_ptr + S_HI, tl.where(
                start, tl.where(nxt == CAPTURE_GE_NEXT, -1, lo | NEXT_DIGIT_MASK), hi))
            tl.store(state_ptr + S_WRITE, tl.where(start, 1, tl.load(state_ptr + S_WRITE)))
        tl.store(state_ptr + S_CAPTURE, capture.to(tl.int64))
        tl.store(state_ptr + S_KREM, tl.where(kept & ~ge | commit, new_krem, krem))
        tl.store(state_ptr + S_NCAND, tl.where(kept, tl.load(state_ptr + S_NCAND), 0))
        tl.store(state_ptr + S_PREFIX, tl.where(commit, lo, tl.load(state_ptr + S_PREFIX)))
        tl.store(state_ptr + S_MASK, tl.where(
            commit, tl.load(state_ptr + S_MASK) | DIGIT_MASK, tl.load(state_ptr + S_MASK)))
        tl.store(state_ptr + S_COUNT, tl.where(commit, n_in, tl.load(state_ptr + S_COUNT)))
        tl.store(state_ptr + S_DONE, new_done.to(tl.int64))
        tl.store(state_ptr + S_SKIP, commit.to(tl.int64))
        tl.store(state_ptr + S_MISS, (~kept & ~commit).to(tl.int64))
