"""Static cost report of the Triton kernels, compiled for real GPUs on a CPU-only machine.

    python -m benchmarks.static_costs [--arch 90] [--all] [--check] [--out benchmarks/results]

For each kernel variant the launchers emit (`gallop_kernels.ops._triton.compile_gate`, both
selection shapes; by default a representative set, ``--all`` for every variant) and each
architecture, with the *installed* Triton: registers, spills and local memory, shared memory,
static SASS instructions per element of the main loop (all paths, and the fastest path), what
runs more than once (the sample's skipped tiles, the step's binary search per its trip count),
the FFMA/fma counts that check the FP-fusion policy, the modelled bytes of a whole selection and
of the step, and the budgets of the shape this Triton runs. Output:
``static-costs-triton-<version>.json`` in ``--out``, and ``static-costs.md`` rebuilt from every
per-version file there (committed: run it once per Triton, `.ci/toolchains.sh` shows how;
a diff shows when a kernel gets more expensive on any version). ``--check`` exits 1 when a
budget of the shape this Triton runs is exceeded (CI). Needs no GPU; not under TRITON_INTERPRET.

How instructions per element are counted
----------------------------------------
* The cubin is disassembled with ``nvdisasm`` (in the triton wheel). Each ``/*addr*/`` line is
  one instruction.
* A loop is a backward branch (``BRA`` to a label at or before it); its body is every
  instruction from the label to the branch. The *main loop* is, among the loops whose body
  holds a global load (``LDG``), the innermost one with the most loads: the tile loop of a full
  pass, the chunk loop of a pass over candidate segments. Kernels without a data loop (the
  step: one block per program; the bucket choice) are counted over their whole body.
* ``static`` = instructions in the main loop's body, every path included (rare blocks too, e.g.
  the capture of a tile, the switch to the next tensor).
* ``fast`` = the shortest path from the loop head to its back edge through the body's
  control-flow graph (calls not followed): what an iteration costs when every guarded block is
  skipped, e.g. a tile that captures nothing. For passes whose per-element work sits in
  guarded blocks (pass 0's per-element histogram atomics, the write of a tile that takes
  entries) only ``static`` is meaningful.
* A SASS instruction is issued once per warp. One main-loop iteration handles ``E`` elements
  with ``num_warps`` warps (E = BLOCK entries of θ, g for a full pass, CBLOCK candidates for a
  segment loop, BLOCK selected entries for the step), so instructions per element =
  ``count * num_warps / E``: warp instructions issued per element.
* An H100 issues ~0.93 G warp instructions per ms (132 SMs x 4 schedulers x 1.755 GHz) and
  reads ~3.35 GB per ms, so a pass reading 4 bytes per entry is memory-bound below ~1.1
  instructions per entry. These are static counts, not timings.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

ARCHS = (80, 90, 100)

# ----------------------------------------------------------------------------------------------
# SASS analysis
# ----------------------------------------------------------------------------------------------

_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[\w$.]+):")
_TARGET = re.compile(r"`\((\.L_x_\d+|\$[\w$.]+)\)")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_on_file(data: bytes, suffix: str, argv: list[str]) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(data)
        path = f.name
    try:
        return subprocess.run([*argv, path], check=True, capture_output=True, text=True)
    finally:
        os.unlink(path)


def disassemble(cubin: bytes) -> str:
    return _run_on_file(cubin, ".cubin", [_tool("nvdisasm"), "-c"]).stdout


def ptxas_usage(ptx: str, arch: int, fp_fusion: bool) -> dict[str, int]:
    """Registers, spill stores/loads and stack from ``ptxas -v`` on the kernel's PTX, with the
    flags Triton's own ptxas call uses (``make_cubin``: -lineinfo, --fmad=false without FP
    fusion, --regAllocOptLevel=2)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    flags = ["-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", "-o", os.devnull]
    out = _run_on_file(ptx.encode(), ".ptx", [get_ptxas(arch).path, *flags])
    text = out.stdout + out.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


@dataclass
class Insn:
    text: str

    @property
    def opcode(self) -> str:
        body = self.text.split(None, 1)[1] if self.text.startswith("@") else self.text
        return body.split()[0] if body else ""

    @property
    def family(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def target(self) -> str | None:
        m = _TARGET.search(self.text)
        return m.group(1) if m else None


def parse(sass: str) -> tuple[list[Insn], dict[str, int]]:
    """Instructions in address order and label -> index of the next instruction."""
    insns: list[Insn] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        if lm := _LABEL.match(line):
            labels[lm.group(1)] = len(insns)
        elif m := _INSN.match(line):
            insns.append(Insn(m.group(2).rstrip(" ;")))
    return insns, labels


def _loops(insns, labels) -> list[tuple[int, int]]:
    return [(labels[i.target], j) for j, i in enumerate(insns)
            if i.family in ("BRA", "BRX", "JMP") and i.target in labels and labels[i.target] <= j]


def _loads(insns, lo, hi) -> int:
    return sum(1 for i in insns[lo: hi + 1] if i.family == "LDG")


def main_loop(insns, labels) -> tuple[int, int] | None:
    """The innermost loop holding global loads, the one with the most loads on a tie."""
    loops = [lh for lh in _loops(insns, labels) if _loads(insns, *lh)]
    inner = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
    return max(inner, key=lambda lh: (_loads(insns, *lh), lh[1] - lh[0]), default=None)


def shortest_path(insns, labels, lo: int, hi: int) -> int:
    """Fewest instructions from ``lo`` to ``hi`` (inclusive) through the control flow, branches
    leaving [lo, hi] and backward branches not followed."""
    dist = {lo: 1}
    heap = [(1, lo)]
    while heap:
        d, i = heapq.heappop(heap)
        if i == hi:
            return d
        if d > dist.get(i, 1 << 60):
            continue
        ins = insns[i]
        pred = ins.text.startswith("@")
        succ = []
        if ins.family in ("BRA", "BRX", "JMP"):
            t = labels.get(ins.target)
            if t is not None and i < t <= hi:
                succ.append(t)
            if pred or ins.family == "BRX":
                succ.append(i + 1)
        elif ins.family in ("EXIT", "RET"):
            if pred:
                succ.append(i + 1)
        else:
            succ.append(i + 1)
        for j in succ:
            if lo <= j <= hi and d + 1 < dist.get(j, 1 << 60):
                dist[j] = d + 1
                heapq.heappush(heap, (d + 1, j))
    return hi - lo + 1


def loop_costs(sass: str, whole_kernel: bool) -> dict:
    insns, labels = parse(sass)
    span = None if whole_kernel else main_loop(insns, labels)
    if span is None:
        end = max((j for j, i in enumerate(insns) if i.family == "EXIT"), default=len(insns) - 1)
        span = (0, end)
    lo, hi = span
    families: dict[str, int] = {}
    for i in insns[lo: hi + 1]:
        families[i.family] = families.get(i.family, 0) + 1
    return {"static": hi - lo + 1, "fast": shortest_path(insns, labels, lo, hi),
            "loop": not whole_kernel, "body_families": families,
            "kernel_total": len(insns), "ffma": sum(i.family == "FFMA" for i in insns),
            "local_memory_ops": sum(i.family in ("LDL", "STL") for i in insns),
            "vector_loads": sum(i.opcode.startswith("LDG.E.128") for i in insns[lo: hi + 1]),
            "atomics": sorted({i.opcode for i in insns if i.family in ("ATOM", "ATOMG", "RED", "REDG")})}


# ----------------------------------------------------------------------------------------------
# Which loop and how many elements per iteration, per kernel
# ----------------------------------------------------------------------------------------------


# elements one main-loop iteration handles (constexpr name); None: the whole kernel, per program
_ELEMENTS = {
    "histogram_kernel": "BLOCK", "capture_kernel": "BLOCK", "count_kernel": "BLOCK",
    "write_kernel": "BLOCK", "candidate_histogram_kernel": "BLOCK",
    "candidate_count_kernel": "CBLOCK", "candidate_write_kernel": "CBLOCK",
    "sparse_adamw_kernel": None, "choose_bucket_kernel": None, "choose_window_kernel": None,
    "window_check_kernel": None,
}
_UNIT = {"BLOCK": "entry", "CBLOCK": "candidate"}

# The selection's two code shapes (gallop_kernels/ops/select/launcher.py): which kernels belong
# to which, and which one a Triton runs (its feature test, `launcher.resolve_shape`).
RADIX, SAMPLED, BOTH = "radix", "sampled", "both"


def shape_of(launch) -> str:
    c, n = launch.constexprs, launch.name
    if n == "histogram_kernel":
        return RADIX if int(_cx(c.get("MODE", 0))) == 0 else SAMPLED
    if n == "capture_kernel":
        return SAMPLED if c.get("WINDOWED") else RADIX
    if n in ("choose_window_kernel", "window_check_kernel"):
        return SAMPLED
    if n == "choose_bucket_kernel":
        return SAMPLED if int(_cx(c.get("NEXT_DIGIT_MASK", 0))) else BOTH
    return BOTH


def _pass_name(launch) -> str:
    c = launch.constexprs
    n = launch.name
    if n == "histogram_kernel":
        mode = int(_cx(c.get("MODE", 0)))
        if mode == 1:
            return "sample histogram"
        if mode == 2:
            return "exact histogram after a miss (fallback)"
        return "filtered histogram (fallback)" if c["FILTER"] else "pass 0: histogram"
    if n == "capture_kernel" and c.get("WINDOWED"):
        return "window pass: capture or count"
    return {
        "capture_kernel": "pass 1: capture (filtered)",
        "candidate_histogram_kernel": "candidate histogram",
        "count_kernel": "counts from θ, g (fallback)",
        "candidate_count_kernel": "counts from candidates",
        "write_kernel": "write from θ, g (fallback)",
        "candidate_write_kernel": "write from candidates",
        "choose_bucket_kernel": "bucket choice",
        "choose_window_kernel": "window choice",
        "window_check_kernel": "window check",
        "sparse_adamw_kernel": "sparse step",
    }[n]


def _cx(v) -> str:
    return str(getattr(v, "value", v))


def variant_label(launch) -> str:
    c = {k: _cx(v) for k, v in launch.constexprs.items()}
    parts = []
    if "THETA_T" in c:
        score = {"0": "gallop", "1": "gradient", "2": "magnitude", "3": "random", "4": "precomputed"}[c["SCORE"]]
        parts.append(f"{score} θ={c['THETA_T']} g={c['G_T'] if c['HAS_G'] == 'True' else '-'}")
        parts.append("aligned" if c["ALIGNED"] == "True" else "unaligned")
        if c.get("FLOOR") == "True":
            parts.append("magnitude floor")
    if "P_T" in c:
        parts.append(f"{'8-bit' if c['STATE'] == '1' else 'fp32'} state p={c['P_T']} g={c['G_T']}"
                     f"{' master' if c['HAS_MASTER'] == 'True' else ''}"
                     f"{' compact-g' if c['COMPACT_GRAD'] == 'True' else ''}")
    if "IDX_T" in c:
        parts.append(f"idx {c['IDX_T']}")
    if "DIGIT_BITS" in c:
        parts.append(f"digit {c['DIGIT_BITS']}b@{c['SHIFT']}")
    if int(c.get("HI_MASK", "0")):
        parts.append(f"prefix of {bin(int(c['HI_MASK'])).count('1')} bits")
    return ", ".join(parts)


def representative(variants: dict) -> dict:
    """The variants the report lists by default: per kernel the gallop score with θ, g of one
    dtype (bf16, fp16, fp32), aligned, int32 indices, plus the unaligned bf16 and the signed
    (precomputed) variants, and the step's common configurations; both selection shapes."""
    keep = {}
    for key, launch in variants.items():
        c = {k: _cx(v) for k, v in launch.constexprs.items()}
        if "THETA_T" in c:
            same = c["THETA_T"] == c["G_T"] and c["HAS_G"] == "True" and c["SCORE"] == "0"
            ok = (same and (c["ALIGNED"] == "True" or c["THETA_T"] == "bf16")) or (
                c["SCORE"] == "4" and c["ALIGNED"] == "True")
            ok = ok and c.get("IDX_T", "int32") == "int32"
            if c.get("FLOOR") == "True":  # the floored launches: aligned bf16 only
                ok = ok and c["THETA_T"] == "bf16" and c["ALIGNED"] == "True"
        elif "P_T" in c:
            ok = (c["P_T"] == c["G_T"] and c["IDX_T"] == "int32"
                  and c["HAS_MASTER"] == ("True" if c["P_T"] != "fp32" else "False"))
        else:
            ok = c.get("IDX_T", "int32") == "int32"
        if ok:
            keep[key] = launch
    return keep


# ----------------------------------------------------------------------------------------------
# Modelled bytes
# ----------------------------------------------------------------------------------------------

SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
CAND = 8  # bytes per candidate (key << 16 | offset)
# Bytes per tile of the per-tile bookkeeping. "scans": the torch ops of
# `SelectionPlan.compact_counts` over the per-tile counts, read + written: the int64 copies of
# cnt_gt and cnt_eq (12 + 12), eq's cumsum and exclusive form (16 + 24), its padded copy (16),
# the owner of each tile (8), `within` (two gathers and a subtraction: 64), the quota gathered
# per tile (24), the ties (subtract, clamp, minimum: 64), take (24), its cumsum (16) and
# exclusive form (24) and padded copy (16): 320 B per tile (0.156 B per entry at BLOCK 2048).
TILE_META = {"capture": 12, "candidate count": 20, "scans": 320, "candidate write": 44}


@dataclass
class SelectionModel:
    """Bytes per entry of one selection, per pass (docs in the Markdown output)."""

    theta: str = "bf16"
    grad: str = "bf16"
    density: float = 0.01
    bucket: float = 0.00096  # fraction of N in the pass-0 bucket (11-bit digit)
    at_or_above: float = 0.01081  # fraction of N at or above it (captured)
    block: int = 2048
    shape: str = RADIX
    sample_stride: int = 16

    def passes(self) -> list[tuple[str, float]]:
        full = SIZE[self.theta] + SIZE[self.grad]
        c, tile = self.at_or_above, 1.0 / self.block
        if self.shape == RADIX:
            first = [("pass 0: histogram (θ, g)", full),
                     ("pass 1: capture (θ, g; candidates written)",
                      full + CAND * c + TILE_META["capture"] * tile)]
            levels = (1, 2)
        else:
            first = [(f"sample histogram (θ, g of every {self.sample_stride}th tile)",
                      full / self.sample_stride),
                     ("window pass: capture (θ, g; candidates written)",
                      full + CAND * c + TILE_META["capture"] * tile)]
            levels = (0, 1, 2)
        return first + [(f"candidate histogram, level {lv}", CAND * c) for lv in levels] + [
            ("counts from candidates", CAND * c + TILE_META["candidate count"] * tile),
            ("tie quota and scans (torch, per tile)", TILE_META["scans"] * tile),
            ("write from candidates (+ 4-byte indices)", CAND * c + TILE_META["candidate write"] * tile
             + 4 * self.density),
        ]

    def total(self) -> float:
        return sum(b for _, b in self.passes())


def old_selection_bytes(theta="bf16", grad="bf16", density=0.01) -> float:
    """The design before the capture buffer (commit 728dd6a): three radix passes over θ, g (the
    third capturing) and the write over θ, g, plus a small candidate pass."""
    return 4 * (SIZE[theta] + SIZE[grad]) + 4 * density


def step_bytes(state: str, master: bool, compact: bool, p="bf16", g="bf16", sector=32) -> dict:
    """Bytes per selected entry of the step: contiguous reads/writes of the state and sector
    traffic of the gathers (θ read and written, g read when dense) at densities where selected
    entries rarely share a 32-byte sector (~1%)."""
    contiguous = 4  # int32 index
    contiguous += 2 * (4 if state == "fp32" else 1) * 2  # m, v read and written
    if state == "8bit":
        contiguous += 2 * 2 * 4 / 256  # absmax per block, read and written
    if master:
        contiguous += 2 * 4
    gathers = 2 * sector + (SIZE[g] if compact else sector)
    return {"contiguous": contiguous, "gathered_sectors": gathers, "total": contiguous + gathers}


# ----------------------------------------------------------------------------------------------
# What runs: loop trip counts, the sample, the budgets
# ----------------------------------------------------------------------------------------------

H100_ISSUE_PER_BYTE = 0.93 / 3.35  # warp instructions the H100 issues per byte it reads (per ms)
SAMPLE_STRIDE = 16  # ops/select/launcher.py: SAMPLE_STRIDE (groups of >= 4096 tiles)
STEP_TENSORS = (1, 16, 224)  # tensors per step launch: one; a few; Llama-3-8B's 7 x 32 matrices


def log_slots(n: int) -> int:
    from gallop_kernels.ops._triton.launch import log_slots as trips

    return trips(n)


def search_loop_body(sass: str) -> int:
    """Instructions in the body of the step kernel's one runtime loop: `find_slot`'s binary
    search over the launch table (the 8-bit map search is unrolled)."""
    insns, labels = parse(sass)
    loops = _loops(insns, labels)
    return max((hi - lo + 1 for lo, hi in loops), default=0)


def budget_checks(rows: list[dict], runs_shape: str) -> list[dict]:
    """The instruction budgets of issue 20 on sm_90, aligned bf16 θ and g, gallop score:
    the first full pass <= 1.1 warp instructions per entry (radix: pass 0; sampled: the sample,
    per entry of the group), each filtered full pass <= 2.0 (radix: the capture pass and the
    filtered histograms; sampled: the window passes), no spills and 128-bit loads in each, and
    the step at its byte floor (issue-bound time <= memory time for its modelled bytes, with
    the binary search's real trip count for 224 tensors)."""
    out = []
    sm90 = [r for r in rows if r["arch"] == "sm_90"]

    def add(what, shape, r, value, limit):
        ok = value <= limit
        out.append({"check": what, "shape": shape, "runs_here": shape in (runs_shape, BOTH),
                    "pass": r["pass"], "variant": r["variant"], "value": round(value, 3),
                    "limit": round(limit, 3), "ok": ok,
                    "spills": r["spill_stores"] + r["spill_loads"],
                    "vector_loads": r["vector_loads"]})

    bf16 = [r for r in sm90 if r["variant"].startswith("gallop θ=bf16 g=bf16, aligned")
            and "magnitude floor" not in r["variant"]]
    for r in bf16:
        if r["pass"] == "pass 0: histogram":
            add("first full pass <= 1.1 / entry", RADIX, r, r["static_per_element"], 1.1)
        elif r["pass"] == "sample histogram" and "prefix" not in r["variant"]:
            add("first full pass <= 1.1 / entry", SAMPLED, r, r["per_entry"], 1.1)
        elif r["pass"] in ("pass 1: capture (filtered)", "filtered histogram (fallback)"):
            add("filtered full pass <= 2.0 / entry", RADIX, r, r["static_per_element"], 2.0)
        elif r["pass"] == "window pass: capture or count":
            add("filtered full pass <= 2.0 / entry", SAMPLED, r, r["static_per_element"], 2.0)
    floor = step_bytes("fp32", True, False)["total"] * H100_ISSUE_PER_BYTE
    for r in sm90:
        if (r["pass"], r["variant"]) == ("sparse step", "fp32 state p=bf16 g=bf16 master, idx int32"):
            add(f"step at its byte floor (<= {floor:.1f} / selected entry)", BOTH, r,
                r["per_entry_by_tensors"][str(STEP_TENSORS[-1])], floor)
    for c in out:  # no spills, 16-byte loads (full passes)
        loads = c["pass"] == "sparse step" or c["vector_loads"] > 0
        c["ok"] = c["ok"] and c["spills"] == 0 and loads
    return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def analyse(launch, arch: int) -> dict:
    from gallop_kernels.ops._triton.compile_gate import fp_policy_counts
    from gallop_kernels.ops._triton.launch import compile_for

    kernel = compile_for(launch, arch)
    sass = disassemble(kernel.asm["cubin"])
    elements_key = _ELEMENTS[launch.name]
    costs = loop_costs(sass, whole_kernel=elements_key is None)
    per = int(launch.constexprs["BLOCK"]) if elements_key is None and "BLOCK" in launch.constexprs \
        else int(launch.constexprs[elements_key]) if elements_key else None
    warps = launch.options["num_warps"]
    ptx = kernel.asm["ptx"]
    row = {
        "kernel": launch.name, "pass": _pass_name(launch), "shape": shape_of(launch),
        "variant": variant_label(launch),
        "arch": f"sm_{arch}", "constexprs": {k: _cx(v) for k, v in launch.constexprs.items()},
        "options": launch.options, "shared_bytes": kernel.metadata.shared,
        **ptxas_usage(ptx, arch, launch.options["enable_fp_fusion"]), **costs,
        **fp_policy_counts(ptx),
        "ptx_div_rn": len(re.findall(r"\bdiv\.rn\.f32\b", ptx)),
        "ptx_sqrt_rn": len(re.findall(r"\bsqrt\.rn\.f32\b", ptx)),
        "ptx_atomics": sorted(set(re.findall(r"\b(?:atom|red)\.[\w.]+", ptx))),
    }
    if per:
        row["elements_per_iteration"] = per
        row["unit"] = "candidate" if launch.name.startswith("candidate_") else _UNIT.get(
            elements_key, "selected entry")
        row["static_per_element"] = round(costs["static"] * warps / per, 3)
        row["fast_per_element"] = round(costs["fast"] * warps / per, 3)
    if row["pass"] == "sample histogram":  # a sampled tile costs the body, the others the skip
        skipped = (SAMPLE_STRIDE - 1) * row["fast_per_element"]
        row["per_entry"] = round((row["static_per_element"] + skipped) / SAMPLE_STRIDE, 3)
    if launch.name == "sparse_adamw_kernel":  # the binary search runs log_slots(T) times
        body = search_loop_body(sass)
        row["search_loop_body"] = body
        row["per_entry_by_tensors"] = {
            str(t): round((costs["static"] + (log_slots(t) - 1) * body) * warps / per, 3)
            for t in STEP_TENSORS}
    return row


def fusion_check(variants: dict, arch: int = 90) -> list[dict]:
    """The step kernels compiled with the policy (enable_fp_fusion=False) and without it: SASS
    FFMA count, explicit PTX fma, and PTX float mul/add that ptxas may contract."""
    import dataclasses

    from gallop_kernels.ops._triton.compile_gate import fp_policy_counts
    from gallop_kernels.ops._triton.launch import compile_for

    out = []
    for launch in variants.values():
        if launch.name != "sparse_adamw_kernel" or variant_label(launch) not in (
                "fp32 state p=bf16 g=bf16 master, idx int32", "8-bit state p=bf16 g=bf16 master, idx int32"):
            continue
        for fusion in (False, True):
            lf = dataclasses.replace(launch, options={**launch.options, "enable_fp_fusion": fusion})
            kernel = compile_for(lf, arch)
            insns, _ = parse(disassemble(kernel.asm["cubin"]))
            out.append({"variant": variant_label(launch), "enable_fp_fusion": fusion,
                        "arch": f"sm_{arch}", "sass_ffma": sum(i.family == "FFMA" for i in insns),
                        **fp_policy_counts(kernel.asm["ptx"])})
    return out


def _work(item):
    key, arch = item
    return analyse(_VARIANTS[key], arch)


_VARIANTS: dict = {}


def version_file(version: str) -> str:
    return f"static-costs-triton-{version}.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--all", action="store_true", help="every variant, not the representative set")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every budget of the shape this Triton runs holds")
    parser.add_argument("--budget-only", action="store_true",
                        help="only the variants the budgets read (CI: seconds, not minutes)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite static-costs.md from the per-version JSON files in --out")
    args = parser.parse_args(argv)
    if not args.markdown_only:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("static_costs: unset TRITON_INTERPRET", file=sys.stderr)
            return 2
        report = measure(args.arch, args.all, args.jobs, args.budget_only)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, version_file(report["triton"]))
        with open(path, "w") as f:
            json.dump(report, f, indent=1, sort_keys=False)
            f.write("\n")
        print(f"wrote {len(report['rows'])} rows to {path}")
    reports = load_reports(args.out)
    with open(os.path.join(args.out, "static-costs.md"), "w") as f:
        f.write(markdown(reports))
    if args.check and not args.markdown_only:
        failed = [c for c in report["budgets"] if c["runs_here"] and not c["ok"]]
        for c in report["budgets"]:
            print(f"triton {report['triton']} [{c['shape']}] {c['check']}: {c['pass']} "
                  f"({c['variant']}) = {c['value']} (spills {c['spills']}, 16-B loads "
                  f"{c['vector_loads']}): {'ok' if c['ok'] else 'OVER'}"
                  f"{'' if c['runs_here'] else ' (shape not run on this triton)'}")
        return 1 if failed else 0
    return 0


def measure(archs, every: bool, jobs: int, budget_only: bool = False) -> dict:
    """Compile and analyse the variants for ``archs`` with the installed Triton."""
    from gallop_kernels.ops._triton.compile_gate import variants
    from gallop_kernels.ops._triton.launch import histogram_uses_ballots

    everything = variants()
    chosen = everything if every else representative(everything)
    if budget_only:
        chosen = {k: la for k, la in chosen.items() if _budget_variant(la)}
    _VARIANTS.update(chosen)
    items = [(k, a) for a in archs for k in _VARIANTS]
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_work, items)
    else:
        rows = [_work(i) for i in items]
    rows.sort(key=lambda r: (r["arch"], _ORDER.index(r["pass"]), r["shape"], r["variant"]))
    ballots = histogram_uses_ballots(90)
    report = build_report(rows, SAMPLED if ballots else RADIX, ballots)
    report["fp_fusion_check"] = fusion_check(_VARIANTS)
    return report


def _budget_variant(launch) -> bool:
    label, name = variant_label(launch), _pass_name(launch)
    if name == "sparse step":
        return label == "fp32 state p=bf16 g=bf16 master, idx int32"
    return label.startswith("gallop θ=bf16 g=bf16, aligned") and "floor" not in label and name in (
        "pass 0: histogram", "sample histogram", "pass 1: capture (filtered)",
        "filtered histogram (fallback)", "window pass: capture or count")


def load_reports(folder: str) -> list[dict]:
    """Every per-version report in ``folder``, oldest Triton first."""
    import glob

    reports = []
    for path in glob.glob(os.path.join(folder, "static-costs-triton-*.json")):
        with open(path) as f:
            reports.append(json.load(f))
    key = lambda r: tuple(int(x) for x in re.findall(r"\d+", r["triton"])[:3])  # noqa: E731
    return sorted(reports, key=key)


# Measured with this script's counting rules at commit 120fcda (before issue 20: the pointer
# hints set on a helper's return value, bf16 widened by a bitcast, one code shape), sm_90,
# aligned bf16 θ and g, gallop score: registers, spill bytes, static and fast warp
# instructions per element, 16-byte loads in the loop.
BEFORE_120FCDA = {
    "3.6.0": {"pass 0: histogram": (255, 0, 7.986, 7.793, 0),
              "pass 1: capture (filtered)": (136, 0, 2.891, 1.252, 0),
              "filtered histogram (fallback)": (168, 0, 5.73, 1.119, 0),
              "counts from θ, g (fallback)": (80, 0, 1.459, 1.268, 0),
              "write from θ, g (fallback)": (127, 0, 4.203, 0.088, 0),
              "sparse step": (76, 0, 3.52, 2.371, 0)},
    "3.7.1": {"pass 0: histogram": (255, 0, 7.986, 7.793, 0),
              "pass 1: capture (filtered)": (128, 4, 2.922, 1.281, 0),
              "filtered histogram (fallback)": (168, 0, 5.73, 1.119, 0),
              "counts from θ, g (fallback)": (80, 0, 1.463, 1.273, 0),
              "write from θ, g (fallback)": (127, 0, 4.201, 0.088, 0),
              "sparse step": (76, 0, 3.52, 2.371, 0)},
    "3.8.0": {"pass 0: histogram": (127, 0, 1.27, 0.576, 0),
              "pass 1: capture (filtered)": (116, 0, 2.744, 1.139, 0),
              "filtered histogram (fallback)": (96, 0, 1.402, 0.918, 0),
              "counts from θ, g (fallback)": (64, 8, 1.393, 1.201, 0),
              "write from θ, g (fallback)": (96, 0, 4.426, 0.088, 0),
              "sparse step": (76, 0, 3.516, 2.367, 0)},
    "3.9.0": {"pass 0: histogram": (77, 0, 0.979, 0.197, 4),
              "pass 1: capture (filtered)": (117, 0, 1.963, 0.842, 4),
              "filtered histogram (fallback)": (79, 0, 1.246, 0.766, 4),
              "counts from θ, g (fallback)": (61, 0, 1.029, 0.84, 4),
              "write from θ, g (fallback)": (80, 0, 3.264, 0.07, 4),
              "sparse step": (114, 0, 3.777, 2.629, 0)},
}
# the row each "before" line is compared with (the same pass and variant, digit 10b@10 for the
# filtered histogram)
_BEFORE_VARIANT = {
    "pass 0: histogram": "gallop θ=bf16 g=bf16, aligned, digit 11b@20",
    "pass 1: capture (filtered)": "gallop θ=bf16 g=bf16, aligned, prefix of 11 bits",
    "filtered histogram (fallback)": "gallop θ=bf16 g=bf16, aligned, digit 10b@10, prefix of 11 bits",
    "counts from θ, g (fallback)": "gallop θ=bf16 g=bf16, aligned",
    "write from θ, g (fallback)": "gallop θ=bf16 g=bf16, aligned, idx int32",
    "sparse step": "fp32 state p=bf16 g=bf16 master, idx int32",
}

_ORDER = ["sample histogram", "window choice", "window pass: capture or count", "window check",
          "exact histogram after a miss (fallback)",
          "pass 0: histogram", "pass 1: capture (filtered)", "candidate histogram", "bucket choice",
          "counts from candidates", "write from candidates", "filtered histogram (fallback)",
          "counts from θ, g (fallback)", "write from θ, g (fallback)", "sparse step"]


def build_report(rows: list[dict], runs_shape: str, ballots: bool) -> dict:
    import triton

    models = {}
    for shape in (RADIX, SAMPLED):
        for dt in ("bf16", "fp16", "fp32"):
            m = SelectionModel(theta=dt, grad=dt, shape=shape)
            models[f"{shape} {dt}"] = {"passes": m.passes(), "total": m.total(),
                                       "old_design_total": old_selection_bytes(dt, dt)}
    steps = {f"{s} state, {'master' if mw else 'no master'}, {'compact' if c else 'dense'} grad":
             step_bytes(s, mw, c) for s in ("fp32", "8bit") for mw in (True, False) for c in (False, True)}
    return {
        "triton": triton.__version__,
        "histogram_uses_ballots": ballots,
        "shape": runs_shape,
        "counting": "warp instructions issued per element of the main loop (see the module docstring)",
        "selection_model": {"assumptions": asdict(SelectionModel()), "N": 8e9,
                            "by_shape_dtype": models},
        "step_model_bytes_per_selected_entry": steps,
        "budgets": budget_checks(rows, runs_shape),
        "rows": rows,
    }


def _fmt(r: dict) -> tuple[str, str]:
    se = f"{r['static_per_element']:.2f}" if "static_per_element" in r else f"{r['static']} total"
    fe = f"{r['fast_per_element']:.2f}" if "fast_per_element" in r else f"{r['fast']} total"
    return se, fe


def markdown(reports: list[dict]) -> str:
    versions = ", ".join(r["triton"] for r in reports)
    out = ["# Static costs of the Triton kernels, per Triton version (compiled ahead of time, "
           "no GPU)",
           "",
           f"Generated by `python -m benchmarks.static_costs` once per Triton ({versions}; "
           "`.ci/toolchains.sh` makes a venv per version beside the CPU torch wheel). "
           "Instructions per element = warp instructions issued per element of the main loop, "
           "sm_90: `static` counts every path of the loop body, `fast` the shortest path (an "
           "iteration whose guarded blocks are all skipped, e.g. a tile that captures nothing). "
           "Counting rules: module docstring of `benchmarks/static_costs.py`. Static counts, not "
           "timings: an H100 issues ~0.93 G warp instructions and reads ~3.35 GB per ms, so a "
           "pass reading 4 bytes per entry is memory-bound below ~1.1 instructions per entry.", ""]
    out += ["## Budgets (sm_90, aligned bf16 θ and g, gallop score)", "",
            "Each Triton runs the selection shape its feature test picks (`histogram uses "
            "ballots`: tl.histogram lowered through warp ballots, at a cost growing with the bins, "
            "picks the sampled shape; see `docs/design.md#kernels`). Checked in CI for the shape "
            "a version runs (`--check`); the other shape's rows are shown for comparison.", "",
            "| triton | ballots | runs | check | shape | pass (variant) | value | limit | spills | "
            "16-B loads | ok |", "|---|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for rep in reports:
        for c in rep["budgets"]:
            run = "**yes**" if c["runs_here"] else "no"
            out.append(f"| {rep['triton']} | {rep['histogram_uses_ballots']} | {run} | {c['check']} | "
                       f"{c['shape']} | {c['pass']} ({c['variant']}) | {c['value']} | {c['limit']} | "
                       f"{c['spills']} | {c['vector_loads']} | {'ok' if c['ok'] else '**over**'} |")
    out += ["", "## Before and after, per version (sm_90, aligned bf16 θ and g, gallop score)", "",
            "Before: commit 120fcda, one code shape (the radix passes), measured with the same rules "
            "(regs / spill bytes / static / fast per element / 16-byte loads). After: the same rows "
            "today (the radix shape's rows; where a version runs the sampled shape its own rows "
            "are in the budget table above). The step reads the param at every step since the "
            "master copy resyncs from a param changed from outside (a merged change, not this "
            "report's): about +0.6 per selected entry on every version.", "",
            "| triton | pass | before | after |", "|---|---|---|---|"]
    for rep in reports:
        before = BEFORE_120FCDA.get(rep["triton"], {})
        after = {(r["pass"], r["variant"]): r for r in rep["rows"] if r["arch"] == "sm_90"
                 and r["shape"] in (RADIX, BOTH)}
        for name, b in before.items():
            r = after.get((name, _BEFORE_VARIANT[name]))
            if r is None:
                continue
            se, fe = _fmt(r)
            out.append(f"| {rep['triton']} | {name} | {b[0]} / {b[1]} / {b[2]} / {b[3]} / {b[4]} | "
                       f"{r['registers']} / {r['spill_stores']} / {se} / {fe} / {r['vector_loads']} |")
    newest = reports[-1] if reports else None
    if newest is not None:
        out += _bytes_section(newest) + _step_section(reports) + _fusion_section(newest)
    for rep in reports:
        out += ["", f"## Per kernel variant, triton {rep['triton']} (runs the {rep['shape']} "
                "shape)", "",
                "| arch | shape | pass | kernel variant | regs | spill st/ld (B) | smem (B) "
                "| static / el | fast / el | unit | 16-B loads | atomics |",
                "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
        for r in rep["rows"]:
            se, fe = _fmt(r)
            if "per_entry" in r:
                se += f" ({r['per_entry']:.2f} / entry)"
            atom = " ".join(a for a in r["ptx_atomics"] if ".shared." not in a) or "-"
            out.append(f"| {r['arch']} | {r['shape']} | {r['pass']} | {r['variant']} | "
                       f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                       f"{r['shared_bytes']} | {se} | {fe} | {r.get('unit', 'program')} | "
                       f"{r['vector_loads']} | {atom} |")
    out.append("")
    return "\n".join(out)


def _bytes_section(report: dict) -> list[str]:
    sel = report["selection_model"]
    a = sel["assumptions"]
    out = ["", "## Modelled bytes per entry of a typical whole selection (N = 8e9, ρ = 1%)", "",
           f"Typical path: the level-0 bucket (11-bit digit) holds {a['bucket']:.3%} of N and "
           f"{a['at_or_above']:.3%} of N lie at or above it, which fits the candidate buffer "
           "(k + N/256), so one full pass captures every selectable entry and nothing after it "
           "reads θ or g. Radix shape: pass 0 histograms every entry, pass 1 captures (2 full "
           f"passes). Sampled shape: the level-0 histogram of every {a['sample_stride']}th tile "
           "points at the range to capture, the window pass captures it and counts exactly, the "
           "level-0 histogram is then taken over the candidates (1 + 1/16 full passes). The "
           "fractions were measured on SmolLM2-135M-Instruct's real gradients (gallop score, "
           "ρ = 1%, one batch of 8 short texts; gradient score: 0.19% / 1.17%; magnitude: 0.10% / "
           f"1.07%). Per-tile terms use BLOCK = {a['block']}; the tie quota's torch scans move "
           "320 B per tile (listed where `TILE_META` is defined).", ""]
    for name, m in sel["by_shape_dtype"].items():
        out += [f"{name}: **{m['total']:.2f} B/entry** (commit 728dd6a: {m['old_design_total']:.2f})",
                "", "| pass | B/entry |", "|---|---:|"]
        out += [f"| {p} | {b:.3f} |" for p, b in m["passes"]]
        out.append("")
    out += ["Fallbacks (decided on the device): if only the bucket fits the buffer, the write "
            "reads θ, g once more; if not even the bucket fits, the next level reads θ, g again "
            "(radix: a filtered histogram; sampled: a sample and a window pass that counts the "
            "guessed digit; a wrong guess adds the level's exact histogram). All-tied or extremely "
            "concentrated scores take up to 5 full passes."]
    return out


def _step_section(reports: list[dict]) -> list[str]:
    out = ["", "## The sparse step per selected entry, with the binary search's trip count", "",
           "One program updates BLOCK selected entries of one tensor; it first finds its tensor "
           "in the launch table by a binary search that runs `log_slots(T)` = ceil(log2 T) + 1 "
           "times for T tensors in the launch (0 for one). The static count holds its body once; "
           "the columns below count it as often as it runs. Byte floor: "
           f"{step_bytes('fp32', True, False)['total']:.0f} "
           "B per selected entry (fp32 state, master, dense bf16 gradient, below) x "
           f"{H100_ISSUE_PER_BYTE:.3f} warp instructions per byte = the most instructions that "
           "keep it memory-bound.", "",
           "| triton | variant | search body | " + " | ".join(f"T = {t}" for t in STEP_TENSORS) + " |",
           "|---|---|---:|" + "---:|" * len(STEP_TENSORS)]
    for rep in reports:
        for r in rep["rows"]:
            if r["pass"] == "sparse step" and r["arch"] == "sm_90":
                per = r["per_entry_by_tensors"]
                out.append(f"| {rep['triton']} | {r['variant']} | {r['search_loop_body']} | "
                           + " | ".join(f"{per[str(t)]:.2f}" for t in STEP_TENSORS) + " |")
    out += ["", "Modelled bytes per selected entry: contiguous state traffic plus 32-byte sectors "
            "for the gathers (θ read and written, g read when dense) at densities where selected "
            "entries rarely share a sector.", "",
            "| configuration | contiguous | gathered sectors | total |", "|---|---:|---:|---:|"]
    for name, b in reports[-1]["step_model_bytes_per_selected_entry"].items():
        out.append(f"| {name} | {b['contiguous']:.2f} | {b['gathered_sectors']} | {b['total']:.2f} |")
    return out


def _fusion_section(report: dict) -> list[str]:
    out = ["", f"## FP-fusion policy, checked in the compiled step (triton {report['triton']})", "",
           "Every launch passes `enable_fp_fusion=False`: Triton then emits `.rn` on every float "
           "multiply and add (PTX forbids contracting those) and runs ptxas with `--fmad=false`. "
           "The only `fma.rn.f32` are the two `tl.fma` per element (m and v, where torch's CPU "
           "kernels fuse); every other SASS FFMA sits inside the IEEE `div.rn`/`sqrt.rn` "
           "sequences. Compiled with fusion on, the same kernel contracts `w·decay + ...`:", "",
           "| variant | enable_fp_fusion | SASS FFMA | PTX fma.rn | PTX contractable mul/add |",
           "|---|---|---:|---:|---:|"]
    for r in report.get("fp_fusion_check", []):
        out.append(f"| {r['variant']} ({r['arch']}) | {r['enable_fp_fusion']} | {r['sass_ffma']} | "
                   f"{r['ptx_fma']} | {r['ptx_contractable']} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
