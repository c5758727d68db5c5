"""What a run is: the options that decide its trajectory and fingerprints of its model and data.

A checkpoint records them, and a resumed run must match them (`docs/design.md#run-folders`); the
model and the data are compared by content (sizes and samples of the model's files, the SHA-256 of
every data file), never by how their paths are spelled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from gallop_kernels.finetune.rundir.files import lstat_or_none, open_regular, file_sha256

MAY_CHANGE_ON_RESUME = frozenset({
    "output", "resume", "overwrite", "epochs", "max_steps", "save_steps", "logging_steps", "progress",
    "save_full", "gradient_checkpointing", "eval_data", "eval_steps", "report_to",
    "model", "data",  # compared by content (fingerprints), not by how they are spelled
    "max_line_bytes",  # a bound on reading; the data's content is compared
})
"""Options a resumed run may change: how long it trains, how often it saves, logs and evaluates.
Every other option must equal the checkpoint's (a new option is checked unless it is listed here)."""

_SAMPLE = 1 << 16  # bytes per sample of a large file's fingerprint
_SAMPLES = 16


def sampled_sha256(path: str) -> str:
    """SHA-256 of a file's size and of evenly spread samples (all of it when small): cheap for a
    model's weights, and different for another model of the same shapes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        digest = hashlib.sha256(str(size).encode())
        if size <= _SAMPLE * _SAMPLES:
            digest.update(os.pread(fd, size, 0))
        else:
            for i in range(_SAMPLES):
                digest.update(os.pread(fd, _SAMPLE, (size - _SAMPLE) * i // (_SAMPLES - 1)))
        return digest.hexdigest()
    finally:
        os.close(fd)


def model_fingerprint(spec: str | None) -> str:
    """A local model folder or file by its content (names, sizes, samples); anything else (the
    embedded default, a hub id) by its name."""
    if spec is None:
        return "embedded"
    path = os.path.expanduser(os.fspath(spec))
    st = lstat_or_none(path)
    if st is not None and os.path.isdir(path):
        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                digest.update(f"{name}\0{sampled_sha256(os.path.realpath(full))}\0".encode())
        return "folder:" + digest.hexdigest()
    if st is not None and os.path.isfile(path):
        return "file:" + sampled_sha256(os.path.realpath(path))
    return f"name:{spec}"


def _source(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        for candidate in (text, text.rsplit(":", 1)[0]):  # "file.jsonl:0.7" names a weighted file
            path = os.path.expanduser(candidate)
            if os.path.isfile(path):
                return {"sha256": file_sha256(os.path.realpath(path)), "rest": text[len(candidate):]}
        return text
    if isinstance(value, (list, tuple)):
        return [_source(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _source(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return value


def data_fingerprint(data: Any) -> str:
    """The training data by content: every file named in ``data`` by its SHA-256."""
    return hashlib.sha256(json.dumps(_source(data), sort_keys=True, default=str).encode()).hexdigest()


def run_options(config: Any) -> dict[str, Any]:
    """The options that decide a run's trajectory, as plain JSON values (``MAY_CHANGE_ON_RESUME``
    left out), with the model and data fingerprints."""
    values = dataclasses.asdict(config)
    options = {k: v for k, v in values.items() if k not in MAY_CHANGE_ON_RESUME}
    options = json.loads(json.dumps(options, default=str))
    return {"options": options, "model": values.get("model"), "data": values.get("data"),
            "model_fingerprint": model_fingerprint(values.get("model")),
            "data_fingerprint": data_fingerprint(values.get("data"))}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def option_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What a checkpoint was saved with and this run asks differently, one phrase each."""
    out = []
    old, new = saved.get("options", {}), current["options"]
    for key in sorted(set(old) & set(new)):  # an option newer or older than the checkpoint is not compared
        if old[key] != new[key]:
            out.append(f"{_flag(key)} was {json.dumps(old[key])}, now {json.dumps(new[key])}")
    if saved.get("model_fingerprint") != current["model_fingerprint"]:
        out.append(f"--model is another model (the checkpoint's: {saved.get('model')!r})")
    if saved.get("data_fingerprint") != current["data_fingerprint"]:
        out.append(f"--data is other data (the checkpoint's: {saved.get('data')!r}; a file's content counts)")
    return out
