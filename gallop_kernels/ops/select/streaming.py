"""Exact top-k selection in pure torch that holds one chunk of scores at a time.

`naive.select` sorts the whole group's scores: simple, but it needs ~16 bytes per entry of
the group at once. This radix select recomputes scores chunk by chunk from θ and g, so its extra
memory is O(chunk + k) and the gradients may live elsewhere (pinned host memory during
calibration): each chunk is copied to the parameter's device when it is scored. It selects exactly
the same index set as `naive.select`: the k largest float32 scores, ties to the lower flat index
of the group's concatenation (see ``docs/design.md#selection-semantics``).

Keys: a float32 score's bits as an int32, with the magnitude bits of negative scores flipped, order
exactly like the scores (scores >= 0, the named ones, are their own keys). The k-th largest key is
found digit by digit, most significant first:

1. pass A reads θ and g: a histogram of every key's top digit (up to 16 bits, 64Ki bins; fewer
   for small groups, whose fixed costs would otherwise show) and the NaN/inf check;
2. pass B reads θ and g again and keeps the (position, key) of every entry at or above the bucket
   holding the k-th largest key; the rest of the threshold is then found among the kept keys
   alone (``torch.kthvalue`` in one process; across ranks, digit by digit, 8 bits a round, from
   summed 256-bin histograms), and the output is taken from them: two reads in all;
3. only when that bucket holds more than ``max(chunk, min(k, MAX_CANDIDATES))`` entries (many
   exact ties) is the next digit histogrammed by another read (16 bits) before keeping, and when
   the exact threshold itself has too many ties the keeping read keeps ties only up to the number
   still needed.

Sharded groups (``layout``, see ``ops/collective.py``): every rank runs the same reads over its
shard and the same collectives in the same order; the histograms are summed over the ranks
before each bucket choice and the NaN/inf counts before raising, and the ties are handed out per
tensor and per rank in global flat-index order, so the union of the ranks' selections is the
one-process selection.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch

from gallop_kernels.ops.collective import ShardLayout
from gallop_kernels.ops.select.naive import compute_score
from gallop_kernels.rules import Score

DEFAULT_CHUNK = 1 << 24
"""Entries per chunk on a GPU or when streaming gradients from the host: few launches and copies."""
CPU_CHUNK = 1 << 18
"""Entries per chunk on a CPU: a chunk's temporaries stay in the caches (measured fastest, see
``benchmarks/torch_select.py``)."""
KEEP_KEYS = 1 << 24
"""A group of at most this many local entries keeps its keys between reads (64 MiB): scored once."""
SMALL_GROUP = 1 << 16
"""A one-process group of at most this many entries skips the radix passes: one read keeps every
key and ``torch.kthvalue`` finds the threshold (below ~1e5 entries the passes' fixed costs, not
the bytes, decide; ``benchmarks/torch_select.py``)."""
MAX_CANDIDATES = 1 << 24
"""At most this many (and at least ``chunk``, at most k) entries of the threshold's bucket are
kept without another read (12 bytes each)."""
INT32_MAX = (1 << 31) - 1
FINITE_KEYS = {False: (0, 0x7F7FFFFF), True: (-0x7F800000, 0x7F7FFFFF)}
"""The keys of finite scores (non-negative scores; signed scores): anything else is NaN or ±inf."""


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map float32 scores to int32 keys whose signed order is exactly the scores' order.

    Non-negative scores keep their bits; negative ones flip their magnitude bits, so that a more
    negative score gets a smaller key. (-0.0 and +0.0 get different keys: fold them first, as
    `naive.compute_score` does.)
    """
    bits = scores.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & INT32_MAX)


class _Ranks:
    """The collectives of one selection: those of ``layout``, or none for one process."""

    def __init__(self, layout: ShardLayout | None) -> None:
        self.collective = None if layout is None else layout.collective
        self.world_size = 1 if layout is None else int(layout.collective.world_size)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.collective is not None:
            self.collective.all_reduce_sum_(tensor)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.collective is None:
            return tensor.unsqueeze(0)
        out = self.collective.all_gather(tensor)
        return out.to(tensor.device).reshape(self.world_size, *tensor.shape)


class _Segment(NamedTuple):
    """A run of keys in the group's packed order: tensor ``t``'s entries ``start .. start+n``,
    at position ``at`` of the packed order (the concatenation of every chunk)."""

    t: int
    start: int
    n: int
    at: int


class _Group:
    """One group's tensors as a stream of packed chunks of keys, in global offset order.

    A chunk holds up to ``chunk`` keys: a slice of a large tensor, or several small tensors
    packed together, so that a group of many small tensors costs few torch calls per read. A
    group of at most ``keep_keys`` local entries keeps its keys between reads: its scores are
    computed once.
    """

    def __init__(self, params, grads, score, score_eps, seed, names, chunk, offsets,
                 total: int, total_local: int, keep_keys: int, floors=None) -> None:
        self.params, self.grads = params, grads
        self.floors = list(floors) if floors is not None else [None] * len(offsets)
        self.floored = any(f is not None for f in self.floors)
        self.score, self.score_eps, self.seed = score, score_eps, seed
        self.names, self.chunk, self.offsets = names, chunk, offsets
        # Named scores are >= 0, so their bits are their keys (31 bits); a callable's may be
        # negative (32 bits).
        self.signed = callable(score)
        key_bits = 32 if self.signed else 31
        # Top digit: keys >> shift (+ bias for signed keys). 16 bits for large groups (a narrow
        # bucket, few candidates); fewer for small ones (a histogram smaller than the group).
        self.top_bits = max(8, min(16, total.bit_length() - 4))
        self.shift = key_bits - self.top_bits
        self.bias = 1 << (self.top_bits - 1) if self.signed else 0
        natural = list(range(len(offsets)))
        self.order = sorted(natural, key=lambda i: offsets[i])
        self.natural = self.order == natural
        self.segments: list[_Segment] = []  # filled by the first read
        self._cache: list[tuple[list[_Segment], torch.Tensor]] | None = None
        self._cacheable = total_local <= keep_keys

    def _tensors(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        if self.natural:  # plain iteration: `params` may be a lazy sequence (4-bit bases)
            yield from ((t, p, g) for t, (p, g) in enumerate(zip(self.params, self.grads)))
        else:
            yield from ((t, self.params[t], self.grads[t]) for t in self.order)

    def _pieces(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(tensor position, start within the tensor, int32 keys) of every slice of every tensor."""
        for t, p, g in self._tensors():
            n = p.numel()
            if n == 0:
                continue
            whole = callable(self.score)  # a callable sees whole tensors
            step = n if whole else self.chunk
            flat_p = p.detach().reshape(-1)
            flat_g = None if g is None else g.detach().reshape(-1)
            for start in range(0, n, step):
                stop = min(n, start + step)
                if whole:
                    piece_p, piece_g = p.detach(), (None if g is None else g.detach().to(p.device))
                else:
                    piece_p = flat_p[start:stop]
                    piece_g = (
                        None if flat_g is None
                        else flat_g[start:stop].to(p.device, non_blocking=True)
                    )
                s = compute_score(
                    piece_p, piece_g, self.score, self.score_eps, self.seed,
                    self.offsets[t] + start, self.floors[t],
                )
                yield t, start, order_keys(s) if self.signed else s.view(torch.int32)

    def chunks(self) -> Iterator[tuple[list[_Segment], torch.Tensor]]:
        """Yield (segments, int32 keys) of every packed chunk, in offset order."""
        if self._cache is not None:
            yield from self._cache
            return
        first = not self.segments
        cache = [] if self._cacheable else None
        segments: list[_Segment] = []
        parts: list[torch.Tensor] = []
        size = at = 0
        for t, start, keys in self._pieces():
            if parts and (size + keys.numel() > self.chunk or parts[-1].device != keys.device):
                yield self._packed(segments, parts, cache, first)
                segments, parts, size = [], [], 0
            segments.append(_Segment(t, start, keys.numel(), at))
            parts.append(keys)
            size += keys.numel()
            at += keys.numel()
        if parts:
            yield self._packed(segments, parts, cache, first)
        self._cache = cache

    def _packed(self, segments, parts, cache, first):
        packed = (segments, parts[0] if len(parts) == 1 else torch.cat(parts))
        if first:
            self.segments += segments
        if cache is not None:
            cache.append(packed)
        return packed

    def top_digit(self, keys: torch.Tensor) -> torch.Tensor:
        top = keys >> self.shift
        return top + self.bias if self.bias else top

    def key_range(self, bucket: int) -> tuple[int, int]:
        """The keys ``lo <= key <= last`` whose top digit is ``bucket`` (both fit an int32: a
        bound of 2**31 would wrap around when compared with int32 keys)."""
        lo = (bucket - self.bias) << self.shift
        return lo, lo + (1 << self.shift) - 1


def _per_segment(segments: Sequence[_Segment], at: torch.Tensor, n_tensors: int) -> list[int]:
    """Per tensor, how many of the sorted packed positions ``at`` fall in its segments."""
    bounds = [seg.at for seg in segments] + [segments[-1].at + segments[-1].n]
    cuts = torch.searchsorted(at, torch.tensor(bounds, dtype=at.dtype, device=at.device)).tolist()
    counts = [0] * n_tensors
    for i, seg in enumerate(segments):
        counts[seg.t] += cuts[i + 1] - cuts[i]
    return counts


class _Histogram:
    """Counts of int32 digits in ``[0, bins)``; small inputs are pooled into one ``bincount``
    (a group of many small tensors would otherwise pay a full-width histogram per tensor)."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.int64)
        self._pending: list[torch.Tensor] = []
        self._pending_n = 0

    def add(self, digits: torch.Tensor) -> None:
        if self._pending and self._pending[-1].device != digits.device:
            self._flush()
        self._pending.append(digits)
        self._pending_n += digits.numel()
        if self._pending_n >= self.bins:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            digits = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
            self.counts += torch.bincount(digits, minlength=self.bins).cpu()
        self._pending, self._pending_n = [], 0

    def result(self) -> torch.Tensor:
        self._flush()
        return self.counts


def _choose(hist: torch.Tensor, remaining: int) -> tuple[int, int]:
    """The bin holding the ``remaining``-th largest entry, and how many entries lie above it.

    Two levels of 256 (rows, then the bins of one row) rather than one scan of all 64Ki bins:
    the scan's cost is fixed per selection, and small groups notice it."""
    side = 256 if hist.numel() % 256 == 0 else hist.numel()
    rows = hist.view(-1, side).sum(1)
    row_from_top = rows.flip(0).cumsum(0)
    j = int(torch.searchsorted(row_from_top, remaining))
    row = rows.numel() - 1 - j
    above = int(row_from_top[j]) - int(rows[row])
    sub = hist[row * side:(row + 1) * side]
    from_top = sub.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, remaining - above))
    b = side - 1 - j
    return row * side + b, above + int(from_top[j]) - int(sub[b])


def _check_layout(layout, sizes: list[int], k: int, chunk: int, ranks: _Ranks) -> list[int]:
    """The global offset of every local tensor; with several ranks, check that they agree."""
    if layout is None:
        offsets, off = [], 0
        for n in sizes:
            offsets.append(off)
            off += n
        return offsets
    if len(layout.offsets) != len(sizes):
        raise ValueError(f"layout has {len(layout.offsets)} offsets for {len(sizes)} local tensors")
    for off, n in zip(layout.offsets, sizes):
        if n and off + n > layout.total:
            raise ValueError(
                f"local tensor at offset {off} with {n} entries lies outside the group's "
                f"{layout.total} entries"
            )
    # One small exchange so that a rank with another group, k or chunk fails on every rank
    # instead of leaving the others waiting in a collective of another size.
    mine = torch.tensor([len(sizes), layout.total, k, chunk, sum(sizes)], dtype=torch.int64)
    every = ranks.gather(mine)
    if not bool((every[:, :4] == mine[:4]).all()):
        raise ValueError(
            "the ranks disagree on the sharded selection (tensors, total, k, chunk per rank: "
            f"{every[:, :4].tolist()})"
        )
    if int(every[:, 4].sum()) != layout.total:
        raise ValueError(
            f"the ranks' local tensors hold {int(every[:, 4].sum())} entries, but the layout's "
            f"total is {layout.total}"
        )
    return list(layout.offsets)


def select(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    k: int,
    score: Score = "gallop",
    score_eps: float = 1e-8,
    seed: int = 0,
    names: Sequence[str] | None = None,
    chunk: int | None = None,
    layout: ShardLayout | None = None,
    keep_keys: int = KEEP_KEYS,
    floors: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """Per tensor, the sorted int64 local flat indices of the exact top-k (ties to the lower
    global flat index).

    ``k`` counts over the whole group: with ``layout``, over all ranks' shards (``layout.total``
    entries), and every rank must call this with the same arguments but its own shards.
    Raises ``ValueError`` naming the parameter if a score is NaN or infinite (on every rank).
    ``chunk``: entries scored at a time (default: ``CPU_CHUNK`` for CPU tensors, else
    ``DEFAULT_CHUNK``); the memory beyond the output is O(chunk), plus up to
    ``max(chunk, min(k, MAX_CANDIDATES))`` candidates of the threshold's bucket. A group of at
    most ``keep_keys`` local entries keeps its int32 keys between the reads of θ and g (4 bytes
    an entry, 64 MiB at the default), so its scores are computed once; 0 never keeps them.
    ``floors``: one magnitude floor per tensor (`naive.compute_score`), or None.
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(params))]
    # One walk over `params` for sizes and devices (a lazy sequence builds each tensor per walk).
    sizes, devices = [], []
    for p in params:
        sizes.append(p.numel())
        devices.append(p.device)
    if chunk is None:
        chunk = CPU_CHUNK if all(d.type == "cpu" for d in devices) else DEFAULT_CHUNK
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if layout is not None and not isinstance(layout, ShardLayout):
        raise TypeError(f"layout must be a ShardLayout or None, got {type(layout).__name__}")
    ranks = _Ranks(layout)
    total_local = sum(sizes)
    total = total_local if layout is None else layout.total
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be between 1 and the number of entries {total}")
    offsets = _check_layout(layout, sizes, k, chunk, ranks)
    group = _Group(params, grads, score, score_eps, seed, names, chunk, offsets, total,
                   total_local, keep_keys, floors)
    n_tensors = len(sizes)
    cap = max(chunk, min(k, MAX_CANDIDATES))  # entries of the threshold's bucket we may keep
    if layout is None and total_local <= SMALL_GROUP:
        return _select_small(group, devices, k)

    # Pass A: top-digit histogram and NaN/inf counts, summed over the ranks in one exchange.
    bad = [0] * n_tensors
    top_hist = _Histogram(1 << group.top_bits)
    for segments, keys in group.chunks():
        if _count_bad(group, segments, keys, bad):
            continue  # every rank raises below: this chunk's histogram does not matter
        top_hist.add(group.top_digit(keys))
    summed = ranks.sum_(torch.cat([torch.tensor(bad, dtype=torch.int64), top_hist.result()]))
    _raise_if_bad(summed[:n_tensors].tolist(), names)
    hist = summed[n_tensors:]
    bucket, above = _choose(hist, k)
    remaining = k - above  # still to take from the bucket
    in_bucket = int(hist[bucket])
    lo, last = group.key_range(bucket)
    low_bits = group.shift  # key bits below the chosen prefix

    # Narrow [lo, last] down to the exact threshold. Each round's histogram comes from the kept
    # keys once the bucket fits in `cap` (no read of θ, g), else from a read of its own.
    kept: tuple[torch.Tensor, torch.Tensor] | None = None  # packed positions, keys
    while True:
        if kept is None and in_bucket <= cap:
            kept = _keep(group, devices[0], lo)
        if low_bits == 0:
            break
        if kept is not None and ranks.collective is None:
            # One process: the k-th largest of the kept bucket directly (no histogram rounds).
            kk = kept[1]
            inside = kk[(kk >= lo) & (kk <= last)]
            lo = int(torch.kthvalue(inside.cpu(), inside.numel() - remaining + 1).values)
            remaining -= int((inside > lo).sum())
            break
        bits = min(8 if kept is not None else 16, low_bits)
        low_bits -= bits
        digits = _Histogram(1 << bits)
        if kept is not None:
            kk = kept[1]
            digits.add((kk[(kk >= lo) & (kk <= last)] - lo) >> low_bits)
        else:
            for _, keys in group.chunks():
                digits.add((keys[(keys >= lo) & (keys <= last)] - lo) >> low_bits)
        summed = ranks.sum_(digits.result())
        sub, above = _choose(summed, remaining)
        remaining -= above
        in_bucket = int(summed[sub])
        lo += sub << low_bits
        last = lo + (1 << low_bits) - 1
    threshold, ties_needed = lo, remaining

    if kept is not None:
        at, key = kept
        tie_counts = _per_segment(group.segments, at[key == threshold], n_tensors) \
            if group.segments else [0] * n_tensors
    else:  # too many exact ties to keep them all: keep the first ones needed, count the rest
        at, key, tie_counts = _keep(group, devices[0], threshold, ties_needed, n_tensors)
    quota = _tie_quota(ranks, layout, offsets, tie_counts, int((key > threshold).sum()),
                       ties_needed, k)
    return _take(group, devices, at, key, threshold, quota)


def _count_bad(group: _Group, segments, keys: torch.Tensor, bad: list[int]) -> bool:
    """Add the chunk's NaN/inf keys to ``bad`` per tensor; whether it holds any."""
    low_ok, high_ok = FINITE_KEYS[group.signed]
    lowest, highest = torch.aminmax(keys)
    if int(lowest) >= low_ok and int(highest) <= high_ok:  # count only if something is off
        return False
    wrong = ((keys < low_ok) | (keys > high_ok)).nonzero().squeeze(1) + segments[0].at
    for t, c in enumerate(_per_segment(segments, wrong, len(bad))):
        bad[t] += c
    return True


def _raise_if_bad(bad: Sequence[int], names: Sequence[str]) -> None:
    for t, count in enumerate(bad):
        if count:
            raise ValueError(
                f"selection score of parameter {names[t]} has {count} NaN/infinite "
                f"value(s); check its weights and gradient"
            )


def _select_small(group: _Group, devices, k: int) -> list[torch.Tensor]:
    """One process, a small group: every key at once, the threshold is the k-th largest, its
    ties go to the lowest flat indices. A named score is computed once over the concatenated
    tensors (elementwise, with the random score's flat indices counted from 0 in group order,
    so each entry gets exactly its own score) rather than tensor by tensor (not with per-tensor
    magnitude floors)."""
    tensors = list(group._tensors())
    if callable(group.score) or len(set(devices)) > 1 or group.floored:
        packed = list(group.chunks())
        segments = group.segments
        keys = torch.cat([c[1].to(devices[0]) for c in packed]) if packed else None
    else:
        segments, at = [], 0
        for t, p, _ in tensors:
            if p.numel():
                segments.append(_Segment(t, 0, p.numel(), at))
                at += p.numel()
        keys = None
        if segments:
            theta = torch.cat([p.detach().reshape(-1) for _, p, _ in tensors])
            grad = torch.cat([(g.detach().reshape(-1).to(p.device) if g is not None
                               else torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
                              for _, p, g in tensors])
            keys = compute_score(theta, grad, group.score, group.score_eps, group.seed).view(torch.int32)
        group.segments = segments
    bad = [0] * len(devices)
    if keys is None:
        return [torch.empty(0, dtype=torch.int64, device=d) for d in devices]
    if _count_bad(group, segments, keys, bad):
        _raise_if_bad(bad, group.names)
    threshold = torch.kthvalue(keys.cpu(), keys.numel() - k + 1).values.to(keys.device)
    take = keys > threshold
    ties = (keys == threshold).nonzero().squeeze(1)
    take[ties[: k - int(take.sum())]] = True
    chosen = take.nonzero().squeeze(1)
    bounds = torch.tensor([seg.at for seg in segments] + [segments[-1].at + segments[-1].n],
                          dtype=chosen.dtype, device=chosen.device)
    cuts = torch.searchsorted(chosen, bounds).tolist()
    parts: list[list[torch.Tensor]] = [[] for _ in devices]  # a tensor sliced into chunks has several segments
    for i, seg in enumerate(segments):
        parts[seg.t].append((chosen[cuts[i]:cuts[i + 1]] - (seg.at - seg.start)).to(devices[seg.t]))
    return [torch.cat(p) if p else torch.empty(0, dtype=torch.int64, device=d) for p, d in zip(parts, devices)]


def _keep(group: _Group, device: torch.device, lo: int, ties_needed: int | None = None,
          n_tensors: int = 0):
    """One read: the packed positions and keys of every entry with key >= ``lo``.

    With ``ties_needed`` (``lo`` is then the exact threshold, whose ties are too many to keep),
    ties only while this rank could still need them (a rank's taken ties are a prefix of its
    own, in offset order), and every tensor's full tie count."""
    at_parts, key_parts = [], []
    tie_counts = [0] * n_tensors
    budget = ties_needed
    for segments, keys in group.chunks():
        idx = (keys >= lo).nonzero().squeeze(1)
        kk = keys[idx]
        idx += segments[0].at
        if ties_needed is not None:
            tie = kk == lo
            for t, c in enumerate(_per_segment(segments, idx[tie], n_tensors)):
                tie_counts[t] += c
            keep = ~tie | (tie.cumsum(0) <= budget)
            budget = max(0, budget - int(tie.sum()))
            idx, kk = idx[keep], kk[keep]
        at_parts.append(idx.to(device))
        key_parts.append(kk.to(device))
    at = torch.cat(at_parts) if at_parts else torch.empty(0, dtype=torch.int64, device=device)
    key = torch.cat(key_parts) if key_parts else torch.empty(0, dtype=torch.int32, device=device)
    return (at, key) if ties_needed is None else (at, key, tie_counts)


def _tie_quota(ranks: _Ranks, layout, offsets, tie_counts, above: int, ties_needed: int,
               k: int) -> list[int]:
    """This rank's number of ties to take per tensor: the ties go out in global flat-index
    order of the (offset, count) pairs of every tensor of every rank."""
    n_tensors = len(tie_counts)
    mine = torch.tensor([[o, c] for o, c in zip(offsets, tie_counts)] + [[above, 0]],
                        dtype=torch.int64).reshape(-1, 2)
    every = ranks.gather(mine)  # [ranks, tensors + 1, 2]
    pairs = every[:, :n_tensors].reshape(-1, 2)
    order = torch.sort(pairs[:, 0], stable=True).indices
    counts = pairs[order, 1]
    before = torch.cumsum(counts, 0) - counts
    quota_sorted = torch.minimum(counts, (ties_needed - before).clamp(min=0))
    quota = torch.empty_like(quota_sorted)
    quota[order] = quota_sorted
    quota = quota.reshape(ranks.world_size, n_tensors)
    if int(every[:, n_tensors, 0].sum()) + int(quota.sum()) != k:
        raise RuntimeError(
            f"internal error: selection took {int(every[:, n_tensors, 0].sum())} entries above "
            f"the threshold and {int(quota.sum())} ties, expected k={k}"
        )
    rank = 0 if layout is None else layout.collective.rank
    return quota[rank].tolist()


def _take(group: _Group, devices, at: torch.Tensor, key: torch.Tensor, threshold: int,
          quota: list[int]) -> list[torch.Tensor]:
    """Per tensor, the local positions of the kept entries above the threshold and of its first
    ``quota[t]`` ties."""
    n_tensors = len(devices)
    take = key > threshold
    if any(quota):
        tie = key == threshold
        tie_at = tie.nonzero().squeeze(1)
        # A tensor's ties are one run in packed order (tensors in offset order): take the first
        # quota[t] of each run.
        per_tensor = _per_segment(group.segments, at[tie_at], n_tensors)
        parts, start = [], 0
        for t in group.order:
            if quota[t]:
                parts.append(tie_at[start:start + quota[t]])
            start += per_tensor[t]
        take[torch.cat(parts)] = True
    chosen = at[take]
    out: list[list[torch.Tensor]] = [[] for _ in devices]
    if group.segments:
        segs = group.segments
        bounds = [seg.at for seg in segs] + [segs[-1].at + segs[-1].n]
        cuts = torch.searchsorted(
            chosen, torch.tensor(bounds, dtype=chosen.dtype, device=chosen.device)).tolist()
        for i, seg in enumerate(segs):
            if cuts[i + 1] > cuts[i]:
                out[seg.t].append(chosen[cuts[i]:cuts[i + 1]] - (seg.at - seg.start))
    return [
        (torch.cat(parts) if len(parts) > 1 else parts[0]).to(d) if parts
        else torch.empty(0, dtype=torch.int64, device=d)
        for parts, d in zip(out, devices)
    ]
