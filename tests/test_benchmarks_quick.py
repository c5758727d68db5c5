"""The benchmarks cannot rot: the quick CPU mode of the report runs here (seconds), and the CMake
project of the native baselines configures (and, where nvcc is, compiles).

Timing numbers are never asserted; only that the report is produced with its documented fields.
Set GALLOP_SKIP_CUDA_BUILD=1 to skip the nvcc compile (about 30 s for one target on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROW_FIELDS = {"kernel", "impl", "role", "n", "dtype", "density", "k", "bytes_model"}
TIMED_FIELDS = {"median_s", "p20_s", "p80_s", "reps", "warmup", "copies", "timer", "gbps", "frac_copy_bw"}
TOP_FIELDS = {"schema", "mode", "label", "date", "device", "software", "copy_bandwidth", "settings",
              "kernels", "results", "memory", "checks", "owed", "plots", "elapsed_s"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    from benchmarks import report

    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        rc = report.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    jsons = list(out.glob("*.json"))
    assert len(jsons) == 1, jsons
    return out, jsons[0], json.loads(jsons[0].read_text())


def test_quick_report_has_documented_fields(quick_report):
    out, path, data = quick_report
    assert TOP_FIELDS <= set(data), TOP_FIELDS - set(data)
    assert data["mode"] == "quick"
    assert path.name.startswith(("cpu-", "cuda-")) or data["device"]["kind"] == "cuda"
    assert data["date"] in path.name
    dev = data["device"]
    assert {"kind", "name", "driver"} <= set(dev)
    sw = data["software"]
    assert {"torch", "triton", "python", "native_baselines", "bitsandbytes_status"} <= set(sw)
    assert data["copy_bandwidth"]["gbps"] > 0
    assert data["settings"]["dtype"] == "bfloat16"
    assert data["settings"]["densities"]

    kernels = {r["kernel"] for r in data["results"]}
    assert {"selection", "radix_select", "compaction", "score_histogram", "sparse_step",
            "optimizer_select_step", "optimizer_steady_step"} <= kernels
    timed = [r for r in data["results"] if "median_s" in r]
    assert timed, "no case was timed"
    for r in data["results"]:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["role"] in ("ours", "baseline")
        if "median_s" not in r:
            assert r.get("skipped"), f"row neither timed nor skipped with a reason: {r}"
    for r in timed:
        assert TIMED_FIELDS <= set(r) or r["bytes_model"] == 0, TIMED_FIELDS - set(r)
        assert r["median_s"] > 0
    # Every timed "ours" row carries its ratio to each baseline timed beside it.
    for r in timed:
        if r["role"] == "ours":
            peers = [p for p in timed if p["role"] == "baseline" and
                     (p["kernel"], p["n"], p["density"]) == (r["kernel"], r["n"], r["density"])]
            assert set(r["speedup_vs"]) == {p["impl"] for p in peers}
    densities = {r["density"] for r in timed if r["kernel"] == "sparse_step"}
    assert len(densities) >= 2, "the density sweep did not run"

    # CPU numbers are labelled as such, and the GPU runs are listed as owed.
    if dev["kind"] == "cpu":
        assert "CPU" in data["label"]
        assert data["owed"]
        assert all(not r["impl"].startswith("Triton select") for r in timed)

    memory = data["memory"]
    assert any(r["source"] == "formula" for r in memory)
    assert any(r["source"] == "measured" and "state_bytes" in r for r in memory)
    sparse = [r for r in memory if r["source"] == "measured" and r["optimizer"].startswith("SparseAdamW")
              and "state_bytes" in r]
    for r in sparse:  # the measured state matches the 16 B per selected entry of the formula
        assert r["state_bytes"] == pytest.approx(r["formula_bytes"], rel=0.02)

    md = (out / (path.stem + ".md")).read_text()
    assert dev["name"] in md and "median" in md
    if dev["kind"] == "cpu":
        assert "CPU numbers" in md and "Owed GPU runs" in md
    for name in data["plots"].values():
        assert (out / name).is_file()


def test_interpreter_checks_pass(quick_report):
    """In CPU mode the Triton kernels are checked (not timed) against the reference in the
    interpreter, including the per-kernel staging the GPU microbenchmarks use."""
    _, _, data = quick_report
    checks = data["checks"]
    if data["device"]["kind"] != "cpu" or checks.get("status", "").startswith("skipped"):
        pytest.skip(f"interpreter checks did not run: {checks.get('status')}")
    assert checks["status"] == "ran", checks["status"]
    assert checks["triton_select_equals_reference"] is True
    assert checks["staged_kernels_equal_triton_select"] is True
    assert checks["sparse_adamw_max_abs_diff"] <= 1e-6


def test_installed_package_never_imports_benchmarks():
    """`benchmarks/` is not installed: no package module imports it, and `gallop` has no `bench`
    subcommand (it used to import benchmarks/report.py from the working directory or a parent)."""
    for path in (REPO / "gallop_kernels").rglob("*.py"):
        text = path.read_text()
        assert "import benchmarks" not in text and "from benchmarks" not in text, path
        assert "benchmarks.report" not in text or "python -m benchmarks.report" in text, path
    from gallop_kernels.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--quick"])


def test_report_cli_renders_an_existing_json(quick_report, tmp_path):
    """--render re-writes the Markdown of a results JSON without timing anything."""
    from benchmarks import report

    _, path, _ = quick_report
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    assert report.main(["--render", str(copy), "--no-plots"]) == 0
    assert (tmp_path / (path.stem + ".md")).read_text().startswith("# gallop_kernels benchmarks")


# --------------------------------------------------------------------------------------------------
# CMake project of the native baselines
# --------------------------------------------------------------------------------------------------

CMAKE = shutil.which("cmake")
NVCC = shutil.which("nvcc")


def _cmake(*args, env=None, timeout=300):
    return subprocess.run([CMAKE, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")
def test_cmake_without_nvcc_stops_cleanly(tmp_path):
    """Where no CUDA compiler is found, configure succeeds, explains itself, and builds nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME")}
    env["PATH"] = os.pathsep.join(
        d for d in env.get("PATH", "").split(os.pathsep)
        if d and not (Path(d) / "nvcc").exists())
    build = tmp_path / "build"
    res = _cmake("-S", str(REPO), "-B", str(build), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    if "Looking for a CUDA compiler - NOTFOUND" not in res.stdout:
        pytest.skip("cmake still finds a CUDA compiler outside PATH on this machine")
    assert "No CUDA compiler (nvcc) found" in res.stdout, res.stdout
    res = _cmake("--build", str(build), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not list(build.glob("*.so"))


@pytest.mark.skipif(CMAKE is None or NVCC is None, reason="needs cmake and nvcc")
@pytest.mark.skipif(os.environ.get("GALLOP_SKIP_CUDA_BUILD") == "1", reason="GALLOP_SKIP_CUDA_BUILD=1")
def test_cmake_builds_native_baselines(tmp_path):
    """Where nvcc is, the baselines compile (one target, sm_90, to keep CI short) into a library
    exporting the C ABI of kernels/gallop_baselines.h."""
    build = tmp_path / "build"
    res = _cmake("-S", str(REPO), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=90")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "top-k threshold baseline:" in res.stdout
    res = _cmake("--build", str(build), "-j", str(os.cpu_count() or 2), timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    lib = build / "libgallop_baselines.so"
    assert lib.is_file()
    header = (REPO / "kernels" / "gallop_baselines.h").read_text()
    nm = shutil.which("nm")
    if nm:
        symbols = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True,
                                 text=True).stdout
        for name in ("gallop_bl_abi_version", "gallop_bl_topk_method", "gallop_bl_last_error",
                     "gallop_bl_gallop_score", "gallop_bl_topk_threshold_temp_bytes",
                     "gallop_bl_topk_threshold", "gallop_bl_sparse_adamw"):
            assert name in header and name in symbols, name
    # Loads with ctypes on a machine without a GPU too (calls then fail with a CUDA error).
    from benchmarks.baselines import NativeBaselines

    nat = NativeBaselines(lib)
    assert nat.abi_version == 1
    assert nat.topk_method.startswith("cub::")


# --------------------------------------------------------------------------------------------------
# The prepared GPU run, dry (CPU, tiny sizes): every stage runs, so the script works before a GPU
# minute is spent on it
# --------------------------------------------------------------------------------------------------


def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    from benchmarks import gpu_check

    threads = torch.get_num_threads()
    try:
        # budgets scaled up: the test checks what the stages do, not how fast this machine is
        rc = gpu_check.main(["--dry", "--out", str(tmp_path), "--budget-scale", "20"])
    finally:
        torch.set_num_threads(threads)
    jsons = list(tmp_path.glob("gpu-check-*-dry.json"))
    assert len(jsons) == 1, list(tmp_path.iterdir())
    data = json.loads(jsons[0].read_text())
    stages = data["stages"]
    assert list(stages) == ["env", "build", "tests", "selection", "step", "memory"]
    assert rc == 0, {n: (s["status"], s["detail"].get("error")) for n, s in stages.items()}
    for name, stage in stages.items():
        assert stage["status"] in ("ok", "skipped"), (name, stage["status"], stage["detail"])
    assert data["dry"] is True and data["device"]["name"]
    # the tests stage really ran pytest, and the memory stage measured its row
    assert "1 passed" in stages["tests"]["detail"]["dry"]["summary"]
    assert any(r.get("measured") for r in stages["memory"]["detail"]["rows"])
    # every exact baseline selected the same set as ours; every row timed or skipped with a reason
    for name in ("selection", "step"):
        rows = stages[name]["detail"]["rows"]
        assert any(r["role"] == "ours" and r["median_s"] > 0 for r in rows if "median_s" in r)
        for r in rows:
            assert "median_s" in r or r.get("skipped"), r
            assert r.get("same_indices_as_ours", True), r
    targets = {t["target"] for t in data["targets"]}
    assert {"selection_copy_bw", "selection_vs_torch", "selection_vs_cub",
            "step_vs_fused_adamw"} <= targets
    md = (tmp_path / (jsons[0].stem + ".md")).read_text()
    assert data["device"]["name"] in md and "DRY RUN" in md and "| target |" in md
    for log in ("tests.log", "gpu-check.log"):
        assert data["device"]["name"] in (tmp_path / log).read_text(), log


def test_gpu_check_stage_over_budget_is_stopped_and_recorded(tmp_path):
    """A stage's subprocess that outlives the stage's budget is killed and recorded; a failing
    stage does not end the run; once the global budget is spent later stages are skipped."""
    import sys
    import time

    from benchmarks.gpu_run import Run, Stage

    run = Run(dry=True, out=tmp_path, sizes=(), budgets={}, global_budget=8)
    run.device_name = "test device"

    def sleeper(run, stage):
        res = run.subprocess([sys.executable, "-c", "import time; time.sleep(60)"], "x.log")
        stage.detail["res"] = res
        if res["timed_out"]:
            stage.status = "timed out"

    def broken(run, stage):
        raise RuntimeError("boom")

    t = time.perf_counter()
    slow = run.run_stage(Stage("slow", 2), sleeper)
    assert time.perf_counter() - t < 30
    assert slow.status == "timed out" and slow.detail["res"]["returncode"] is None
    log = (tmp_path / "x.log").read_text()
    assert "test device" in log and "timed out" in log
    failed = run.run_stage(Stage("broken", 5), broken)
    assert failed.status == "failed" and "boom" in failed.detail["error"]
    run.t0 -= 8  # the global budget is spent
    assert run.run_stage(Stage("late", 5), broken).status == "skipped"


def test_gpu_check_refuses_without_cuda_unless_dry(tmp_path, capsys):
    from benchmarks import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--dry" in capsys.readouterr().err


def test_exact_torch_compositions_follow_the_tie_rule():
    """The baselines the GPU targets compare against are exact: the reference's set, also when
    the compaction is chunked (as it is past 2^30 entries)."""
    from benchmarks import baselines as bl
    from gallop_kernels.ops.select import naive as select_naive

    scores = (torch.randint(0, 5, (1001,), generator=torch.Generator().manual_seed(0)) * 0.5)
    for k in (1, 10, 500, 1001):
        want = select_naive.select_topk([scores], k)[0]
        for got in (bl.exact_compact(scores, bl.topk_threshold(scores, k), k, chunk=7),
                    bl.exact_compact(scores, bl.kthvalue_threshold(scores, k), k),
                    bl.stable_sort_select(scores, k)):
            assert torch.equal(got, want), k


def test_distributed_memory_benchmark_runs(tmp_path):
    """benchmarks/distributed_memory.py on a tiny MLP, one of its modes: every rank reports a
    peak and the files are written (no number is asserted: a tiny model is all noise)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.distributed_memory", "--width", "32", "--depth", "2",
         "--steps", "2", "--modes", "ddp-lean-compact", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = tmp_path.glob("distributed-memory-cpu-gloo-*.json")
    report = json.loads(result.read_text())
    assert list(report["modes"]) == ["ddp-lean-compact"]
    for ranks in report["modes"].values():
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(len(r["after_step_mb"]) == 2 and isinstance(r["peak_mb"], float) for r in ranks)
