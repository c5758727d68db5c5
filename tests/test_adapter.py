"""Adapter folders: the delta with a config and a model card, loaded back by gallop_kernels and, as
a SHiRA adapter, by ``PeftModel.from_pretrained`` with the logits of the merged delta."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("safetensors")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from gallop_kernels import SparseAdamW  # noqa: E402
from gallop_kernels.adapter import (  # noqa: E402
    ADAPTER_FILES, NotExportable, load_adapter, push_to_hub, save_adapter, shira_export,
)
from gallop_kernels.delta import apply_delta, extract_delta, load_delta, new_delta  # noqa: E402
from gallop_kernels.integrations.transformers import select_trainable  # noqa: E402

CONFIG = {"target_modules": "all-linear", "data": ["train.jsonl"], "command": "gallop finetune --density 0.05",
          "training": {"lr": 0.01, "steps": 3}}


def tiny(seed=0):
    cfg = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
                      tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def trained_delta(embeddings=False):
    model = tiny()
    select_trainable(model, embeddings=embeddings)
    opt = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, density=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 20, (4, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, extract_delta(model, opt, base=tiny(), base_model="HuggingFaceTB/tiny-base")


@pytest.fixture(scope="module")
def trained():
    return trained_delta()


def test_folder_has_the_delta_a_config_and_a_model_card(trained, tmp_path):
    model, delta = trained
    folder = tmp_path / "adapter"
    written = save_adapter(folder, delta, config=CONFIG)
    assert sorted(os.path.basename(p) for p in written) == sorted(ADAPTER_FILES)
    cfg = json.loads((folder / "gallop_adapter.json").read_text())
    assert cfg["base_model"] == "HuggingFaceTB/tiny-base"
    assert cfg["base_fingerprint"] == delta.metadata["base_fingerprint"]
    assert cfg["score"] == "gallop" and cfg["density"] == 0.05 and cfg["method"] == "gallop"
    assert cfg["num_entries"] == delta.num_entries and cfg["target_modules"] == "all-linear"
    assert cfg["data"] == ["train.jsonl"] and cfg["command"].startswith("gallop finetune")
    assert cfg["training"] == {"lr": 0.01, "steps": 3}
    assert cfg["peft"]["exported"] is True and cfg["peft"]["r"] >= 1
    assert "apply_delta(model" in cfg["load"]["python"] and "PeftModel.from_pretrained" in cfg["load"]["peft"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/tiny-base\nlibrary_name: peft\n")
    for fact in (delta.metadata["base_fingerprint"], "gallop finetune --density 0.05", "0.05",
                 f"{delta.num_entries:,}", "apply_delta", "PeftModel.from_pretrained", "check_base=False"):
        assert fact in card, fact

    adapter = load_adapter(folder)
    assert adapter.config == cfg and adapter.delta.num_entries == delta.num_entries
    base = tiny()
    adapter.apply(base)
    for (n, p), q in zip(base.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
    base = tiny()
    apply_delta(base, folder)  # a folder is a delta path too
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), model.parameters()))


def test_peft_loads_the_delta_as_shira(trained, tmp_path):
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "ShiraConfig"):
        pytest.skip("this peft has no SHiRA")
    model, delta = trained
    save_adapter(tmp_path / "a", delta, peft=True)
    shira = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "a"))
    ids = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(shira(input_ids=ids).logits, want, rtol=0, atol=1e-6)
        merged = shira.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=0, atol=1e-6)
    for (n, p), q in zip(merged.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=n)


def test_what_shira_cannot_hold_is_said(tmp_path):
    model, delta = trained_delta(embeddings=True)
    assert any("embed" in n for n in delta.indices)
    save_adapter(tmp_path / "auto", delta)  # auto: the native folder, and the reason in the config
    cfg = json.loads((tmp_path / "auto" / "gallop_adapter.json").read_text())
    assert cfg["peft"]["exported"] is False and "linear layers only" in cfg["peft"]["reason"]
    assert not (tmp_path / "auto" / "adapter_config.json").exists()
    assert "Not exported to PEFT" in (tmp_path / "auto" / "README.md").read_text()
    with pytest.raises(NotExportable, match="Embedding"):
        save_adapter(tmp_path / "strict", delta, peft=True)
    assert not (tmp_path / "strict").exists()

    # One r for every layer: a dense layer next to a narrow one cannot be padded.
    dense = torch.arange(64, dtype=torch.int32)
    one = torch.tensor([0], dtype=torch.int32)
    odd = new_delta({"a.weight": dense, "b.weight": one},
                    {"a.weight": torch.ones(64), "b.weight": torch.ones(1)},
                    {"a.weight": (8, 8), "b.weight": (2, 8)}, base_model="x", scores=["gallop"],
                    densities=["0.5"], dtypes=["float32"], modules={"a.weight": "Linear", "b.weight": "Linear"})
    with pytest.raises(NotExportable, match="one r"):
        shira_export(odd)


def test_saving_checks_everything_first(trained, tmp_path):
    _, delta = trained
    folder = tmp_path / "a"
    save_adapter(folder, delta, peft=True)
    before = {name: (folder / name).read_bytes() for name in ADAPTER_FILES}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(folder, delta)
    for bad, err in (({"base_fingerprint": "x"}, ValueError), ({"num_entries": 1}, ValueError),
                     ({"training": {"lr": float("nan")}}, ValueError), ({"data": object()}, ValueError),
                     ({3: "x"}, TypeError)):
        with pytest.raises(err):
            save_adapter(folder, delta, config=bad, overwrite=True)
    with pytest.raises(ValueError, match="peft"):
        save_adapter(folder, delta, peft="yes", overwrite=True)
    assert {name: (folder / name).read_bytes() for name in ADAPTER_FILES} == before
    save_adapter(folder, delta, peft=False, overwrite=True)  # stale PEFT files go
    assert not (folder / "adapter_config.json").exists()
    (tmp_path / "elsewhere").write_text("precious")
    os.symlink(tmp_path / "elsewhere", folder / "adapter_config.json")
    with pytest.raises(ValueError, match="symbolic link"):
        save_adapter(folder, delta, overwrite=True)
    assert (tmp_path / "elsewhere").read_text() == "precious"


def test_a_folder_that_does_not_hold_together_is_refused(trained, tmp_path):
    _, delta = trained
    folder = tmp_path / "a"
    save_adapter(folder, delta)
    cfg_path = folder / "gallop_adapter.json"
    cfg = json.loads(cfg_path.read_text())
    for edit, match in (({"delta_file": "../../etc/passwd"}, "file name"), ({"num_entries": 1}, "different deltas"),
                        ({"version": 99}, "version"), ({"format": "x"}, "not a GaLLoP adapter")):
        cfg_path.write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ValueError, match=match):
            load_adapter(folder)
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_adapter(folder)
    with pytest.raises(FileNotFoundError):
        load_adapter(tmp_path)
    assert load_delta(folder).num_entries == delta.num_entries


def test_push_to_hub_uploads_the_adapter_files_only(trained, tmp_path, monkeypatch):
    """No Hub offline: a stand-in HfApi records what would be uploaded."""
    hub = pytest.importorskip("huggingface_hub")
    _, delta = trained
    folder = tmp_path / "a"
    save_adapter(folder, delta)
    (folder / "notes.txt").write_text("private")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs))
            return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    assert push_to_hub(folder, "me/tiny-gallop", token="t") == "https://hub/commit/1"
    upload = calls[-1][1]
    assert upload["repo_id"] == "me/tiny-gallop" and upload["folder_path"] == str(folder)
    assert sorted(upload["allow_patterns"]) == sorted(ADAPTER_FILES)
    calls.clear()
    (folder / "gallop_adapter.json").write_text("{}")
    with pytest.raises(ValueError):
        push_to_hub(folder, "me/tiny-gallop")
    assert calls == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_permissions_open_would_give(trained, tmp_path, umask):
    # What a user shares must not be private by accident (mkstemp's 0600), nor wider than asked.
    from gallop_kernels.atomic import write_atomic

    _, delta = trained
    previous = os.umask(umask)
    try:
        written = save_adapter(tmp_path / "adapter", delta, config=CONFIG)
        write_atomic(tmp_path / "record.json", "{}\n")
        with open(tmp_path / "by-open.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(previous)
    expected = os.stat(tmp_path / "by-open.txt").st_mode & 0o777
    assert expected == 0o666 & ~umask
    for path in [*written, tmp_path / "record.json"]:
        assert os.stat(path).st_mode & 0o777 == expected, path
    assert not [p for p in os.listdir(tmp_path / "adapter") if ".tmp-" in p]  # no temporary left behind
