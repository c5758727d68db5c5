"""Static cost report of the Triton kernels, compiled for real GPUs on a CPU-only machine.

    python -m benchmarks.static_costs [--arch 80 90 100] [--all] [--out benchmarks/results]

For each kernel variant the launchers emit (`gallop_kernels.ops._triton.compile_gate`; by default a
representative set, ``--all`` for every variant) and each architecture it writes: registers,
spills and local memory, shared memory, static SASS instructions per element of the main loop
(all paths, and the fastest path), the FFMA/fma counts that check the FP-fusion policy, and
the modelled bytes per entry of each pass, of a typical whole selection and of the step. Output:
``static-costs.json`` and ``static-costs.md`` in ``--out`` (committed: a diff shows when a kernel
gets more expensive). Needs no GPU; must run without TRITON_INTERPRET.

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
    "sparse_adamw_kernel": None, "choose_bucket_kernel": None,
}
_UNIT = {"BLOCK": "entry", "CBLOCK": "candidate"}


def _pass_name(launch) -> str:
    c = launch.constexprs
    n = launch.name
    if n == "histogram_kernel":
        return "filtered histogram (fallback)" if c["FILTER"] else "pass 0: histogram"
    return {
        "capture_kernel": "pass 1: capture (filtered)",
        "candidate_histogram_kernel": "candidate histogram",
        "count_kernel": "counts from θ, g (fallback)",
        "candidate_count_kernel": "counts from candidates",
        "write_kernel": "write from θ, g (fallback)",
        "candidate_write_kernel": "write from candidates",
        "choose_bucket_kernel": "bucket choice",
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
    (precomputed) variants, and the step's common configurations."""
    keep = {}
    for key, launch in variants.items():
        c = {k: _cx(v) for k, v in launch.constexprs.items()}
        if "THETA_T" in c:
            same = c["THETA_T"] == c["G_T"] and c["HAS_G"] == "True" and c["SCORE"] == "0"
            ok = (same and (c["ALIGNED"] == "True" or c["THETA_T"] == "bf16")) or (
                c["SCORE"] == "4" and c["ALIGNED"] == "True")
            ok = ok and c.get("IDX_T", "int32") == "int32"
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
TILE_META = {"capture": 12, "candidate count": 20, "scans": 96, "candidate write": 44}


@dataclass
class SelectionModel:
    """Bytes per entry of one selection, per pass (docs in the Markdown output)."""

    theta: str = "bf16"
    grad: str = "bf16"
    density: float = 0.01
    bucket: float = 0.00096  # fraction of N in the pass-0 bucket (11-bit digit)
    at_or_above: float = 0.01081  # fraction of N at or above it (captured)
    block: int = 2048

    def passes(self) -> list[tuple[str, float]]:
        full = SIZE[self.theta] + SIZE[self.grad]
        c, tile = self.at_or_above, 1.0 / self.block
        return [
            ("pass 0: histogram (θ, g)", full),
            ("pass 1: capture (θ, g; candidates written)", full + CAND * c + TILE_META["capture"] * tile),
            ("candidate histogram, level 1", CAND * c),
            ("candidate histogram, level 2", CAND * c),
            ("counts from candidates", CAND * c + TILE_META["candidate count"] * tile),
            ("tie quota and scans (torch, per tile)", TILE_META["scans"] * tile),
            ("write from candidates (+ 4-byte indices)", CAND * c + TILE_META["candidate write"] * tile
             + 4 * self.density),
        ]

    def total(self) -> float:
        return sum(b for _, b in self.passes())


def old_selection_bytes(theta="bf16", grad="bf16", density=0.01) -> float:
    """The design before this report (commit 728dd6a): three radix passes over θ, g (the third
    capturing) and the write over θ, g, plus a small candidate pass."""
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
        "kernel": launch.name, "pass": _pass_name(launch), "variant": variant_label(launch),
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--all", action="store_true", help="every variant, not the representative set")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite static-costs.md from the existing static-costs.json")
    args = parser.parse_args(argv)
    if args.markdown_only:
        with open(os.path.join(args.out, "static-costs.json")) as f:
            report = json.load(f)
        with open(os.path.join(args.out, "static-costs.md"), "w") as f:
            f.write(markdown(report))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("static_costs: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    from gallop_kernels.ops._triton.compile_gate import variants

    everything = variants()
    _VARIANTS.update(everything if args.all else representative(everything))
    items = [(k, a) for a in args.arch for k in _VARIANTS]
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            rows = pool.map(_work, items)
    else:
        rows = [_work(i) for i in items]
    rows.sort(key=lambda r: (r["arch"], _ORDER.index(r["pass"]), r["variant"]))
    report = build_report(rows)
    report["fp_fusion_check"] = fusion_check(_VARIANTS)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "static-costs.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=False)
        f.write("\n")
    with open(os.path.join(args.out, "static-costs.md"), "w") as f:
        f.write(markdown(report))
    print(f"wrote {len(rows)} rows to {args.out}/static-costs.{{json,md}}")
    return 0


# Measured with this script's counting rules on commit 728dd6a (sm_90, bf16 θ and g, gallop
# score, BLOCK 1024): (name, (registers, static per entry, fast per entry), row it became).
BEFORE_SM90 = [
    ("pass 0: histogram", (55, 1.57, 1.34),
     ("pass 0: histogram", "gallop θ=bf16 g=bf16, aligned, digit 11b@20")),
    ("filtered pass (histogram + capture machinery on every tile)", (94, 3.70, 3.12),
     ("pass 1: capture (filtered)", "gallop θ=bf16 g=bf16, aligned, prefix of 11 bits")),
    ("filtered histogram (now the fallback)", (94, 3.70, 3.12),
     ("filtered histogram (fallback)", "gallop θ=bf16 g=bf16, aligned, digit 10b@10, prefix of 11 bits")),
    ("counts over θ, g (now the fallback)", (52, 1.39, 1.24),
     ("counts from θ, g (fallback)", "gallop θ=bf16 g=bf16, aligned")),
    ("write over θ, g (now the fallback)", (52, 4.31, 4.07),
     ("write from θ, g (fallback)", "gallop θ=bf16 g=bf16, aligned, idx int32")),
    ("sparse step, fp32 state (per selected entry)", (114, 3.13, 2.65),
     ("sparse step", "fp32 state p=bf16 g=bf16 master, idx int32")),
]

_ORDER = ["pass 0: histogram", "pass 1: capture (filtered)", "candidate histogram", "bucket choice",
          "counts from candidates", "write from candidates", "filtered histogram (fallback)",
          "counts from θ, g (fallback)", "write from θ, g (fallback)", "sparse step"]


def build_report(rows: list[dict]) -> dict:
    import triton

    typical = SelectionModel()
    models = {}
    for dt in ("bf16", "fp16", "fp32"):
        m = SelectionModel(theta=dt, grad=dt)
        models[dt] = {"passes": m.passes(), "total": m.total(), "full_passes_over_theta_g": 2,
                      "old_design_total": old_selection_bytes(dt, dt)}
    steps = {f"{s} state, {'master' if mw else 'no master'}, {'compact' if c else 'dense'} grad":
             step_bytes(s, mw, c) for s in ("fp32", "8bit") for mw in (True, False) for c in (False, True)}
    return {
        "triton": triton.__version__,
        "counting": "warp instructions issued per element of the main loop (see the module docstring)",
        "selection_model": {"assumptions": asdict(typical), "N": 8e9, "by_dtype": models},
        "step_model_bytes_per_selected_entry": steps,
        "rows": rows,
    }


def markdown(report: dict) -> str:
    out = ["# Static costs of the Triton kernels (compiled ahead of time, no GPU)", "",
           f"Generated by `python -m benchmarks.static_costs` (triton {report['triton']}). "
           "Instructions per element = warp instructions issued per element of the main loop: "
           "`static` counts every path of the loop body, `fast` the shortest path (an iteration "
           "whose guarded blocks are all skipped, e.g. a tile that captures nothing). Counting "
           "rules: module docstring of `benchmarks/static_costs.py`. Static counts, not timings.", ""]
    sel = report["selection_model"]
    a = sel["assumptions"]
    out += ["## Modelled bytes per entry of a typical whole selection (N = 8e9, ρ = 1%)", "",
            f"Typical path: the pass-0 bucket (11-bit first digit) holds {a['bucket']:.3%} of N and "
            f"{a['at_or_above']:.3%} of N lie at or above it, which fits the candidate buffer "
            "(k + N/256), so pass 1 captures every selectable entry and nothing after it reads θ "
            "or g: 2 full passes. The fractions were measured on SmolLM2-135M-Instruct's real "
            "gradients (gallop score, ρ = 1%, one batch of 8 short texts; gradient score: "
            "0.19% / 1.17%; magnitude: 0.10% / 1.07%). Per-tile terms use BLOCK = "
            f"{a['block']}.", ""]
    for dt, m in sel["by_dtype"].items():
        out += [f"θ, g in {dt}: **{m['total']:.2f} B/entry** (before: {m['old_design_total']:.2f} "
                f"B/entry, four full passes)", "", "| pass | B/entry |", "|---|---:|"]
        out += [f"| {name} | {b:.3f} |" for name, b in m["passes"]]
        out.append("")
    out += ["Fallbacks (decided on the device from the summed histogram): if only the bucket fits "
            "the buffer, the write reads θ, g once more (3 full passes); if not even the bucket "
            "fits, pass 1 histograms the next digit from θ, g and pass 2 captures (up to 5 full "
            "passes for all-tied or extremely concentrated scores).", "",
            "## Modelled bytes per selected entry of the sparse step", "",
            "Contiguous state traffic plus 32-byte sectors for the gathers (θ read and written, g "
            "read when dense) at densities where selected entries rarely share a sector.", "",
            "| configuration | contiguous | gathered sectors | total |", "|---|---:|---:|---:|"]
    for name, b in report["step_model_bytes_per_selected_entry"].items():
        out.append(f"| {name} | {b['contiguous']:.2f} | {b['gathered_sectors']} | {b['total']:.2f} |")
    out += ["", "## FP-fusion policy, checked in the compiled step", "",
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
    out += ["", "## Before and after (sm_90, gallop score, bf16 θ and g, same counting rules)", "",
            "Before: commit 728dd6a (8-bit digits, a program per 16-tile chunk, scalar loads, "
            "capture machinery on every tile, acq_rel atomics; the 8-bit step did not compile).",
            "", "| pass | before: regs | before: static / fast per entry | after: regs | after: "
            "static / fast per entry |", "|---|---:|---:|---:|---:|"]
    after = {(r["pass"], r["variant"]): r for r in report["rows"] if r["arch"] == "sm_90"}
    for name, (regs, st, fa), key in BEFORE_SM90:
        r = after.get(key)
        now = (f"{r['registers']} | {r.get('static_per_element', r['static'])} / "
               f"{r.get('fast_per_element', r['fast'])}") if r else "- | -"
        out.append(f"| {name} | {regs} | {st} / {fa} | {now} |")
    out += ["", "## Per kernel variant and architecture", "",
            "| arch | pass | kernel variant | regs | spill st/ld (B) | smem (B) | static / el | fast / el "
            "| unit | 16-B loads | FFMA (SASS) | fma.rn (PTX) | atomics |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in report["rows"]:
        se = f"{r['static_per_element']:.2f}" if "static_per_element" in r else f"{r['static']} total"
        fe = f"{r['fast_per_element']:.2f}" if "fast_per_element" in r else f"{r['fast']} total"
        atom = " ".join(a for a in r["ptx_atomics"] if ".shared." not in a) or "-"
        out.append(f"| {r['arch']} | {r['pass']} | {r['variant']} | {r['registers']} | "
                   f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | {se} | {fe} | "
                   f"{r.get('unit', 'program')} | {r['vector_loads']} | {r['ffma']} | "
                   f"{r['ptx_fma']} | {atom} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
