"""Static analysis of compiled kernels: resource usage and SASS instruction counts (no GPU).

Used by `benchmarks/static_costs.py` and the compile gate's FP-fusion check. The tools
(``cuobjdump``, ``nvdisasm``) ship inside the triton wheel (``triton/backends/nvidia/bin``).

How instructions per element are counted (the report's ``ipe`` columns):

* The SASS of the kernel is split into instructions (one per ``/*addr*/`` line) and labels.
* A loop is a backward branch (``BRA`` to a label at or before it); its body is every
  instruction from the label to the branch. The *main loop* is the loop with the most global
  loads (``LDG``) in its body, the smallest such on a tie (the tile loop; a nested loop, e.g. the
  walk to the next tensor's row, lies inside it).
* ``static`` = instructions in the main loop's body (every path, rare ones included).
* ``fast`` = instructions on the shortest path from the loop head to its back edge through the
  body's control-flow graph (branches taken or not, calls skipped): what a tile executes when
  every guarded block is skipped, e.g. a tile that captures nothing and matches no prefix.
* A SASS instruction is issued once per warp, and one iteration of the main loop handles
  ``BLOCK`` elements with ``num_warps`` warps, so instructions per element =
  ``count * num_warps / BLOCK`` (warp instructions issued per element). A kernel without a loop
  (one block per program) is counted over its whole body the same way.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[\w$.]+):")
_TARGET = re.compile(r"`\((\.L_x_\d+|\$[\w$.]+)\)")


def tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _with_cubin(cubin: bytes, args: list[str], name: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([tool(name), *args, path], check=True, capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(path)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, spill stores/loads (bytes), local stack and static shared memory per kernel."""
    out = _with_cubin(cubin, ["--dump-resource-usage"], "cuobjdump")
    usage = {}
    for key, name in (("REG", "registers"), ("STACK", "stack"), ("SHARED", "shared"),
                      ("LOCAL", "local")):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[name] = int(m.group(1)) if m else 0
    return usage


def disassemble(cubin: bytes) -> str:
    return _with_cubin(cubin, ["-c"], "nvdisasm")


@dataclass
class Insn:
    addr: int
    text: str

    @property
    def opcode(self) -> str:
        body = self.text
        if body.startswith("@"):
            body = body.split(None, 1)[1] if " " in body else body
        return body.split()[0] if body else ""

    @property
    def predicated(self) -> bool:
        return self.text.startswith("@")

    @property
    def target(self) -> str | None:
        m = _TARGET.search(self.text)
        return m.group(1) if m else None


def parse(sass: str) -> tuple[list[Insn], dict[str, int]]:
    """Instructions in address order and label -> index of the next instruction."""
    insns: list[Insn] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        lm = _LABEL.match(line)
        if lm:
            labels[lm.group(1)] = len(insns)
            continue
        m = _INSN.match(line)
        if m:
            insns.append(Insn(int(m.group(1), 16), m.group(2).rstrip(" ;")))
    return insns, labels


def _is_branch(op: str) -> bool:
    return op.split(".")[0] in ("BRA", "BRX", "JMP")


def loops(insns: list[Insn], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(head index, back-edge index) of every backward branch."""
    out = []
    for i, ins in enumerate(insns):
        if _is_branch(ins.opcode) and ins.target in labels and labels[ins.target] <= i:
            out.append((labels[ins.target], i))
    return out


def _count(insns, lo, hi, prefix) -> int:
    return sum(1 for ins in insns[lo: hi + 1] if ins.opcode.startswith(prefix))


def main_loop(insns, labels) -> tuple[int, int] | None:
    cands = loops(insns, labels)
    if not cands:
        return None
    best = max(cands, key=lambda lh: (_count(insns, *lh, "LDG"), -(lh[1] - lh[0])))
    return best if _count(insns, *best, "LDG") else None


def shortest_path(insns, labels, lo: int, hi: int) -> int:
    """Fewest instructions from ``lo`` to the back edge at ``hi`` (inclusive) through the body's
    control flow; inner back edges and calls are not followed (a skipped call costs its CALL)."""
    import heapq

    # Dijkstra over instruction indices; cost = instructions executed.
    dist = {lo: 1}
    heap = [(1, lo)]
    while heap:
        d, i = heapq.heappop(heap)
        if i == hi:
            return d
        if d > dist.get(i, 1 << 60):
            continue
        ins = insns[i]
        op = ins.opcode
        succ = []
        base = op.split(".")[0]
        if _is_branch(op):
            t = labels.get(ins.target)
            if t is not None and i < t <= hi:
                succ.append(t)
            if ins.predicated or base == "BRX":
                succ.append(i + 1)
        elif base in ("EXIT", "RET"):
            if ins.predicated:
                succ.append(i + 1)
        else:
            succ.append(i + 1)
        for j in succ:
            if lo <= j <= hi and d + 1 < dist.get(j, 1 << 60):
                dist[j] = d + 1
                heapq.heappush(heap, (d + 1, j))
    return hi - lo + 1  # no path found (should not happen): fall back to the static count


@dataclass
class LoopCosts:
    static: int  # instructions in the main loop's body (or the whole kernel without a loop)
    fast: int  # shortest path through it
    has_loop: bool
    opcodes: dict[str, int]  # opcode family -> count in the body


def loop_costs(sass: str) -> LoopCosts:
    insns, labels = parse(sass)
    ml = main_loop(insns, labels)
    if ml is None:
        end = max((i for i, ins in enumerate(insns) if ins.opcode.startswith("EXIT")), default=len(insns) - 1)
        lo, hi, has_loop = 0, end, False
        fast = shortest_path(insns, labels, lo, hi)
    else:
        lo, hi = ml
        has_loop = True
        fast = shortest_path(insns, labels, lo, hi)
    fam: dict[str, int] = {}
    for ins in insns[lo: hi + 1]:
        f = ins.opcode.split(".")[0]
        fam[f] = fam.get(f, 0) + 1
    return LoopCosts(hi - lo + 1, fast, has_loop, fam)


def count_opcodes(sass: str, prefix: str) -> int:
    insns, _ = parse(sass)
    return sum(1 for ins in insns if ins.opcode.split(".")[0] == prefix)
