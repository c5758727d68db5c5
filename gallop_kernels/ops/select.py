"""Launcher for exact top-k selection with the Triton kernels (`docs/design.md#selection-semantics`, `docs/design.md#kernels`).

``triton_select`` returns the same index sets as ``reference.select_topk`` over the group's scores:
the k largest float32 scores, ties to the lower flat index in the group's concatenation.

Algorithm (everything decided on the device; one host synchronisation):

1. Radix select over the keys of the scores (``score_histogram_kernel`` + ``choose_bucket_kernel``)
   with 8-bit digits: 8/8/8/7 bits for the 31-bit keys of the named scores (all >= 0, the first
   digit starts at bit 30), 8/8/8/8 for the 32-bit keys of signed precomputed scores. 8 bits because
   ``tl.histogram``'s GPU lowering costs about (bins / 32) ballot-and-popcount steps per element:
   256 bins keep a pass near memory speed, 2048 bins would make it compute bound. Each pass
   recomputes the score from θ and g (never stored) and keeps the entries matching the prefix
   chosen so far, read from a device state buffer. The bucket choice runs on the device.
   * Early stop: once the chosen bucket holds exactly the remaining k entries, later passes exit.
   * Candidates (AIR top-k's rule): once the chosen bucket holds <= N/32 entries (capped at 2^26),
     the next full pass also captures them (key + chunk id) into a buffer and stores per chunk the
     count above the bucket; later passes and the compaction counts then read only the buffer.
     Typical large groups: 4 full reads of θ, g (3 radix passes, the last one capturing, + write).
2. Compaction counts: per chunk, entries above / equal to the threshold (``count_kernel`` over θ, g,
   or ``candidate_count_kernel`` over the buffer), scanned with torch.cumsum on the device into
   each chunk's output position and tie quota (ties go to the lowest global flat indices).
3. The one host sync: per-tensor NaN/inf counts and selected counts (to raise naming the tensor,
   and to allocate each tensor's output).
4. ``write_kernel``: every chunk writes its selected local indices, in order (chunks selecting
   nothing skip reading).

Extra device memory: 4 × 256 int64 bins, a few ints per chunk (chunk = BLOCK × TILES_PER_CHUNK
entries), the candidate buffer (8 bytes × min(N/32, 2^26)), the launch tables and the outputs;
never an N-length buffer.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Sequence

import torch
import triton.language as tl

from gallop_kernels.ops.triton.compaction import candidate_count_kernel, count_kernel, write_kernel
from gallop_kernels.ops.triton.radix_select import STATE_SIZE, S_KREM, choose_bucket_kernel
from gallop_kernels.ops.triton.score import (
    F_GCHUNK, F_GOFF, F_GRAD, F_NUMEL, F_OUT, F_START, F_THETA, F_TID, NF, SCORE_CODES,
)
from gallop_kernels.ops.triton.score_histogram import candidate_histogram_kernel, score_histogram_kernel

__all__ = ["SelectionPlan", "triton_select"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Entries per tile and tiles per chunk (one program per chunk). Module attributes so tests can
# shrink them; chosen for the interpreter's speed when it is on.
BLOCK = 128 if _INTERPRET else 1024
TILES_PER_CHUNK = 4 if _INTERPRET else 16
NUM_WARPS = 4

INT32_LIMIT = 2**31
_MASK32 = 0xFFFFFFFF
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# (shift, digit bits) of the radix passes, most significant digit first.
DIGITS_UNSIGNED = ((23, 8), (15, 8), (7, 8), (0, 7))  # 31-bit keys of scores >= 0
DIGITS_SIGNED = ((24, 8), (16, 8), (8, 8), (0, 8))  # 32-bit keys of signed scores


def _lowbias32(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 table on ``device`` without blocking the host (pinned, non_blocking copy)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {device} (or set TRITON_INTERPRET=1 before "
            f"importing triton to run them on the CPU)"
        )


def _empty(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer that a kernel overwrites entirely (the tests replace this to poison it)."""
    return torch.empty(size, dtype=dtype, device=device)


def _candidate_capacity(total: int) -> int:
    """Capacity of the candidate buffer (AIR top-k's rule: capture a bucket only when it holds at
    most N/32 entries), capped so that the buffer (8 bytes per candidate) stays <= 512 MiB."""
    return min(max(total // 32, 1), 1 << 26)


def _log_slots(n: int) -> int:
    return max(1, math.ceil(math.log2(n)) + 1) if n > 1 else 0


def _check_inputs(params, grads, k, score, names, precomputed):
    if score not in SCORE_CODES:
        raise ValueError(f"unknown score {score!r}; expected one of {tuple(SCORE_CODES)}")
    params = list(params)
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads")
    names = list(names) if names is not None else [f"#{i}" for i in range(len(params))]
    if len(names) != len(params):
        raise ValueError(f"got {len(params)} params but {len(names)} names")
    if not params:
        raise ValueError("triton_select needs at least one tensor")
    device = params[0].device
    _check_device(device)
    for p, g, name in zip(params, grads, names):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"param {name} is not a tensor")
        if p.device != device:
            raise ValueError(f"param {name} is on {p.device}, expected {device} like the first one")
        if p.dtype not in _FLOAT_DTYPES:
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
        if g.dtype not in _FLOAT_DTYPES:
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
    total = sum(p.numel() for p in params)
    if isinstance(k, bool):
        raise TypeError("k must be an int, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an int, got {type(k).__name__}") from None
    if not (1 <= k <= total or k == total == 0):
        raise ValueError(f"k={k} must be between 1 and the number of entries {total}")
    return params, grads, names, precomputed, device, total, k


class SelectionPlan:
    """The launch tables of one group's selection, and its passes as separate steps.

    The steps are shaped for sharded parameters (`docs/design.md#distributed`): ``histogram_pass`` takes this rank's
    tensors and adds into a histogram; ``choose_bucket`` takes the *summed* histogram, so an
    ``all_reduce`` of the bins (a few KB) can sit between the two, and every rank then finds the
    same exact threshold in the device ``state``. (Across ranks the tie quota of ``compact_counts``
    would also need the number of ties on earlier ranks: an exclusive scan of one int per rank.)
    """

    def __init__(self, params, grads, score, score_eps, seed, precomputed, device):
        self.params, self.grads, self.device = params, grads, device
        self.code = SCORE_CODES[score]
        self.signed = score == "precomputed"
        self.digits = tuple(DIGITS_SIGNED if self.signed else DIGITS_UNSIGNED)
        self.key_bits = 32 if self.signed else 31
        self.block, self.tiles = int(BLOCK), int(TILES_PER_CHUNK)
        chunk = self.block * self.tiles
        self.eps = float(score_eps)
        self.seed_mix = _lowbias32(int(seed))
        self.theta = precomputed if self.signed else params
        total = sum(p.numel() for p in params)
        self.cap = max(0, min(int(_candidate_capacity(total)), total))  # 0: never capture
        self.cand_key = torch.empty(max(self.cap, 1), dtype=torch.int32, device=device)
        self.cand_chunk = torch.empty(max(self.cap, 1), dtype=torch.int32, device=device)
        self.cnt_gt = _empty(0, torch.int32, device)  # allocated with the state

        # Tensors grouped by what the kernels read: one launch per group and pass.
        self.launches: dict[tuple, list[int]] = {}
        self.first_chunk, self.n_chunks, self.flat_offsets = [], [], []
        goff = gchunk = 0
        for i, (p, g) in enumerate(zip(params, grads)):
            n = p.numel()
            self.flat_offsets.append(goff)
            self.first_chunk.append(gchunk)
            c = -(-n // chunk)
            self.n_chunks.append(c)
            goff += n
            gchunk += c
            if n == 0:
                continue
            if score == "random":
                tkey = (None, None)
            elif score == "precomputed":
                tkey = (torch.float32, None)
            elif score == "gradient":
                tkey = (None, None if g is None else g.dtype)
            elif score == "magnitude":
                tkey = (p.dtype, None)
            else:
                tkey = (p.dtype, None if g is None else g.dtype)
            idx64 = n >= INT32_LIMIT  # module attribute: the tests lower it to test int64 output
            self.launches.setdefault(tkey + (idx64,), []).append(i)
        self.total_chunks = gchunk
        self.index_dtypes = [
            torch.int64 if p.numel() >= INT32_LIMIT else torch.int32 for p in params
        ]

        values, self.specs = self._rows()
        # One upload: the launch tables, then each non-empty tensor's first and last chunk id.
        self.nonempty = [i for i, p in enumerate(params) if p.numel() > 0]
        bounds = [self.first_chunk[i] for i in self.nonempty]
        bounds += [self.first_chunk[i] + self.n_chunks[i] - 1 for i in self.nonempty]
        blob = _upload(values + bounds, device)
        self.table = blob[: len(values)]
        n_ne = len(self.nonempty)
        self.first_idx = blob[len(values): len(values) + n_ne]
        self.last_idx = blob[len(values) + n_ne:]

    def _rows(self, out_ptrs=None):
        values, specs = [], []
        for (t_dtype, g_dtype, idx64), members in self.launches.items():
            row0 = len(values) // NF
            start = 0
            for i in members:
                row = [0] * NF
                row[F_THETA] = self.theta[i].data_ptr() if t_dtype is not None else 0
                row[F_GRAD] = self.grads[i].data_ptr() if g_dtype is not None else 0
                row[F_NUMEL] = self.params[i].numel()
                row[F_GOFF] = self.flat_offsets[i]
                row[F_GCHUNK] = self.first_chunk[i]
                row[F_START] = start
                row[F_TID] = i
                row[F_OUT] = out_ptrs[i] if out_ptrs is not None else 0
                values.extend(row)
                start += self.n_chunks[i]
            specs.append((row0, len(members), start, t_dtype, g_dtype, idx64))
        return values, specs

    def _launches(self, table=None):
        table = self.table if table is None else table
        for row0, n_slots, n_progs, t_dtype, g_dtype, idx64 in self.specs:
            sub = table[row0 * NF: (row0 + n_slots) * NF]
            const = dict(
                LOG_SLOTS=_log_slots(n_slots),
                THETA_T=_TL_DTYPE[t_dtype] if t_dtype is not None else tl.float32,
                G_T=_TL_DTYPE[g_dtype] if g_dtype is not None else tl.float32,
                SCORE=self.code, HAS_G=g_dtype is not None, SIGNED=self.signed,
                BLOCK=self.block, TILES=self.tiles, num_warps=NUM_WARPS,
            )
            yield sub, n_slots, n_progs, idx64, const

    def new_state(self, k: int):
        """Device buffers: selection state, one histogram per level, per-tensor NaN/inf counts."""
        state = torch.zeros(STATE_SIZE, dtype=torch.int64, device=self.device)
        state[S_KREM] = k
        bins = max(1 << nbits for _, nbits in self.digits)
        hist = torch.zeros(len(self.digits), bins, dtype=torch.int64, device=self.device)
        bad = torch.zeros(len(self.params), dtype=torch.int64, device=self.device)
        # per-chunk counts above the threshold: written by a capturing pass or the count pass
        self.cnt_gt = _empty(self.total_chunks, torch.int32, self.device)
        return state, hist, bad

    def histogram_pass(self, level: int, state, hist_out, bad) -> None:
        """Adds the level's digit histogram of the entries matching ``state``'s prefix into
        ``hist_out`` (level 0: of every entry, and counts NaN/inf scores per tensor into ``bad``).
        Reads θ and g, or the candidate buffer once the chosen bucket was captured."""
        shift, nbits = self.digits[level]
        hi_mask = ((1 << self.key_bits) - 1) & ~((1 << (shift + nbits)) - 1)
        for sub, n_slots, n_progs, _, const in self._launches():
            score_histogram_kernel[(n_progs,)](
                sub, n_slots, state, hist_out, bad, self.eps, self.seed_mix,
                self.cand_key, self.cand_chunk, self.cnt_gt, self.cap,
                FILTER=level > 0, CHECK_BAD=level == 0,
                SHIFT=shift, DIGIT_BITS=nbits, HI_MASK=hi_mask, **const,
            )
        if level >= 2:  # candidates can be captured by pass 1 at the earliest
            candidate_histogram_kernel[(self._candidate_programs(),)](
                self.cand_key, state, hist_out, self.cap,
                SHIFT=shift, DIGIT_BITS=nbits, HI_MASK=hi_mask,
                BLOCK=self.block, TILES=self.tiles, num_warps=NUM_WARPS,
            )

    def _candidate_programs(self) -> int:
        return max(1, -(-self.cap // (self.block * self.tiles)))

    def choose_bucket(self, level: int, hist, state) -> None:
        """Picks, on the device, the bucket of the summed histogram holding the k-th largest."""
        shift, nbits = self.digits[level]
        choose_bucket_kernel[(1,)](
            hist, state, self.cap, SHIFT=shift, DIGIT_BITS=nbits,
            CAN_CAPTURE=level + 1 < len(self.digits), num_warps=4,
        )

    def compact_counts(self, state):
        """Per chunk: entries taken, tie quota and exclusive prefix of taken (all on the device),
        and per non-empty tensor the number selected."""
        cnt_gt = self.cnt_gt
        cnt_eq = torch.zeros(self.total_chunks, dtype=torch.int32, device=self.device)
        for sub, n_slots, n_progs, _, const in self._launches():  # skipped if captured
            count_kernel[(n_progs,)](
                sub, n_slots, state, cnt_gt, cnt_eq, self.eps, self.seed_mix, **const
            )
        candidate_count_kernel[(self._candidate_programs(),)](  # only if captured
            self.cand_key, self.cand_chunk, state, cnt_gt, cnt_eq, self.cap,
            BLOCK=self.block, TILES=self.tiles, num_warps=NUM_WARPS,
        )
        eq = cnt_eq.to(torch.int64)
        eq_excl = torch.cumsum(eq, 0) - eq
        ties = torch.minimum((state[S_KREM] - eq_excl).clamp_(min=0), eq)
        take = cnt_gt.to(torch.int64) + ties
        take_incl = torch.cumsum(take, 0)
        take_excl = take_incl - take
        per_tensor = take_incl[self.last_idx] - take_excl[self.first_idx]
        return take, take_excl, ties, per_tensor

    def write(self, state, take, take_excl, ties, outs) -> None:
        """Writes every tensor's sorted selected indices into ``outs``."""
        values, _ = self._rows([o.data_ptr() for o in outs])
        table = _upload(values, self.device)
        for sub, n_slots, n_progs, idx64, const in self._launches(table):
            write_kernel[(n_progs,)](
                sub, n_slots, state, take, take_excl, ties, self.eps, self.seed_mix,
                IDX_T=tl.int64 if idx64 else tl.int32, **const,
            )


def triton_select(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    k: int,
    score: str,
    score_eps: float = 1e-8,
    seed: int = 0,
    names: Sequence[str] | None = None,
    precomputed: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Per tensor, the sorted flat indices of its selected entries (int32; int64 for a tensor of
    >= 2**31 entries): the k largest scores of the group, ties to the lower flat index.

    A NaN or infinite score raises ``ValueError`` naming the tensor.
    """
    params, grads, names, precomputed, device, total, k = _check_inputs(
        params, grads, k, score, names, precomputed
    )
    plan = SelectionPlan(params, grads, score, score_eps, seed, precomputed, device)
    if total == 0:
        return [torch.empty(0, dtype=dt, device=device) for dt in plan.index_dtypes]

    # Radix select: the exact k-th largest key, decided on the device.
    state, hist, bad = plan.new_state(k)
    for level in range(len(plan.digits)):
        plan.histogram_pass(level, state, hist[level], bad)
        # (sharded parameters: all_reduce(hist[level]) here)
        plan.choose_bucket(level, hist[level], state)

    take, take_excl, ties, per_tensor = plan.compact_counts(state)

    # The one host sync: NaN/inf check and the output sizes.
    info = torch.cat([bad, per_tensor]).cpu().tolist()
    for i, nb in enumerate(info[: len(params)]):
        if nb:
            raise ValueError(
                f"selection score of parameter {names[i]} has {nb} NaN/infinite value(s); "
                f"check its weights and gradient"
            )
    counts = [0] * len(params)
    for j, i in enumerate(plan.nonempty):
        counts[i] = info[len(params) + j]
    if sum(counts) != k:
        raise RuntimeError(f"internal error: selected {sum(counts)} entries, expected k={k}")
    outs = [_empty(c, dt, device) for c, dt in zip(counts, plan.index_dtypes)]
    plan.write(state, take, take_excl, ties, outs)
    return outs
