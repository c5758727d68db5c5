"""Launcher for exact top-k selection with the Triton kernels (kernels 1-3 of
`docs/design.md#kernels`).

``select`` returns the same index sets as ``naive.select_topk`` over the group's scores:
the k largest float32 scores, ties to the lower flat index in the group's concatenation. With a
``ShardLayout`` (see ops/collective.py) the tensors are this rank's shards and the result is the
exact selection of the whole group, as local indices.

Algorithm (everything decided on the device; one host synchronisation). Work is split in tiles
of BLOCK entries of one tensor; every full pass is a persistent launch (a few programs per SM)
over the tiles of several tensors, so a pass with nothing to do costs ~SM-count programs.

1. Radix select over the keys of the scores, digits of 11/10/10 bits for the 31-bit keys of the
   named scores (all >= 0: the raw float bits order correctly, the first digit starts at bit 30)
   and 11/11/10 for the 32-bit keys of signed precomputed scores. Each pass recomputes the score
   from θ and g (never stored). After each pass ``choose_bucket_kernel`` picks, from the summed
   histogram, the bucket holding the k-th largest key (all_reduce'd across ranks first).
   * Early stop: once the bucket holds exactly the remaining k entries, later passes exit.
   * Candidates (AIR top-k's rule, adapted): once the entries at or above the chosen bucket fit
     the buffer (``candidate_capacity``: k + N/256), the next full pass captures all of them
     (key, offset in tile); later passes, the counts and the write read only the buffer. The
     11-bit first digit makes that bucket small (~0.1% of N at typical score spreads), so a
     typical large group reads θ and g twice: pass 0 and the capture pass. If only the bucket
     itself fits, the pass captures the bucket and counts the entries above it per tile (the
     write then reads θ and g once more); if not even that, the next pass histograms the next
     digit from θ and g.
   * NaN/inf scores land in the top (or, signed, the bottom) bins of pass 0: their count comes
     with the one host sync; only then are they counted per tensor, to name the parameter.
   * Two code shapes (``resolve_shape``; `docs/design.md#kernels`): "radix" as above, and
     "sampled" where Triton lowers ``tl.histogram`` through warp ballots (3.6, 3.7): each level
     histograms every SAMPLE_STRIDE-th tile, one full pass captures (or counts) the range that
     sample points at, and its exact counts keep the capture, decide the level, or send it to
     the exact histogram. Both are exact; sharded, the sample's histogram and the window pass's
     counts are all_reduce'd too.
2. Compaction counts per tile (above / equal to the threshold), scanned with torch.cumsum into
   each tile's output position and tie quota: ties go to the lowest global flat indices, per
   tensor and per rank in global order (all-gathered (offset, tie count) pairs when sharded).
3. The one host sync: the NaN/inf count and per-tensor selected counts (to allocate outputs).
4. The write pass: every tile with selected entries writes them in order, from the candidate
   buffer when every selectable entry was captured, else from θ and g.

Extra device memory: the state, one histogram per level (2048 int64 bins), four int32 per tile
(tile = BLOCK entries) and their int64 scans, the candidate buffer (8 bytes x
``candidate_capacity``), the launch tables and the outputs; never an N-length buffer.
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch
import triton.language as tl

from gallop_kernels.ops._triton.launch import (
    Launch,
    log_slots,
    program_count,
    run_all,
    upload,
)
from gallop_kernels.ops._triton.tables import (
    HEAD_LOG_SLOTS,
    HEAD_SLOTS,
    HEAD_WORK,
    TL_DTYPE,
    build_table,
)
from gallop_kernels.ops.backends import check_device, interpreter_enabled
from gallop_kernels.ops.collective import ShardLayout
from gallop_kernels.ops.select.bucket import (
    S_CAP,
    S_CAP_LOCAL,
    S_K,
    S_KREM,
    S_SAMPLE,
    S_SEED_MIX,
    S_TILES,
    S_TOTAL,
    STATE_SIZE,
    W_BAD,
    W_FIELDS,
    choose_bucket_kernel,
    choose_window_kernel,
    window_check_kernel,
)
from gallop_kernels.ops.select.compaction import (
    candidate_count_kernel,
    candidate_write_kernel,
    count_kernel,
    write_kernel,
)
from gallop_kernels.ops.select.histogram import (
    HIST_MISS,
    HIST_SAMPLE,
    candidate_histogram_kernel,
    capture_kernel,
    histogram_kernel,
)
from gallop_kernels.ops.select.naive import compute_score, seed_mix
from gallop_kernels.ops.select.score import (
    ROW_FIELDS,
    ROW_FLOOR,
    ROW_GOFF,
    ROW_GRAD,
    ROW_GTILE,
    ROW_NUMEL,
    ROW_OUT,
    ROW_START,
    ROW_THETA,
    ROW_TID,
    SCORE_CODES,
)
from gallop_kernels.rules import FLOAT_DTYPES, index_dtype

__all__ = ["SelectionPlan", "select", "candidate_capacity"]

# Entries per tile (module attributes, so tests can shrink them); 2048 = 16 per thread with 4 warps
# (two 16-byte vector loads of bf16 per tensor), amortising the histogram's per-tile cost.
BLOCK = 2048
INTERPRETER_BLOCK = 128  # the interpreter pays per program and per tile: small tiles (tests shrink it)
# Candidates per step when a tile's candidate segment is read (one per thread with 4 warps): a
# segment holds ~1% of a tile at typical densities, so reading it BLOCK-wide would cost as many
# instructions as a full pass.
CBLOCK = 128
INTERPRETER_CBLOCK = 16

SCORES = tuple(SCORE_CODES)

# (shift, digit bits) of the radix passes, most significant digit first.
DIGITS_UNSIGNED = ((20, 11), (10, 10), (0, 10))  # 31-bit keys of scores >= 0
DIGITS_SIGNED = ((21, 11), (10, 11), (0, 10))  # 32-bit keys of signed scores
BINS = 2048

# The two code shapes of the radix passes (`docs/design.md#kernels`), chosen by `shape()`:
# "radix" histograms each level's digit over every entry; "sampled" histograms it over every
# SAMPLE_STRIDE-th tile, captures the range that estimate points at in one full pass and checks
# it with that pass's exact counts. None: decided by a feature test of the installed Triton.
SHAPE: str | None = None
SHAPES = ("radix", "sampled")
SAMPLE_STRIDE = 16  # the sample: every 16th tile ...
SAMPLE_MIN_TILES = 4096  # ... of groups of at least this many tiles (smaller ones: every tile)

CANDIDATE_SHARE = 256  # the buffer holds k + N/256 candidates
CANDIDATE_LIMIT = 1 << 27  # ... at most (8 bytes each: 1 GiB)


def candidate_capacity(total: int, k: int) -> int:
    """The capture threshold: capture once the entries at/above the chosen bucket number at most
    this (k plus a bucket of N/256, AIR top-k's N/32 made tighter by the 11-bit first digit),
    capped so the buffer stays <= 1 GiB. The same on every rank (global total and k)."""
    return max(0, min(k + -(-total // CANDIDATE_SHARE), CANDIDATE_LIMIT))


def bad_bins(signed: bool) -> slice | tuple[slice, slice]:
    """The pass-0 bins that hold exactly the NaN/inf scores (exponent all ones)."""
    if signed:  # +inf/NaN: sign bit set in the key; -inf/NaN: all bits flipped
        return (slice(BINS - 4, BINS), slice(0, 4))
    return (slice(BINS - 8, BINS),)


def _check_inputs(params, grads, k, score, names, precomputed, layout):
    if score not in SCORE_CODES:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    params = list(params)
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads")
    names = list(names) if names is not None else [f"#{i}" for i in range(len(params))]
    if len(names) != len(params):
        raise ValueError(f"got {len(params)} params but {len(names)} names")
    if not params:
        raise ValueError("select needs at least one tensor")
    device = params[0].device
    check_device(device)
    for p, g, name in zip(params, grads, names):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"param {name} is not a tensor")
        if p.device != device:
            raise ValueError(f"param {name} is on {p.device}, expected {device} like the first one")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"param {name} has dtype {p.dtype}; expected float32, bfloat16 or float16")
        if not p.is_contiguous():
            raise ValueError(f"param {name} is not contiguous")
        if g is None:
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grad of {name} is not a tensor")
        if g.is_sparse:
            raise TypeError(f"grad of {name} is sparse; dense gradients only")
        if g.device != device:
            raise ValueError(f"grad of {name} is on {g.device}, expected {device}")
        if g.dtype not in FLOAT_DTYPES:
            raise TypeError(f"grad of {name} has dtype {g.dtype}; expected float32, bfloat16 or float16")
        if g.shape != p.shape:
            raise ValueError(f"grad of {name} has shape {tuple(g.shape)}, param {tuple(p.shape)}")
        if not g.is_contiguous():
            raise ValueError(f"grad of {name} is not contiguous")
    if score == "precomputed":
        if precomputed is None:
            raise ValueError('score="precomputed" needs the precomputed scores')
        precomputed = list(precomputed)
        if len(precomputed) != len(params):
            raise ValueError(f"got {len(params)} params but {len(precomputed)} precomputed scores")
        for p, s, name in zip(params, precomputed, names):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"precomputed score of {name} is not a tensor")
            if s.dtype != torch.float32:
                raise TypeError(f"precomputed score of {name} has dtype {s.dtype}; expected float32")
            if s.numel() != p.numel():
                raise ValueError(
                    f"precomputed score of {name} has {s.numel()} entries, param {p.numel()}"
                )
            if s.device != device:
                raise ValueError(f"precomputed score of {name} is on {s.device}, expected {device}")
            if not s.is_contiguous():
                raise ValueError(f"precomputed score of {name} is not contiguous")
    if layout is not None:
        if not isinstance(layout, ShardLayout):
            raise TypeError(f"layout must be a ShardLayout, got {type(layout).__name__}")
        if len(layout.offsets) != len(params):
            raise ValueError(f"layout has {len(layout.offsets)} offsets for {len(params)} tensors")
    total = layout.total if layout is not None else sum(p.numel() for p in params)
    if isinstance(k, bool):
        raise TypeError("k must be an int, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an int, got {type(k).__name__}") from None
    if not (1 <= k <= total or k == total == 0):
        raise ValueError(f"k={k} must be between 1 and the number of entries {total}")
    return params, grads, names, precomputed, device, total, k


def resolve_shape(shape: str | None = None) -> str:
    """The code shape of the radix passes: ``shape``, else the module's SHAPE, else "radix"
    where Triton lowers ``tl.histogram`` through shared-memory atomics (or in the interpreter)
    and "sampled" where it lowers it through warp ballots, at a cost that grows with the bins."""
    shape = shape or SHAPE
    if shape is None:
        from gallop_kernels.ops._triton.launch import histogram_uses_ballots

        shape = "sampled" if not interpreter_enabled() and histogram_uses_ballots() else "radix"
    if shape not in SHAPES:
        raise ValueError(f"unknown selection shape {shape!r}; expected one of {SHAPES}")
    return shape


def _float32_bits(value: float) -> int:
    """The bits of a float32 (>= 0, so < 2**31) as the launch table's int64 field."""
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))


def _aligned(*tensors_and_numel) -> bool:
    *tensors, numel = tensors_and_numel
    return numel % 16 == 0 and all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


class SelectionPlan:
    """The launch tables of one group's selection, and its stages as separate steps.

    The stages, in the order `select` runs them (benchmarks/stages.py times them alone):

    1. ``new_state(k)`` -> ``(state, hist)``: the device state (k, the capture threshold,
       the seed) and one histogram per radix level ``hist[level]``; allocates the per-tile
       counts (``cnt_gt``) and the candidate buffer. (NaN/inf scores land in pass 0's top
       bins; only then does `count_bad` count them per tensor, to name the parameter.)
    2. For each level: ``histogram_pass(level, state, hist[level])`` adds this rank's histogram
       of the level's digit into ``hist[level]`` (level 0: every entry; later levels: the
       entries matching the prefix, from θ, g or from the captured candidates; a level may also
       capture); then, after an ``all_reduce`` of ``hist[level]`` when sharded,
       ``choose_bucket(level, hist[level], state)`` decides the bucket (and capture) on device.
    3. ``compact_counts(state)`` -> ``(take, take_excl, ties, per_tensor)``: per tile the number
       taken, its exclusive scan and tie quota, and per tensor the number selected (the tie
       quota is all-gathered across ranks when sharded).
    4. ``write(state, take, take_excl, ties, outs)``: every tensor's sorted local indices.

    Every stage only enqueues device work; the one host sync is in `select`.
    ``launches(k)`` lists every `Launch` the stages issue (the compile gate compiles them).
    """

    def __init__(self, params, grads, score, score_eps, seed, precomputed, device,
                 layout: ShardLayout | None = None, floors: Sequence[float] | None = None,
                 shape: str | None = None):
        self.params, self.grads, self.device, self.layout = params, grads, device, layout
        self.shape = resolve_shape(shape)
        self.floors = None if floors is None else list(floors)  # float32 values (rules.check_score_floor)
        self.score = score
        self.code = SCORE_CODES[score]
        self.signed = score == "precomputed"
        self.digits = tuple(DIGITS_SIGNED if self.signed else DIGITS_UNSIGNED)
        self.key_bits = 32 if self.signed else 31
        self.block = INTERPRETER_BLOCK if interpreter_enabled() else BLOCK
        self.cblock = INTERPRETER_CBLOCK if interpreter_enabled() else CBLOCK
        self.eps = float(score_eps)
        self.seed = int(seed)
        self.seed_mix = seed_mix(int(seed))
        self.precomputed = precomputed
        self.theta = precomputed if self.signed else params
        sizes = [p.numel() for p in params]
        self.local_total = sum(sizes)
        if layout is None:
            self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            self.total = self.local_total
        else:
            self.offsets = list(layout.offsets)
            self.total = layout.total
        self.index_dtypes = [index_dtype(n) for n in sizes]

        # Tiles: per tensor ceil(n / BLOCK), numbered in group order (global tile ids).
        self.n_tiles = [-(-n // self.block) for n in sizes]
        self.first_tile = [sum(self.n_tiles[:i]) for i in range(len(sizes))]
        self.total_tiles = sum(self.n_tiles)
        self.stride = (SAMPLE_STRIDE if self.shape == "sampled"
                       and -(-self.total // self.block) >= SAMPLE_MIN_TILES else 1)
        self.nonempty = [i for i, n in enumerate(sizes) if n > 0]
        # Full passes: one launch per (θ dtype, g dtype, index width, aligned); the candidate
        # write: one per index width.
        self.groups: dict[tuple, list[int]] = {}
        self.cand_groups: dict[tuple, list[int]] = {}
        for i in self.nonempty:
            g, n = grads[i], sizes[i]
            t = self.theta[i] if score in ("gallop", "magnitude", "precomputed") else None
            gg = g if score in ("gallop", "gradient") else None
            tkey = (None if t is None else t.dtype, None if gg is None else gg.dtype)
            idx64 = self.index_dtypes[i] == torch.int64
            self.groups.setdefault(tkey + (idx64, _aligned(t, gg, n)), []).append(i)
            self.cand_groups.setdefault((idx64,), []).append(i)
        self.tables = self._tables(None)

    # ---- launch tables --------------------------------------------------------------------

    def _rows(self, members, out_ptrs):
        rows, start = [], 0
        for i in members:
            row = [0] * ROW_FIELDS.value
            row[ROW_THETA] = self.theta[i].data_ptr() if self.score in ("gallop", "magnitude", "precomputed") else 0
            g = self.grads[i]
            row[ROW_GRAD] = g.data_ptr() if g is not None and self.score in ("gallop", "gradient") else 0
            row[ROW_NUMEL] = self.params[i].numel()
            row[ROW_GOFF] = self.offsets[i]
            row[ROW_GTILE] = self.first_tile[i]
            row[ROW_START] = start
            row[ROW_OUT] = out_ptrs[i] if out_ptrs is not None else 0
            row[ROW_TID] = i
            if self.floors is not None:
                row[ROW_FLOOR] = _float32_bits(self.floors[i])
            rows.append(row)
            start += self.n_tiles[i]
        header = [0] * 3
        header[HEAD_SLOTS], header[HEAD_LOG_SLOTS], header[HEAD_WORK] = (
            len(rows), log_slots(len(rows)), start)
        return build_table(header, rows, ROW_FIELDS.value), start

    def _tables(self, out_ptrs):
        """One upload: every full-pass table, then (with outputs) every candidate-write table.
        Returns {("full" | "cand", key): (table, tiles)}."""
        values, where = [], {}
        kinds = [("full", self.groups)] + ([("cand", self.cand_groups)] if out_ptrs else [])
        for kind, groups in kinds:
            for key, members in groups.items():
                vals, tiles = self._rows(members, out_ptrs)
                where[(kind, key)] = (len(values), len(vals), tiles)
                values += vals
        blob = upload(values, self.device) if values else None
        return {k: (blob[a: a + n], tiles) for k, (a, n, tiles) in where.items()}

    def _full_launches(self, kernel, tables, args, **extra):
        """One launch of a full-pass kernel per θ/g group, with that group's constexprs."""
        out = []
        for (t_dtype, g_dtype, idx64, aligned), _ in self.groups.items():
            table, tiles = tables[("full", (t_dtype, g_dtype, idx64, aligned))]
            const = dict(
                THETA_T=TL_DTYPE[t_dtype] if t_dtype is not None else tl.float32,
                G_T=TL_DTYPE[g_dtype] if g_dtype is not None else tl.float32,
                SCORE=self.code, HAS_G=g_dtype is not None, SIGNED=self.signed,
                ALIGNED=aligned, BLOCK=self.block, FLOOR=self.floors is not None, **extra,
            )
            if kernel is write_kernel:
                const["IDX_T"] = tl.int64 if idx64 else tl.int32
            out.append(Launch(kernel, (program_count(self.device, tiles),), (table, *args), const))
        return out

    # ---- stages -----------------------------------------------------------------------------

    def new_state(self, k: int):
        """Device buffers: the selection state and one histogram per level."""
        cap = candidate_capacity(self.total, k)
        self.cap_local = min(cap, self.local_total)
        values = [0] * STATE_SIZE.value
        values[S_KREM], values[S_K], values[S_CAP] = k, k, cap
        values[S_CAP_LOCAL], values[S_SEED_MIX], values[S_TILES] = (
            self.cap_local, self.seed_mix, self.total_tiles)
        values[S_TOTAL], values[S_SAMPLE] = self.total, self.stride
        state = upload(values, self.device)
        hist = torch.zeros(len(self.digits), BINS, dtype=torch.int64, device=self.device)
        # the sampled shape's per level: the sample's histogram (slot BINS: the entries sampled;
        # rows padded to 16 bytes) and the window pass's counts (bucket.W_*)
        self.shist = torch.zeros(len(self.digits), BINS + 2, dtype=torch.int64, device=self.device)
        self.shist[:, BINS] = self._sampled_entries()
        self.wcount = torch.zeros(len(self.digits), W_FIELDS.value, dtype=torch.int64,
                                  device=self.device)
        size = max(self.cap_local, 1)
        self.cand = torch.empty(size, dtype=torch.int64, device=self.device)  # key << 16 | offset in tile
        tiles = max(self.total_tiles, 1)
        self.seg_start = torch.empty(tiles, dtype=torch.int32, device=self.device)
        self.seg_count = torch.empty(tiles, dtype=torch.int32, device=self.device)
        self.cnt_gt = torch.empty(tiles, dtype=torch.int32, device=self.device)  # written by capture or counts
        self.cnt_eq = torch.empty(tiles, dtype=torch.int32, device=self.device)
        return state, hist

    def _sampled_entries(self) -> int:
        """Entries of this rank's tiles whose (local group) tile id is a multiple of the stride."""
        s, total = self.stride, 0
        for n, first, tiles in zip((p.numel() for p in self.params), self.first_tile, self.n_tiles):
            l0 = (-first) % s
            if l0 >= tiles:
                continue
            count = (tiles - 1 - l0) // s + 1
            total += count * self.block
            if (tiles - 1 - l0) % s == 0:  # the last tile is sampled: only its real entries
                total -= tiles * self.block - n
        return total

    def _hi_mask(self, level: int) -> int:
        """Key bits chosen before ``level`` (its prefix); level -1: none."""
        if level < 0:
            return 0
        shift, nbits = self.digits[level]
        return ((1 << self.key_bits) - 1) & ~((1 << (shift + nbits)) - 1)

    def _digit_mask(self, level: int) -> int:
        if level >= len(self.digits):
            return 0
        shift, nbits = self.digits[level]
        return ((1 << nbits) - 1) << shift

    def _level_steps(self, level: int, state, hist_out) -> list[Launch | str]:
        """The launches of one level's histogram, with the names of the sums across ranks
        ("shist", "wcount") where a sharded selection all-reduces them."""
        shift, nbits = self.digits[level]
        hi_mask = self._hi_mask(level)
        cand_tiles = -(-max(self.cap_local, 1) // self.block)
        cand_hist = Launch(
            candidate_histogram_kernel, (program_count(self.device, cand_tiles),),
            (self.cand, state, hist_out),
            dict(SHIFT=shift, DIGIT_BITS=nbits, HI_MASK=hi_mask, BLOCK=self.block),
        )
        if self.shape == "radix":
            steps = self._full_launches(
                histogram_kernel, self.tables, (state, hist_out, self.eps),
                FILTER=level > 0, SHIFT=shift, DIGIT_BITS=nbits, HI_MASK=hi_mask,
            )
            if level == 0:
                return steps
            steps += self._full_launches(
                capture_kernel, self.tables,
                (state, self.cand, self.seg_start, self.seg_count, self.cnt_gt, self.wcount[level],
                 self.eps),
                HI_MASK=hi_mask,
            )
            return steps + [cand_hist]
        # sampled: estimate, choose a window, capture/count it in one full pass, check it
        steps = self._full_launches(
            histogram_kernel, self.tables, (state, self.shist[level], self.eps),
            FILTER=level > 0, SHIFT=shift, DIGIT_BITS=nbits, HI_MASK=hi_mask, MODE=HIST_SAMPLE,
        )
        steps += ["shist", Launch(choose_window_kernel, (1,), (self.shist[level], state),
                                  dict(SHIFT=shift, DIGIT_BITS=nbits, SAMPLED_SLOT=BINS))]
        steps += self._full_launches(
            capture_kernel, self.tables,
            (state, self.cand, self.seg_start, self.seg_count, self.cnt_gt, self.wcount[level],
             self.eps),
            HI_MASK=self._hi_mask(level) | self._digit_mask(level), WINDOWED=True,
        )
        steps += ["wcount", Launch(window_check_kernel, (1,), (self.wcount[level], state),
                                   dict(SHIFT=shift, DIGIT_BITS=nbits,
                                        CAN_CAPTURE=level + 1 < len(self.digits),
                                        NEXT_DIGIT_MASK=self._digit_mask(level + 1)))]
        steps += self._full_launches(
            histogram_kernel, self.tables, (state, hist_out, self.eps),
            FILTER=level > 0, SHIFT=shift, DIGIT_BITS=nbits, HI_MASK=hi_mask, MODE=HIST_MISS,
        )
        return steps + [cand_hist]

    def _level_launches(self, level: int, state, hist_out) -> list[Launch]:
        return [s for s in self._level_steps(level, state, hist_out) if isinstance(s, Launch)]

    def histogram_pass(self, level: int, state, hist_out, reduce=None) -> None:
        """Adds this rank's histogram of the level's digit, over the entries matching the prefix
        in ``state``, into ``hist_out``: from θ and g, or (capturing first when the last bucket
        choice said so) from the candidate buffer; in the sampled shape, after the sample, the
        window pass and its check (which may decide the level itself). ``reduce`` sums a tensor
        over ranks in place (sharded selections). (NaN/inf scores are counted by `bad_count`.)"""
        sums = {"shist": self.shist[level], "wcount": self.wcount[level]}
        for step in self._level_steps(level, state, hist_out):
            if isinstance(step, Launch):
                step()
            elif reduce is not None:
                reduce(sums[step])

    def clear_level(self, level: int) -> None:
        """Zero the sampled shape's sums of ``level`` (to run its histogram pass again)."""
        self.shist[level, :BINS].zero_()
        self.wcount[level].zero_()

    def bad_count(self, hist) -> torch.Tensor:
        """NaN/inf scores of the group (summed over ranks), as a one-element device tensor:
        the top pass-0 bins (radix), or the level-0 window pass's count (sampled)."""
        if self.shape == "sampled":
            return self.wcount[0, W_BAD.value].reshape(1)
        return sum(hist[0][s].sum() for s in bad_bins(self.signed)).reshape(1)

    def choose_bucket(self, level: int, hist, state) -> None:
        """Picks, on the device, the bucket of the summed histogram holding the k-th largest
        key, and whether the next full pass captures candidates."""
        self._choose_launch(level, hist, state)()

    def _choose_launch(self, level, hist, state) -> Launch:
        shift, nbits = self.digits[level]
        return Launch(choose_bucket_kernel, (1,), (hist, state),
                      dict(SHIFT=shift, DIGIT_BITS=nbits, CAN_CAPTURE=level + 1 < len(self.digits),
                           NEXT_DIGIT_MASK=self._digit_mask(level + 1) if self.shape == "sampled"
                           else 0))

    def _count_launches(self, state) -> list[Launch]:
        launches = self._full_launches(count_kernel, self.tables,
                                       (state, self.cnt_gt, self.cnt_eq, self.eps))
        launches.append(Launch(
            candidate_count_kernel, (program_count(self.device, max(self.total_tiles, 1)),),
            (state, self.cand, self.seg_start, self.seg_count, self.cnt_gt, self.cnt_eq),
            dict(CBLOCK=self.cblock),
        ))
        return launches

    def compact_counts(self, state):
        """Per tile: entries taken, its exclusive scan and tie quota (on the device); per
        non-empty tensor, the number selected."""
        run_all(self._count_launches(state))
        dev = self.device
        tiles = self.total_tiles
        gt = self.cnt_gt[:tiles].to(torch.int64)
        eq = self.cnt_eq[:tiles].to(torch.int64)
        eq_excl = torch.cumsum(eq, 0) - eq
        n = len(self.params)
        first = torch.tensor(self.first_tile, dtype=torch.int64, device=dev)
        last = first + torch.tensor(self.n_tiles, dtype=torch.int64, device=dev)  # exclusive
        # per tensor: ties, and ties before it in global flat order (over ranks when sharded)
        eq_pad = torch.cat([eq_excl, (eq_excl[-1:] + eq[-1:]) if tiles else eq_excl.new_zeros(1)])
        tensor_eq = eq_pad[last] - eq_pad[first] if tiles else torch.zeros(n, dtype=torch.int64, device=dev)
        before = self._ties_before(tensor_eq)
        krem = state[S_KREM.value]
        quota = torch.minimum((krem - before).clamp(min=0), tensor_eq)
        owner = torch.repeat_interleave(torch.arange(n, device=dev),
                                        torch.tensor(self.n_tiles, device=dev), output_size=tiles)
        within = eq_excl - eq_excl[first[owner]] if tiles else eq_excl
        ties = torch.minimum((quota[owner] - within).clamp(min=0), eq)
        take = gt + ties
        take_incl = torch.cumsum(take, 0)
        take_excl = take_incl - take
        pad = torch.cat([take_excl, take_incl[-1:] if tiles else take_excl.new_zeros(1)])
        per_tensor = (pad[last] - pad[first])[self.nonempty] if tiles else pad.new_zeros(0)
        return take, take_excl, ties, per_tensor

    def _ties_before(self, tensor_eq: torch.Tensor) -> torch.Tensor:
        """Per local tensor, the ties of all (tensor, rank) pieces before it in global flat
        order: an exclusive scan here, over all-gathered (offset, count) pairs when sharded."""
        if self.layout is None:
            return torch.cumsum(tensor_eq, 0) - tensor_eq
        coll = self.layout.collective
        offsets = torch.tensor(self.offsets, dtype=torch.int64, device=tensor_eq.device)
        pairs = coll.all_gather(torch.stack([offsets, tensor_eq]))  # [world, 2, n]
        all_off = pairs[:, 0].reshape(-1)
        all_cnt = pairs[:, 1].reshape(-1)
        order = torch.sort(all_off, stable=True).indices
        excl = torch.cumsum(all_cnt[order], 0) - all_cnt[order]
        before = torch.empty_like(excl)
        before[order] = excl
        n = len(self.params)
        return before[coll.rank * n: (coll.rank + 1) * n]

    def _write_launches(self, state, take, take_excl, ties, outs) -> list[Launch]:
        tables = self._tables([o.data_ptr() for o in outs])
        launches = self._full_launches(write_kernel, tables,
                                       (state, take, take_excl, ties, self.cnt_eq, self.eps))
        for (idx64,), _ in self.cand_groups.items():
            table, tiles = tables[("cand", (idx64,))]
            launches.append(Launch(
                candidate_write_kernel, (program_count(self.device, tiles),),
                (table, state, self.cand, self.seg_start, self.seg_count,
                 take, take_excl, ties, self.cnt_eq),
                dict(IDX_T=tl.int64 if idx64 else tl.int32, BLOCK=self.block, CBLOCK=self.cblock),
            ))
        return launches

    def write(self, state, take, take_excl, ties, outs) -> None:
        """Writes every tensor's sorted selected local indices into ``outs``."""
        run_all(self._write_launches(state, take, take_excl, ties, outs))

    def launches(self, k: int) -> list[Launch]:
        """Every launch one selection issues (no kernel runs): the compile gate's variants."""
        state, hist = self.new_state(k)
        out = []
        for level in range(len(self.digits)):
            out += self._level_launches(level, state, hist[level])
            out.append(self._choose_launch(level, hist[level], state))
        out += self._count_launches(state)
        tiles = max(self.total_tiles, 1)
        take = torch.zeros(tiles, dtype=torch.int64, device=self.device)
        outs = [torch.empty(max(p.numel(), 1), dtype=dt, device=self.device)
                for p, dt in zip(self.params, self.index_dtypes)]
        out += self._write_launches(state, take, take, take, outs)
        return out

    def count_bad(self, names) -> list[int]:
        """Per local tensor, its NaN/inf scores (error path only: torch, one tensor at a time)."""
        counts = []
        for i, p in enumerate(self.params):
            if self.signed:
                s = self.precomputed[i].reshape(-1)
            else:
                s = compute_score(p, self.grads[i], self.score, self.eps, self.seed,
                                  self.offsets[i], None if self.floors is None else self.floors[i])
            counts.append(int((~torch.isfinite(s)).sum()))
        return counts


def select(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    k: int,
    score: str,
    score_eps: float = 1e-8,
    seed: int = 0,
    names: Sequence[str] | None = None,
    precomputed: Sequence[torch.Tensor] | None = None,
    layout: ShardLayout | None = None,
    floors: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """Per tensor, the sorted flat indices of its selected entries (int32; int64 for a tensor of
    >= 2**31 entries): the k largest scores of the group, ties to the lower flat index.

    With ``layout`` the tensors are this rank's shards (ops/collective.py): k counts the whole
    group (``layout.total``), the random score hashes and ties follow global flat indices
    (``layout.offsets[i] + local index``), and the indices returned are local. Every rank issues
    the same collectives in the same order, whatever its data, also with empty shards.

    A NaN or infinite score raises ``ValueError`` naming the tensor (on every rank).
    ``floors``: per tensor, the float32 magnitude floor of the gallop/magnitude score
    (`rules.check_score_floor`), or None.
    """
    params, grads, names, precomputed, device, total, k = _check_inputs(
        params, grads, k, score, names, precomputed, layout
    )
    coll = layout.collective if layout is not None else None
    if coll is not None:  # the all-gather of the tie pass needs one row per tensor everywhere
        counts = coll.all_gather(torch.tensor([len(params)], dtype=torch.int64, device=device))
        if int(counts.min()) != int(counts.max()):
            raise ValueError(
                f"every rank must pass the same number of tensors to a sharded selection, got "
                f"{counts.reshape(-1).tolist()}"
            )
    plan = SelectionPlan(params, grads, score, score_eps, seed, precomputed, device, layout, floors)
    if total == 0:
        return [torch.empty(0, dtype=dt, device=device) for dt in plan.index_dtypes]

    # Radix select: the exact k-th largest key, decided on the device.
    state, hist = plan.new_state(k)
    reduce = coll.all_reduce_sum_ if coll is not None else None
    for level in range(len(plan.digits)):
        plan.histogram_pass(level, state, hist[level], reduce=reduce)
        if coll is not None:
            coll.all_reduce_sum_(hist[level])
        plan.choose_bucket(level, hist[level], state)

    take, take_excl, ties, per_tensor = plan.compact_counts(state)

    # The one host sync: NaN/inf count (summed over ranks already) and the output sizes.
    n_bad = plan.bad_count(hist)
    info = torch.cat([n_bad, per_tensor]).cpu().tolist()
    if info[0]:
        bad = torch.tensor(plan.count_bad(names), dtype=torch.int64, device=device)
        if coll is not None:
            coll.all_reduce_sum_(bad)
        for i, nb in enumerate(bad.tolist()):
            if nb:
                raise ValueError(
                    f"selection score of parameter {names[i]} has {nb} NaN/infinite value(s); "
                    f"check its weights and gradient"
                )
        raise ValueError(f"selection scores have {info[0]} NaN/infinite value(s)")
    counts = [0] * len(params)
    for j, i in enumerate(plan.nonempty):
        counts[i] = info[1 + j]
    if coll is None and sum(counts) != k:
        raise RuntimeError(f"internal error: selected {sum(counts)} entries, expected k={k}")
    outs = [torch.empty(c, dtype=dt, device=device) for c, dt in zip(counts, plan.index_dtypes)]
    plan.write(state, take, take_excl, ties, outs)
    return outs
