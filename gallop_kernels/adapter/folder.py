"""The adapter folder users recognise: the delta, a small JSON config and a model card, plus PEFT
SHiRA files where SHiRA can hold the delta (`docs/design.md#adapter-folder`).

    folder/
      gallop_delta.safetensors    the delta (`gallop_kernels.delta` format, version 2)
      gallop_adapter.json         base model + fingerprint, method, score, density, targets, data,
                                  the command that trained it, how to load it
      README.md                   the model card (Hugging Face front matter + the same facts)
      adapter_config.json         PEFT SHiRA (when exportable): PeftModel.from_pretrained(base, folder)
      adapter_model.safetensors

`save_adapter` checks everything first (the delta, the config's keys and JSON-ability, whether
SHiRA can hold the delta, the files it would replace), then writes each file atomically (a
temporary file renamed into place). `load_adapter` reads the folder back and checks that its
config and delta belong together.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from gallop_kernels.atomic import write_atomic
from gallop_kernels.adapter.shira import PEFT_CONFIG, PEFT_WEIGHTS, NotExportable, shira_export
from gallop_kernels.delta import (
    DELTA_FILE,
    SparseDelta,
    apply_delta,
    as_delta,
    check_delta,
    merge_delta,
    save_delta,
)

ADAPTER_FORMAT = "gallop-adapter"
ADAPTER_VERSION = 1
CONFIG_FILE = "gallop_adapter.json"
CARD_FILE = "README.md"
ADAPTER_FILES = (DELTA_FILE, CONFIG_FILE, CARD_FILE, PEFT_CONFIG, PEFT_WEIGHTS)
DERIVED_KEYS = ("format", "version", "delta_file", "delta_version", "delta_kind", "base_model",
                "base_fingerprint", "base_quantization", "score", "density", "num_entries",
                "num_tensors", "trained_modules", "peft", "load", "created_with")
"""Config keys `save_adapter` derives from the delta; the caller's config may not set them."""


@dataclass
class Adapter:
    """A delta with its adapter config, as `load_adapter` reads it."""

    delta: SparseDelta
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Adapter":
        return load_adapter(folder)

    def save_pretrained(self, folder: str | os.PathLike, *, peft: bool | str = "auto",
                        overwrite: bool = False) -> list[str]:
        user = {k: v for k, v in self.config.items() if k not in DERIVED_KEYS}
        return save_adapter(folder, self.delta, config=user, peft=peft, overwrite=overwrite)

    def apply(self, model: nn.Module, **kwargs: Any) -> list[str]:
        """`gallop_kernels.delta.apply_delta` (``scale``, ``check_base``, ``strict``)."""
        return apply_delta(model, self.delta, **kwargs)

    def merge(self, model: nn.Module, **kwargs: Any) -> SparseDelta:
        """`gallop_kernels.delta.merge_delta`: returns what ``unmerge_delta`` restores."""
        return merge_delta(model, self.delta, **kwargs)


def _module_names(delta: SparseDelta) -> list[str]:
    return sorted({name.rpartition(".")[0] or name for name in delta.indices})


def _density(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _load_code(base: str, peft: bool, quantized: bool) -> dict[str, str | None]:
    base_ref = json.dumps(base or "<the base model>")
    python = (
        "from transformers import AutoModelForCausalLM\n"
        "from gallop_kernels.delta import apply_delta\n"
        f"model = AutoModelForCausalLM.from_pretrained({base_ref})\n"
        'apply_delta(model, "path/to/this/folder")  # checks the base; scale=0.5 applies half'
    )
    if quantized:
        python += (
            "\n# or onto the 4-bit base it was trained on:\n"
            "# from gallop_kernels.integrations.bitsandbytes import apply_sparse_delta\n"
            '# apply_sparse_delta(model_4bit, "path/to/this/folder")'
        )
    peft_code = (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        f"base = AutoModelForCausalLM.from_pretrained({base_ref})\n"
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")'
    ) if peft else None
    return {"python": python, "peft": peft_code}


def described(delta: SparseDelta) -> dict[str, Any]:
    """What an adapter config says about its delta, derived from the delta alone (`load_adapter`
    requires the config to say exactly this)."""
    meta = delta.metadata
    return {
        "delta_version": meta["version"],
        "delta_kind": delta.kind,
        "base_model": meta.get("base_model", ""),
        "base_fingerprint": meta.get("base_fingerprint"),
        "base_quantization": meta.get("base_quantization", "none") or "none",
        "score": meta.get("score", ""),
        "density": _density(meta.get("density", "")),
        "num_entries": delta.num_entries,
        "num_tensors": len(delta.indices),
        "trained_modules": _module_names(delta),
    }


def adapter_config(delta: SparseDelta, config: Mapping[str, Any] | None, peft: dict[str, Any]) -> dict[str, Any]:
    """The JSON config of an adapter folder: what the delta says about itself plus the caller's
    ``config`` (e.g. ``target_modules``, ``data``, ``command``, ``training``; JSON values)."""
    user = dict(config or {})
    bad = [k for k in user if not isinstance(k, str)]
    if bad:
        raise TypeError(f"adapter config keys must be strings, got {bad[0]!r}")
    clash = sorted(set(user) & set(DERIVED_KEYS))
    if clash:
        raise ValueError(f"adapter config may not set {clash}: save_adapter derives them from the delta")
    try:
        json.dumps(user, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"adapter config must be JSON (finite numbers, strings, lists, dicts): {e}") from e
    from gallop_kernels import __version__

    derived = described(delta)
    out: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "delta_file": DELTA_FILE,
        **{k: derived[k] for k in ("delta_version", "delta_kind", "base_model", "base_fingerprint",
                                   "base_quantization")},
        "method": user.pop("method", "gallop"),
        **{k: derived[k] for k in ("score", "density", "num_entries", "num_tensors")},
        "target_modules": user.pop("target_modules", _module_names(delta)),
        "trained_modules": derived["trained_modules"],
        "data": user.pop("data", None),
        "command": user.pop("command", None),
    }
    quant = derived["base_quantization"]
    out.update(user)
    out["peft"] = peft
    out["load"] = _load_code(out["base_model"], peft.get("exported", False), quant not in ("none", ""))
    out["created_with"] = f"gallop_kernels {__version__}"
    return out


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (0 < len(parts) <= 2 and all(parts) and not os.path.isabs(text)
            and not text.startswith(".") and not os.path.exists(text))


def model_card(config: Mapping[str, Any], delta: SparseDelta) -> str:
    """README.md: Hugging Face front matter and the facts of the config, for people."""
    base = config["base_model"]
    exported = config["peft"].get("exported", False)
    front = ["---"]
    if base and _is_hub_id(base):
        front.append(f"base_model: {base}")
    front.append(f"library_name: {'peft' if exported else 'gallop_kernels'}")
    front.append("tags:")
    front += [f"- {t}" for t in ("gallop", "sparse-fine-tuning", "sparse-delta") + (("shira",) if exported else ())]
    front.append("---")
    size = delta.nbytes() / 1e6
    rows = [
        ("base model", f"`{base}`" if base else "(not recorded)"),
        ("base fingerprint", f"`{config['base_fingerprint']}`" if config["base_fingerprint"] else "(none: version-1 delta)"),
        ("base quantization", config["base_quantization"]),
        ("method / score", f"{config['method']} / {config['score']}"),
        ("density", str(config["density"])),
        ("trained entries", f"{config['num_entries']:,} in {config['num_tensors']} tensors ({size:.2f} MB)"),
        ("target modules", f"`{json.dumps(config['target_modules'])}`"),
        ("data", f"`{json.dumps(config['data'])}`" if config.get("data") is not None else "(not recorded)"),
        ("command", f"`{config['command']}`" if config.get("command") else "(not recorded)"),
    ]
    lines = front + [
        "",
        f"# GaLLoP sparse delta{f' of `{base}`' if base else ''}",
        "",
        "A sparse fine-tune: only the entries listed below changed. The file `gallop_delta.safetensors` "
        "stores, per trained tensor, their flat indices and the differences from the base there, "
        "plus a fingerprint of the base. Made with gallop_kernels.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Load it",
        "",
        "```python",
        config["load"]["python"],
        "```",
    ]
    if exported:
        lines += ["", "With PEFT (a SHiRA adapter with the same entries; "
                  f"r={config['peft']['r']}, {config['peft']['padding']:,} zero-valued padding entries):",
                  "", "```python", config["load"]["peft"], "```"]
    else:
        lines += ["", f"Not exported to PEFT: {config['peft'].get('reason', 'not requested')}."]
    lines += [
        "",
        "## Notes",
        "",
        "- The delta applies only to its base: `apply_delta` compares a sample of the model's weights "
        "with the recorded fingerprint and refuses another model (`check_base=False` overrides).",
        "- `apply_delta(model, folder, scale=s)` adds s times the differences; `merge_delta` returns the "
        "overwritten entries so that `unmerge_delta` restores the base exactly; `combine_deltas` "
        "adds several deltas with weights.",
    ]
    if config["base_quantization"] not in ("none", ""):
        lines.append(
            f"- Trained on a {config['base_quantization']} 4-bit base: the differences are from the "
            "dequantized weights. On the full-precision base, `apply_delta` writes W + Δ: the fine-tune "
            "transferred, not a bit-exact copy of the 4-bit model (whose weights differ from W by the "
            "quantization error)."
        )
    return "\n".join(lines) + "\n"


def _peft_part(delta: SparseDelta, peft: bool | str) -> tuple[dict[str, Any], Any]:
    if peft not in (True, False, "auto"):
        raise ValueError(f"peft must be True, False or 'auto', got {peft!r}")
    if peft is False:
        return {"exported": False, "reason": "not requested (peft=False)"}, None
    try:
        export = shira_export(delta)
    except NotExportable as e:
        if peft is True:
            raise
        return {"exported": False, "reason": str(e)}, None
    info = {"exported": True, "peft_type": "SHIRA", "r": export.r, "padding": export.padding,
            "files": [PEFT_CONFIG, PEFT_WEIGHTS]}
    return info, export


def save_adapter(
    folder: str | os.PathLike,
    delta: SparseDelta | str | os.PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    peft: bool | str = "auto",
    overwrite: bool = False,
) -> list[str]:
    """Write ``delta`` as an adapter folder; returns the paths written.

    Args:
        folder: created if missing.
        delta: a `SparseDelta` or a delta file.
        config: what the delta does not know, as JSON values: ``target_modules`` (the option as
            given), ``data`` (files or dataset names), ``command`` (the command line that trained
            it), ``training`` (hyperparameters), ``method`` (default "gallop"), anything else.
        peft: also write PEFT SHiRA files: "auto" (when SHiRA can hold the delta; the config says
            why not otherwise), True (refuse when it cannot) or False.
        overwrite: replace adapter files already in ``folder`` (and drop stale PEFT files).

    Everything is checked before the first file is written; each file is written atomically.
    """
    delta = as_delta(delta)
    check_delta(delta)
    if not isinstance(overwrite, bool):
        raise TypeError("overwrite must be a bool")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder!r} exists and is not a folder")
    peft_info, export = _peft_part(delta, peft)
    cfg = adapter_config(delta, config, peft_info)
    card = model_card(cfg, delta)
    paths = {name: os.path.join(folder, name) for name in ADAPTER_FILES}
    for name, path in paths.items():
        if os.path.islink(path):
            raise ValueError(f"{path!r} is a symbolic link; refusing to write through it")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace the adapter in {folder!r}")
    os.makedirs(folder, exist_ok=True)
    written = []
    save_delta(paths[DELTA_FILE], delta)  # (atomic itself)
    written.append(paths[DELTA_FILE])
    if export is not None:
        from safetensors.torch import save_file

        write_atomic(paths[PEFT_WEIGHTS], lambda tmp: save_file(export.tensors, tmp, metadata={"format": "pt"}))
        write_atomic(paths[PEFT_CONFIG], json.dumps(export.config, indent=2, sort_keys=True))
        written += [paths[PEFT_WEIGHTS], paths[PEFT_CONFIG]]
    else:
        for name in (PEFT_CONFIG, PEFT_WEIGHTS):  # (only reached with overwrite=True)
            if os.path.exists(paths[name]):
                os.remove(paths[name])
    write_atomic(paths[CARD_FILE], card)
    write_atomic(paths[CONFIG_FILE], json.dumps(cfg, indent=2) + "\n")
    return written + [paths[CARD_FILE], paths[CONFIG_FILE]]


MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 16
"""An adapter config is a few levels deep (the data sources, the PEFT export); 16 MiB at most."""


def _read_config(path: str) -> dict[str, Any]:
    """The adapter config at ``path``: a regular file (a FIFO or a device is refused, not read),
    bounded JSON (depth, integers, finite numbers), an object of this format and version."""
    import stat

    from gallop_kernels import bounded_json

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ValueError(f"{path!r} cannot be opened as a file ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path!r} is not a regular file")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path!r} is larger than {MAX_CONFIG_BYTES:,} bytes: not an adapter config")
    try:
        config = bounded_json.loads(data, max_depth=MAX_CONFIG_DEPTH)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path!r} is not a usable adapter config: {e}") from None
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path!r} is not a GaLLoP adapter config")
    if config.get("version") != ADAPTER_VERSION:
        raise ValueError(f"{path!r}: unsupported adapter config version {config.get('version')!r}")
    return config


def _check_config_schema(path: str, config: dict[str, Any]) -> None:
    """The keys a person or a tool reads from the config have the types save_adapter writes."""
    def bad(key: str, want: str) -> ValueError:
        return ValueError(f"{path!r}: {key} must be {want}, got {json.dumps(config.get(key))[:60]}")

    if not isinstance(config.get("method"), str):
        raise bad("method", "a string")
    target = config.get("target_modules")
    if not (isinstance(target, str) or isinstance(target, list) and all(isinstance(t, str) for t in target)):
        raise bad("target_modules", "a string or a list of strings")
    if config.get("command") is not None and not isinstance(config["command"], str):
        raise bad("command", "a string or null")
    peft = config.get("peft")
    if not isinstance(peft, dict) or not isinstance(peft.get("exported"), bool):
        raise bad("peft", "an object with a boolean 'exported'")
    if not isinstance(config.get("load"), dict):
        raise bad("load", "an object")


def load_adapter(folder: str | os.PathLike) -> Adapter:
    """Read an adapter folder written by `save_adapter` (``ValueError`` when it is not one, or
    when its config and delta do not belong together).

    The config is read as bounded JSON (nesting, integer length, finite numbers: no ``NaN`` or
    ``1e999``), its keys have the types save_adapter writes, and everything it says about the
    delta (version, kind, base, fingerprint, quantization, score, density, counts, trained
    modules) must equal what the delta itself says (`described`)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder!r}: not a GaLLoP adapter folder")
    config = _read_config(path)
    name = config.get("delta_file")
    if not isinstance(name, str) or name != os.path.basename(name) or name in ("", ".", ".."):
        raise ValueError(f"{path!r}: delta_file must be a file name inside the folder, got {name!r}")
    _check_config_schema(path, config)
    delta = as_delta(os.path.join(folder, name))
    differ = [k for k, v in described(delta).items() if config.get(k) != v]
    if differ:
        raise ValueError(f"{folder!r}: {CONFIG_FILE} and {name} describe different deltas ({', '.join(differ)} "
                         "differ)")
    return Adapter(delta, config)
