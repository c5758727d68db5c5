"""Choosing the radix bucket that holds the k-th largest key (kernel 2 of `docs/design.md#kernels`).

The selection state lives in a small int64 device buffer, so every pass reads the prefix chosen
by the previous one without a host round trip:

    state[S_PREFIX]  key bits chosen so far (in place), the threshold once all digits are chosen
    state[S_MASK]    which key bits are chosen (all of them, unless stopped early)
    state[S_KREM]    how many entries with key prefix == S_PREFIX still have to be taken
    state[S_DONE]    1 once the bucket holds exactly S_KREM entries (AIR top-k's early stop):
                     every entry with that prefix is selected, the later digits do not matter
    state[S_COUNT]   number of entries in the chosen bucket
    state[S_CAPTURE] 0: no candidates; 1: the next full pass captures the entries of the chosen
                     bucket into the candidate buffer (set once the bucket holds <= ``cap``
                     entries, AIR top-k's rule); 2: captured, later passes read the buffer
    state[S_NCAND]   number of captured candidates (the capture pass's atomic counter)

``choose_bucket_kernel`` takes the *summed* histogram of a pass (one program scans all bins), so
with sharded parameters an ``all_reduce`` of the histogram can sit between a pass and this kernel.
"""

import triton
import triton.language as tl

S_PREFIX = 0
S_MASK = 1
S_KREM = 2
S_DONE = 3
S_COUNT = 4
S_CAPTURE = 5
S_NCAND = 6
STATE_SIZE = 8


@triton.jit
def choose_bucket_kernel(hist_ptr, state_ptr, cap, SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr,
                         CAN_CAPTURE: tl.constexpr):
    BINS: tl.constexpr = 1 << DIGIT_BITS
    DIGIT_MASK: tl.constexpr = (BINS - 1) << SHIFT
    b = tl.arange(0, BINS)
    h = tl.load(hist_ptr + b)  # int64 counts of the entries matching the prefix, by digit
    old_prefix = tl.load(state_ptr + 0)
    old_mask = tl.load(state_ptr + 1)
    krem = tl.load(state_ptr + 2)
    done = tl.load(state_ptr + 3)
    old_count = tl.load(state_ptr + 4)
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
    capture = tl.load(state_ptr + 5)
    if CAN_CAPTURE:  # a later full pass exists that can capture the bucket
        start = (capture == 0) & (done == 0) & (new_done == 0) & (count <= cap)
    else:
        start = capture < 0  # False
    tl.store(state_ptr + 5, tl.where(capture == 1, 2, tl.where(start, 1, capture)))
    tl.store(state_ptr + 0, tl.where(keep, old_prefix, new_prefix))
    tl.store(state_ptr + 1, tl.where(keep, old_mask, new_mask))
    tl.store(state_ptr + 2, tl.where(keep, krem, new_krem))
    tl.store(state_ptr + 3, tl.where(keep, done, new_done))
    tl.store(state_ptr + 4, tl.where(keep, old_count, count))
