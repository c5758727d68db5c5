"""The memory report: hand-computed predictions, the report's rows, the CLI, and (opt-in) one tiny
measurement subprocess. Set GALLOP_MEMORY_MEASURE=1 to run the measurement test."""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys

import pytest

from gallop_kernels.memory import model as mm
from gallop_kernels.memory.methods import REGISTRY
from gallop_kernels.memory import report
from gallop_kernels.memory.presets import ConfigError, load_config

N_8B = 8_030_261_248  # Llama-3-8B with an untied lm_head
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cfg8b():
    return load_config("llama3-8b")


def test_8b_parameter_count_by_hand(cfg8b):
    h, inter, vocab, kv = 4096, 14336, 128256, 8 * 128
    layer = h * h * 2 + 2 * kv * h + 3 * h * inter + 2 * h
    assert 32 * layer + 2 * vocab * h + h == N_8B
    assert mm.count_params(cfg8b) == N_8B
    assert round(N_8B / 1e9, 2) == 8.03


def test_tied_embeddings_drop_lm_head(cfg8b):
    tied = load_config("llama3-8b")
    tied.tie_word_embeddings = True
    assert mm.count_params(tied) == N_8B - 128256 * 4096


def test_gqa_shapes(cfg8b):
    shapes = {t.name.split(".")[-2]: t.shape for t in mm.param_specs(cfg8b)}
    assert shapes["k_proj"] == (1024, 4096) and shapes["v_proj"] == (1024, 4096)
    assert shapes["q_proj"] == (4096, 4096) and shapes["o_proj"] == (4096, 4096)


def test_dense_adamw_state_by_hand(cfg8b):
    fp32 = mm.Setup(dtype="fp32")
    assert mm.optimizer_state_bytes(cfg8b, "adamw", fp32) == 8 * N_8B  # 64.2 GB of fp32 m, v
    assert round(8 * N_8B / 1e9) == 64
    bf16 = mm.Setup()
    assert mm.optimizer_state_bytes(cfg8b, "adamw", bf16) == 4 * N_8B  # torch: state in bf16
    assert mm.optimizer_state_bytes(cfg8b, "adamw-mixed", bf16) == 12 * N_8B
    assert mm.weight_bytes(cfg8b, bf16) == 2 * N_8B


def test_sparse_state_per_selected_entry(cfg8b):
    k = mm.selected_entries(cfg8b, 0.01)
    assert k == math.floor(0.01 * N_8B + 0.5)
    bf16, fp32 = mm.Setup(), mm.Setup(dtype="fp32")
    # int32 index + fp32 m + v (+ fp32 master for bf16): per-tensor rounding moves a few entries
    assert mm.optimizer_state_bytes(cfg8b, "sparse", bf16) == pytest.approx(16 * k, rel=1e-5)
    assert mm.optimizer_state_bytes(cfg8b, "sparse", fp32) == pytest.approx(12 * k, rel=1e-5)
    # 8-bit m, v: 1 byte each + fp32 absmax per 256
    eight = mm.optimizer_state_bytes(cfg8b, "sparse-lean-8bit", bf16)
    assert eight == pytest.approx(k * (4 + 2 + 4 + 8 / 256), rel=1e-4)
    assert 1.0e9 < mm.optimizer_state_bytes(cfg8b, "sparse", bf16) < 1.3e9  # ANCHORS: 1.0–1.3 GB


def test_four_bit_weights_by_hand(cfg8b):
    linear = 32 * (4096 * 4096 * 2 + 2 * 1024 * 4096 + 3 * 4096 * 14336)
    rest = N_8B - linear  # embedding, lm_head, norms stay bf16
    expected = linear // 2 + linear // 64 * 4 + 2 * rest
    assert mm.weight_bytes(cfg8b, mm.Setup(), four_bit=True) == expected


def test_four_bit_delta_state_by_hand(cfg8b):
    linear = 32 * (4096 * 4096 * 2 + 2 * 1024 * 4096 + 3 * 4096 * 14336)
    k = math.floor(0.01 * linear + 0.5)  # decoder linears only: embedding, lm_head frozen
    assert mm.delta_entries(cfg8b, 0.01) == k
    p = mm.predict(cfg8b, "sparse-4bit-delta", mm.Setup())
    assert p.persistent["delta_values_and_indices"] == 8 * k  # fp32 value + int32 index
    assert p.persistent["optimizer_state"] == 8 * k  # fp32 m, v (fused AdamW)
    assert p.moments["step"] == sum(p.persistent.values()) + 4 * k  # + the fp32 delta gradient


def test_logits_terms_by_hand(cfg8b):
    act = mm.activation_terms(cfg8b, "sparse-lean", mm.Setup())
    tv = 2048 * 128256
    assert act.logits_forward == (2 + 4 + 4) * tv  # bf16 logits, fp32 copy, log-softmax
    assert act.logits_loss_backward == 12 * tv
    assert act.ckpt_inputs == 32 * 2048 * 4096 * 2
    fp32 = mm.activation_terms(cfg8b, "sparse-lean", mm.Setup(dtype="fp32"))
    assert fp32.logits_forward == 8 * tv  # .float() is a no-op on fp32 logits


def test_peak_is_a_max_over_phases_not_a_sum(cfg8b):
    p = mm.predict(cfg8b, "adamw", mm.Setup())
    assert p.peak == max(p.phases.values())
    assert p.peak < sum(p.phases.values())
    # the step of dense AdamW: weights + grads + m, v + foreach's sqrt(v), all bf16
    assert p.phases["step"] == 2 * N_8B * 4 + 2 * N_8B + mm.CUDA_FRAMEWORK_BYTES


def test_8b_ordering_and_targets(cfg8b):
    peaks = {p.method: p.peak for p in mm.predict_all(cfg8b, mm.Setup())}
    assert peaks["sparse-4bit-delta"] < peaks["sparse-lean-8bit"] <= peaks["sparse-lean"]
    assert peaks["sparse-lean"] < peaks["sparse"] < peaks["adamw8bit"] < peaks["adamw"]
    assert peaks["sparse-lean"] <= 22e9 and peaks["sparse-4bit-delta"] <= 12e9
    assert peaks["adamw-mixed"] > 80 * 2**30


def test_report_prints_every_row(capsys):
    assert report.main(["--config", "llama3-8b"]) == 0
    out = capsys.readouterr().out
    for method in REGISTRY.values():
        assert method.label in out
    assert "Targets" in out


def test_report_json(capsys):
    assert report.main(["--config", "llama-0.3b", "--seq", "256", "--device", "cpu",
                        "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["method"] for p in data["predictions"]] == list(REGISTRY)
    assert data["params"] == mm.count_params(load_config("llama-0.3b")) > 0.3e9


def test_bad_config_gives_a_clear_error(tmp_path, capsys):
    assert report.main(["--config", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'no-such-model'" in err and "llama3-8b" in err
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert report.main(["--config", str(tmp_path)]) == 2
    assert "cannot read model config" in capsys.readouterr().err
    bad.write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        load_config(str(bad))


def test_config_json_path(tmp_path):
    from gallop_kernels.memory.presets import PRESETS

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PRESETS["llama3-8b"], "model_type": "llama"}))
    assert mm.count_params(load_config(str(path))) == N_8B
    assert mm.count_params(load_config(str(tmp_path))) == N_8B


def test_register_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="gallop")
    sub = parser.add_subparsers(dest="command")
    report.register(sub)
    args = parser.parse_args(["memory", "--config", "llama-0.3b", "--methods", "sparse-lean"])
    assert args.func(args) == 0
    assert "SparseAdamW lean" in capsys.readouterr().out


def test_cli_help_and_no_bitsandbytes_import():
    """``python -m gallop_kernels.memory --help`` works, and neither importing the package (the
    4-bit integration and the delta format included) nor running ``gallop memory`` imports
    bitsandbytes (slow to import and noisy; only a 4-bit model needs it). One fresh process."""
    code = (
        "import contextlib, io, json, runpy, sys\n"
        "import gallop_kernels, gallop_kernels.integrations.bitsandbytes, gallop_kernels.delta\n"
        "def run(*argv):\n"
        "    out, sys.argv = io.StringIO(), ['gallop_kernels.memory', *argv]\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        runpy.run_module('gallop_kernels.memory', run_name='__main__')\n"
        "    return out.getvalue()\n"
        "report, help_text = run('--config', 'llama3-8b'), run('--help')\n"
        "print(json.dumps({'report': report, 'help': help_text, 'bnb': 'bitsandbytes' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "--config" in out["help"] and "--measure" in out["help"]
    assert "SparseAdamW lean" in out["report"]
    assert out["bnb"] is False


def test_committed_cpu_measurements_match_within_10_percent():
    """The committed CPU results, re-predicted with the current model: every measured row within
    10 % (the memory issue's criterion); rows without a measurement say why."""
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "memory-cpu-*.json")))
    if not files:
        pytest.skip("no committed memory measurements")
    for path in files:
        with open(path, encoding="utf-8") as f:
            measured = json.load(f)
        rows = report.compare(measured["config"], mm.Setup(**measured["setup"]),
                              measured["measurements"])
        assert rows, path
        for r in rows:
            if r["measured"] is None:
                assert r["reason"].startswith("not yet available"), (path, r)
            else:
                assert abs(r["error_pct"]) <= 10.0, (path, r)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GALLOP_MEMORY_MEASURE") != "1",
                    reason="set GALLOP_MEMORY_MEASURE=1 to run a measurement subprocess")
def test_tiny_measurement_pipeline():
    meas = report.run_measurement("llama-tiny", "sparse-lean", seq=64, batch=1, dtype="bf16",
                                  attn="sdpa", device="cpu", density=0.01, timeout=600)
    assert meas["available"], meas
    assert set(meas["phases"]) == {"forward", "backward", "step"}
    pred = mm.predict(load_config("llama-tiny"), "sparse-lean",
                      mm.Setup(seq=64, device="cpu"))
    # a 6M-parameter model: constant overheads weigh more than at 0.3B, so a loose bound
    assert 0.5 < pred.peak / meas["peak"] < 2.0


def _memory(argv, monkeypatch, measured_configs):
    """``gallop memory ARGV`` in-process, each measurement subprocess replaced by a fake reading."""
    from gallop_kernels.cli import main

    def fake(config, method, **kw):
        measured_configs.append((config, kw["device"], kw["seq"]))
        kw["log"]("measured step: forward, backward, optimizer step")  # the progress a real one shows
        return {"method": method, "available": True, "peak": 2e9,
                "phases": {"forward": 1e9, "backward": 2e9, "step": 1.5e9}}

    monkeypatch.setattr(report, "run_measurement", fake)
    return main(["memory", *argv])


def test_measure_measures_what_config_says_and_shows_progress(monkeypatch, capsys):
    seen = []
    assert _memory(["--config", "llama-tiny", "--measure", "--methods", "adamw,sparse-lean",
                    "--measure-device", "cpu"], monkeypatch, seen) == 0
    assert [c for c, _, _ in seen] == ["llama-tiny", "llama-tiny"]  # not the CPU stand-in
    captured = capsys.readouterr()
    assert "method 1 of 2" in captured.err and "measured step" in captured.err and "peak 2.00 GB" in captured.err
    assert "see --measure" not in captured.out  # the table points at the measurement below
    assert "below: llama-tiny, cpu, seq 256" in captured.out
    # the same setup as predicted: the number itself
    seen.clear()
    assert _memory(["--config", "llama-tiny", "--measure", "--methods", "adamw", "--device", "cpu",
                    "--measure-device", "cpu", "--measure-seq", "2048"], monkeypatch, seen) == 0
    assert "| 2.00 GB |" in capsys.readouterr().out


def test_without_config_a_cpu_measures_the_stand_in_and_says_so(monkeypatch, capsys):
    seen = []
    assert _memory(["--measure", "--methods", "adamw", "--measure-device", "cpu"], monkeypatch, seen) == 0
    assert seen == [("llama-0.3b", "cpu", 256)]
    assert "stand-in for llama3-8b" in capsys.readouterr().err


def test_a_measurement_that_cannot_fit_is_refused_before_it_starts(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(report, "_available_bytes", lambda: 4e9, raising=False)
    code = _memory(["--config", "llama3-8b", "--measure", "--methods", "adamw", "--measure-device", "cpu"],
                   monkeypatch, seen)
    assert code == 2 and not seen
    assert "more than the 4.00 GB available" in capsys.readouterr().err


def test_one_unit_everywhere(cfg8b, capsys):
    from gallop_kernels.cli import main

    assert main(["memory", "--config", "llama3-8b", "--gpus", "2,4"]) == 0
    out = capsys.readouterr().out
    assert "GB" in out and "GiB" not in out and "85.9 GB" in out


@pytest.mark.parametrize("argv, message", [
    (["--seq", "0"], "--seq"), (["--batch", "0"], "--batch"), (["--density", "0"], "--density"),
    (["--density", "2"], "--density"), (["--gpus", "0,2"], "--gpus"), (["--measure-seq", "-1"], "--measure-seq"),
])
def test_meaningless_numbers_are_usage_errors(argv, message, capsys):
    from gallop_kernels.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["memory", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
