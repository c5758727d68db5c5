"""The core needs torch and triton only: it imports and trains where the extras are absent.

Each check runs in a fresh interpreter in which importing transformers, accelerate, peft,
bitsandbytes, gguf, trl, datasets or huggingface_hub fails, as on a machine that installed
``pip install gallop_kernels`` without extras (.ci/run also runs the core in a real venv like that).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT = ("transformers", "accelerate", "peft", "bitsandbytes", "gguf", "trl", "datasets",
          "huggingface_hub", "yaml")

_BLOCKER = f"""
import importlib.abc, importlib.util, sys
ABSENT = {ABSENT!r}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Absent())
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split(".")[0] in ABSENT:
        return None
    return _find_spec(name, package)
importlib.util.find_spec = find_spec
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_core_trains_and_writes_deltas_without_the_extras(tmp_path):
    proc = _run(f"""
        import sys, torch
        from gallop_kernels import SparseAdamW, calibrate
        from gallop_kernels.delta import apply_delta, extract_delta, load_delta, save_delta
        for bits in (32, 8):
            model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).bfloat16()
            base = {{k: v.clone() for k, v in model.state_dict().items()}}
            opt = SparseAdamW(model.named_parameters(), lr=1e-2, density=0.1, state_bits=bits,
                              min_8bit_entries=1, backend="torch")
            for _ in range(3):
                model(torch.randn(4, 64).bfloat16()).sum().backward()
                opt.step()
                opt.zero_grad()
        assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8  # 8-bit state ran
        save_delta({str(tmp_path / "d.safetensors")!r}, extract_delta(model, opt, base=base))
        fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).bfloat16()
        fresh.load_state_dict(base)
        apply_delta(fresh, load_delta({str(tmp_path / "d.safetensors")!r}))
        assert torch.equal(fresh[0].weight, model[0].weight)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {ABSENT!r})
        assert not loaded, loaded
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_applications_name_the_extra_they_need(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    proc = _run("""
        import sys
        from gallop_kernels.cli import main
        sys.exit(main(sys.argv[1:]))
    """, "finetune", "--data", str(data), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'gallop_kernels[hf]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()

    proc = _run("""
        try:
            import gallop_kernels.integrations.transformers
        except ImportError as err:
            print(type(err).__name__, err)
    """)
    assert "MissingExtra" in proc.stdout and "gallop_kernels[hf]" in proc.stdout, proc.stderr

    proc = _run("""
        import sys
        from gallop_kernels.cli import main
        sys.exit(main(["--help"]))
    """)
    assert proc.returncode == 0 and "finetune" in proc.stdout, proc.stderr[-2000:]
