"""Ranks meet before the optimizer's collectives: a rank that does not come fails every rank fast.

Every rank of a process group must enter each of its collectives; a rank that skips one (``if
rank == 0: opt.step()``, a load refused on one rank only) leaves the others blocked until the
process group's timeout, 30 minutes by default, with no message. So before the first collective
of each public call that issues any, the ranks meet through the process group's key-value store
(`together`), which is no collective and cannot deadlock: each rank posts what it is doing (the
call, e.g. ``"step() #5"``), waits up to :func:`timeout_s` for every rank of the groups involved,
and reads what they posted. A rank that does not come, or comes to another call, makes every rank
that came raise one error that says which rank did what. `agree` uses the same meeting to make a
refusal collective: every rank raises the error any rank raised (a load refused on one rank).

Cost: four small store requests per call that meets (none for a call without collectives);
one store key per rank and group stays behind. The timeout is ``GALLOP_RANKS_TIMEOUT_S``
(seconds; default 300, never more than the process group's own timeout). See
``docs/design.md#distributed``.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Any, Iterable, Sequence

import torch

__all__ = ["RanksDisagree", "agree", "timeout_s", "together"]

DEFAULT_TIMEOUT_S = 300.0
_PREFIX = "gallop_kernels/rendezvous"
_SEQUENCE: dict[str, int] = {}  # per set of ranks: how many meetings this process held


class RanksDisagree(RuntimeError):
    """Raised on every rank that met when the ranks are not all in the same call."""


def timeout_s() -> float:
    """How long a rank waits for the others (``GALLOP_RANKS_TIMEOUT_S``, default 300 s)."""
    raw = os.environ.get("GALLOP_RANKS_TIMEOUT_S")
    try:
        value = float(raw) if raw is not None else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(
            f"GALLOP_RANKS_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"GALLOP_RANKS_TIMEOUT_S must be a finite number of seconds > 0, "
                         f"got {raw!r}")
    return value


def _store() -> Any:
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def _members(group: Any) -> tuple[int, ...]:
    import torch.distributed as dist

    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def _groups(groups: Iterable[Any]) -> list[tuple[int, ...]]:
    """The distinct sets of ranks of ``groups`` (None: the world), in one order on every rank."""
    seen = {_members(g) for g in groups}
    return sorted(m for m in seen if len(m) > 1)


def together(call: str, groups: Iterable[Any] = (None,), outcome: str = "") -> dict[int, str]:
    """Meet every rank of ``groups`` before a collective of ``call``; returns what each posted.

    Raises `RanksDisagree` on every rank that came when a rank is in another call, and a
    ``RuntimeError`` naming the missing ranks (and the last call each of them met in) when some
    rank does not come within :func:`timeout_s`. ``outcome`` is posted beside ``call`` (see
    `agree`). A no-op without an initialized process group of several ranks.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {}
    store = _store()
    if store is None:
        return {}
    me = dist.get_rank()
    posted: dict[int, str] = {}
    wait = timeout_s()
    cap = getattr(store, "timeout", None)  # (the process group's timeout)
    if isinstance(cap, timedelta) and cap.total_seconds() > 0:
        wait = min(wait, cap.total_seconds())
    for members in _groups(groups):
        if me not in members:
            continue
        name = ",".join(map(str, members))
        seq = _SEQUENCE.get(name, 0) + 1
        _SEQUENCE[name] = seq
        key = f"{_PREFIX}/{name}/{seq}"
        store.set(f"{key}/{me}", f"{call}\n{outcome}")
        store.set(f"{_PREFIX}/{name}/last/{me}", f"{call} (meeting {seq})")
        keys = [f"{key}/{r}" for r in members]
        try:
            store.wait(keys, timedelta(seconds=wait))
        except Exception:  # noqa: BLE001 - DistStoreError / RuntimeError, by torch version
            error = _missing(store, name, key, members, me, call, seq, wait)
            # The meeting did not take place: withdraw from it, so that the ranks that never
            # came and this one still count their meetings alike.
            store.delete_key(f"{key}/{me}")
            _SEQUENCE[name] = seq - 1
            raise error from None
        values = [v.decode() for v in store.multi_get(keys)]
        calls = {r: v.split("\n", 1)[0] for r, v in zip(members, values)}
        if len(set(calls.values())) > 1:
            table = "; ".join(f"rank {r}: {c}" for r, c in calls.items())
            raise RanksDisagree(
                f"the ranks are in different optimizer calls ({table}): every rank of a process "
                f"group must make the same calls (step(), select(), clip_grad_norm_(), checkpoint "
                f"loads and saves) in the same order, or their collectives never match")
        for r, v in zip(members, values):
            posted[r] = v.split("\n", 1)[1]
        if seq > 1:  # everyone posted this meeting, so everyone has read the previous one
            store.delete_key(f"{_PREFIX}/{name}/{seq - 1}/{me}")
    return posted


def agree(call: str, groups: Iterable[Any], error: BaseException | None) -> None:
    """Make a refusal collective: meet (`together`), then, if any rank refused, raise one error
    on every rank: the lowest refusing rank's message, with the list of refusing ranks."""
    text = "" if error is None else f"{type(error).__name__}: {error}"
    posted = together(call, groups, outcome=text)
    refused = {r: t for r, t in sorted(posted.items()) if t}
    if not refused:
        if error is not None:
            raise error  # (one process: nobody to agree with)
        return
    first_rank, first = next(iter(refused.items()))
    kind, _, message = first.partition(": ")
    cls = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
    raise cls(f"{call} was refused on rank(s) {sorted(refused)} of {sorted(posted)}, so on "
              f"every rank: rank {first_rank}: {message}")


def _missing(store: Any, name: str, key: str, members: Sequence[int], me: int, call: str,
             seq: int, wait: float) -> RuntimeError:
    absent = [r for r in members if not store.check([f"{key}/{r}"])]
    lines = []
    for r in absent:
        last = f"{_PREFIX}/{name}/last/{r}"
        before = store.get(last).decode() if store.check([last]) else "none yet"
        lines.append(f"rank {r} (last optimizer call it met in: {before})")
    return RuntimeError(
        f"rank {me} waited {wait:g} s in {call} (meeting {seq} of ranks {list(members)}) for "
        f"{', '.join(lines)}: every rank must make the same optimizer calls (step(), select(), "
        f"clip_grad_norm_(), checkpoint loads and saves), or the collectives inside never "
        f"match and the job hangs. (GALLOP_RANKS_TIMEOUT_S sets how long a rank waits.)")
