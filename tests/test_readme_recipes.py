"""The README's fine-tuning recipes run as written.

Every ```python block of the README's "Fine-tuning with Hugging Face" section is executed
verbatim, in a fresh folder holding a small ``train.jsonl`` of chat lines, with the tiny model
standing in for the embedded default: ``models.resolve_model(None)`` follows its real path to the
GGUF conversion, which returns the tiny model's folder. So the README cannot drift from the API.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Fine-tuning with Hugging Face"


def readme_recipes() -> list[tuple[str, int, str]]:
    """``(heading, line, code)`` for each python block of the section."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    blocks, heading, i = [], SECTION, start
    while i < end:
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("# ").strip()
        if lines[i].strip() == "```python":
            j = lines.index("```", i + 1)
            blocks.append((heading, i + 2, "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return blocks


RECIPES = readme_recipes()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from gallop_kernels.finetune.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=32, num_layers=1, max_positions=64)


@pytest.fixture
def workdir(tmp_path, tiny_model, monkeypatch):
    from gallop_kernels import models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "embedded_gguf", lambda: Path("/wheel/SmolLM2-135M-Instruct.Q4_1.gguf"))
    monkeypatch.setattr(models, "ensure_converted", lambda path, log=None: Path(tiny_model))
    with open("train.jsonl", "w", encoding="utf-8") as f:
        for i in range(16):
            f.write(json.dumps({"messages": [{"role": "system", "content": "Answer with a number."},
                                             {"role": "user", "content": f"{i}+{i}="},
                                             {"role": "assistant", "content": str(2 * i)}]}) + "\n")
    return tmp_path


def test_the_section_has_the_four_recipes():
    headings = [h for h, _, _ in RECIPES]
    assert len(RECIPES) == 4, headings
    assert any("Trainer" in h for h in headings) and any("SFTTrainer" in h for h in headings)
    assert any("adapter" in h for h in headings)


@pytest.mark.parametrize("heading, line, code", RECIPES, ids=[f"README.md:{line}" for _, line, _ in RECIPES])
def test_recipe_runs_as_written(workdir, heading, line, code, capsys):
    if "from trl import" in code:
        pytest.importorskip("trl")
    from gallop_kernels import models

    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out
    written = [p for p in ("out/gallop_delta.safetensors", "sft-out/gallop_delta.safetensors") if os.path.exists(p)]
    assert len(written) == 1, written

    from gallop_kernels.delta import load_delta

    delta = load_delta(written[0])
    assert delta.num_entries > 0
    if "GallopCallback" in code:  # the callback's progress lines
        assert re.search(r"phase one: selected [\d,]+ of [\d,]+ entries", printed), printed
    if "unmerge_delta" in code and "base" in namespace:  # merged, then unmerged: exactly the base again
        fresh, _ = models.load_model_and_tokenizer()
        for (name, p), q in zip(namespace["base"].named_parameters(), fresh.parameters()):
            assert torch.equal(p, q), name
        tuned = namespace["model"]
        assert any(not torch.equal(p, q) for p, q in zip(tuned.parameters(), fresh.parameters()))
    if "PeftModel" in code:  # base + 0.7Δ + 0.3Δ through our apply, base + Δ through PEFT's SHiRA
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        ours, theirs = namespace["model"], namespace["peft_model"]
        with torch.no_grad():
            torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
            fresh, _ = models.load_model_and_tokenizer()
            assert not torch.allclose(fresh(input_ids=ids).logits, ours(input_ids=ids).logits)
