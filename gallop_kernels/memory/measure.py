"""Measure the memory of ONE real training step of a method, in a fresh process.

    python -m gallop_kernels.memory.measure --config llama-0.3b --method sparse-lean --seq 256

prints one JSON object. What is measured, in order:

1. imports, then a warm-up step of the same method on a tiny model (so code pages, thread pools,
   oneDNN/bitsandbytes libraries are already resident), then everything is freed;
2. **baseline** = the process's memory now (CPU: resident set size; CUDA: ``memory_allocated``);
3. the model is built from the config with random weights (and wrapped/quantized per method), the
   optimizer created, and two *warm* steps taken: they allocate the optimizer state, lean mode's
   compact gradients and, for the sparse methods, select (the selection's transient memory is
   phase one, not a training step; the 4-bit delta selects with `select_sparse_delta` first);
4. ``zero_grad(set_to_none=True)``, then the peak is reset and the **measured step** runs:
   forward (to the loss), backward, ``optimizer.step()``. The peak is read after each phase and
   reset between phases, so each phase's own peak is known; the step's peak is their maximum.

On CPU the peak is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; Linux resets it (with VmHWM) by
writing ``5`` to ``/proc/self/clear_refs``. Reported numbers are increments over the baseline, so
they contain the model, its gradients, optimizer state and activations, and not the interpreter
or the libraries. glibc is told to serve every allocation of 64 KiB or more with ``mmap``
(``MALLOC_MMAP_THRESHOLD_``; the process re-executes itself with it set), so freed tensors leave
the resident set at once and RSS follows the live tensors, as ``memory_allocated`` does on CUDA.
On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

A method whose dependency (bitsandbytes, peft) is missing prints ``{"available": false, "reason":
...}`` and exits 0: no number is made up. Which method builds what comes from `memory.methods`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

from gallop_kernels.memory.methods import MEASURED
from gallop_kernels.quiet import no_bitsandbytes_notice

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}

WARM_STEPS = 2
PROGRESS = "progress: "  # the start of a progress line on stderr (`gallop memory --measure` shows them)


def _progress(text: str) -> None:
    print(PROGRESS + text, file=sys.stderr, flush=True)


class NotAvailable(Exception):
    """A dependency of the method is missing."""


# ----------------------------------------------------------------------------------------------
# Memory probes
# ----------------------------------------------------------------------------------------------


class CpuProbe:
    """Resident-set size now, and its peak since the last reset (ru_maxrss)."""

    def __init__(self) -> None:
        self.resettable = self._try_reset()

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the peak is the best we have
            return self.peak()

    def peak(self) -> int:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib * (1 if sys.platform == "darwin" else 1024)

    def reset(self) -> None:
        gc.collect()
        _malloc_trim()
        if self.resettable:
            self._try_reset()

    @staticmethod
    def file_pages() -> int | None:
        """File-backed resident bytes (library code, mapped files): constant unless the kernel
        evicts them under memory pressure, which would make RSS increments read low."""
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssFile:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


class CudaProbe:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.resettable = True

    def current(self) -> int:
        self.torch.cuda.synchronize()
        return self.torch.cuda.memory_allocated()

    def peak(self) -> int:
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated()

    def reset(self) -> None:
        gc.collect()
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------
# Building a method
# ----------------------------------------------------------------------------------------------


def _enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _random_model(config, dtype, attn: str, device: str):
    import torch
    from transformers import LlamaForCausalLM

    from gallop_kernels.memory.presets import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(llama_config(config), dtype=dtype, attn_implementation=attn)
    return model.to(device)


def build(method: str, config, dtype, attn: str, device: str, density: float, ids=None):
    """(model, optimizer, info) for ``method`` (a `memory.methods` key); raises NotAvailable when
    a dependency is missing. ``ids``: the batch phase one calibrates on (4-bit delta only)."""
    import torch

    from gallop_kernels.memory.methods import get

    m = get(method)
    if m.reference:
        raise ValueError(f"{method!r} is a prediction-only reference row, not measured")
    info: dict[str, Any] = {}
    if m.four_bit:
        return _build_4bit_delta(config, dtype, attn, device, density, ids)
    model = _random_model(config, dtype, attn, device)
    _enable_checkpointing(model)
    model.train()
    if m.trains == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise NotAvailable(f"peft is not installed ({e})")
        lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        info["lora_params"] = sum(p.numel() for p in trainable)
        info["lora_dtype"] = str(trainable[0].dtype)
        opt = torch.optim.AdamW(trainable, lr=1e-4)
    elif m.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    elif m.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise NotAvailable(f"bitsandbytes is not installed ({e})")
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-5)
    else:  # SparseAdamW
        from gallop_kernels import SparseAdamW

        opt = SparseAdamW(list(model.named_parameters()), lr=1e-5, density=density, lean=m.lean,
                          state_bits=m.state_bits)
    return model, opt, info


def _materialize(model) -> None:
    """Copy tensors that still live in the checkpoint's memory map into ordinary memory.

    On CPU, ``from_pretrained`` leaves the unquantized tensors (embedding, ``lm_head``, norms)
    as views of the mmapped safetensors file: their pages count in the resident set only once
    touched, while pages of the quantized layers' bf16 source stay resident as long as the map
    lives. A move to a GPU copies them; copying here does the same on CPU, so the resident set
    holds what the model allocates (measured before this: +193 MB of file pages on llama-0.3b).
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and type(p).__name__ != "Params4bit":
                    p.data = p.data.clone()
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.clone()
    gc.collect()
    _malloc_trim()


def _build_4bit_delta(config, dtype, attn, device, density, ids):
    """NF4 base (transformers + BitsAndBytesConfig, from a saved random model), wrapped and
    selected by `select_sparse_delta` (phase one, before the measured step), trained with
    `delta_optimizer` (fused torch AdamW over the fp32 delta values)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise NotAvailable("bitsandbytes is not installed")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from gallop_kernels.integrations import bitsandbytes as integration

    base = _random_model(config, dtype, attn, "cpu")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        del base
        gc.collect()
        model = LlamaForCausalLM.from_pretrained(
            tmp, quantization_config=quant, dtype=dtype, attn_implementation=attn,
            device_map={"": device if device == "cpu" else 0},
        )
        _materialize(model)
    _enable_checkpointing(model)
    model.train()
    integration.select_sparse_delta(
        model, [ids], lambda b: model(input_ids=b, labels=b).loss, density=density)
    opt = integration.delta_optimizer(model, lr=1e-5)
    info = {"num_selected": sum(p.numel() for _, p in integration.delta_parameters(model))}
    return model, opt, info


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def _batch(config, batch: int, seq: int, device: str):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=g)
    return ids.to(device)


def _step(model, opt, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _warm_up(method: str, dtype, attn: str, device: str, density: float) -> None:
    from gallop_kernels.memory.presets import load_config

    cfg = load_config("llama-tiny")
    ids = _batch(cfg, 1, 16, device)
    model, opt, _ = build(method, cfg, dtype, attn, device, density, ids)
    for _ in range(2):
        _step(model, opt, ids)
    del model, opt, ids


def measure(config_name: str, method: str, *, seq: int, batch: int, dtype_name: str,
            attn: str, device: str, density: float) -> dict[str, Any]:
    import torch

    from gallop_kernels.memory.presets import load_config

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    config = load_config(config_name)
    result: dict[str, Any] = dict(
        config=config_name, method=method, seq=seq, batch=batch, dtype=dtype_name, attn=attn,
        device=device, density=density, torch=torch.__version__, threads=torch.get_num_threads(),
    )
    t0 = time.perf_counter()
    _progress(f"warm-up on llama-tiny ({method})")
    try:
        _warm_up(method, dtype, attn, device, density)
    except NotAvailable as e:
        return {**result, "available": False, "reason": str(e)}
    probe = CudaProbe() if device.startswith("cuda") else CpuProbe()
    probe.reset()
    baseline = probe.current()
    file_before = probe.file_pages() if isinstance(probe, CpuProbe) else None

    ids = _batch(config, batch, seq, device)
    _progress(f"building {config_name} with random weights ({method})")
    model, opt, info = build(method, config, dtype, attn, device, density, ids)
    result.update(info)
    # Warm steps: the first allocates the optimizer state (and selects, for SparseAdamW); the
    # second is lean mode's first gather, which allocates its compact gradient buffers. The
    # measured step is then a steady-state one.
    for i in range(WARM_STEPS):
        _progress(f"warm step {i + 1} of {WARM_STEPS}" + (" (allocates the state; selects)" if i == 0 else ""))
        _step(model, opt, ids)
    result["warm_steps"] = WARM_STEPS
    if hasattr(opt, "num_selected"):
        result["num_selected"] = int(opt.num_selected)
        result["frozen_tensors"] = len(opt.frozen)
        per_tensor = {n: int(opt.state[p]["indices"].numel()) for n, p in model.named_parameters()
                      if p in opt.state and "indices" in opt.state[p]}
        if per_tensor:
            top = max(per_tensor, key=per_tensor.get)
            result["most_selected_tensor"] = [top, per_tensor[top]]
    result["params"] = sum(p.numel() for p in model.parameters())

    probe.reset()
    result["before_step"] = probe.current() - baseline
    phases = {}
    _progress("measured step: forward, backward, optimizer step")
    loss = model(input_ids=ids, labels=ids).loss
    phases["forward"] = probe.peak() - baseline
    probe.reset()
    loss.backward()
    del loss
    phases["backward"] = probe.peak() - baseline
    probe.reset()
    opt.step()
    phases["step"] = probe.peak() - baseline
    if file_before is not None:
        # Pages evicted (memory pressure from other processes) shrink the RSS under the
        # baseline: such a measurement reads low and is refused rather than reported.
        dropped = file_before - (probe.file_pages() or 0)
        result["file_pages_dropped"] = dropped
        if dropped > 16 * 2**20:
            return {**result, "available": False,
                    "reason": f"disturbed: {dropped / 2**20:.0f} MiB of file pages were evicted "
                              "during the measurement (memory pressure); run it again alone"}
    result.update(
        available=True, baseline=baseline, phases=phases, peak=max(phases.values()),
        phase_peaks_exact=probe.resettable, seconds=round(time.perf_counter() - t0, 1),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gallop_kernels.memory.measure",
        description="Measure the peak memory of one training step of a method (one JSON line).",
    )
    parser.add_argument("--config", default="llama-0.3b", help="preset name or config.json path")
    parser.add_argument("--method", required=True, choices=MEASURED)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--density", type=float, default=0.01)
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with no_bitsandbytes_notice():  # bitsandbytes' import-time notice about a hub kernel we never use
        out = measure(args.config, args.method, seq=args.seq, batch=args.batch, dtype_name=args.dtype,
                      attn=args.attn, device=device, density=args.density)
    print(json.dumps(out), flush=True)
    return 0


def _reexec_with_malloc_env() -> None:
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "gallop_kernels.memory.measure",
                               *sys.argv[1:]], env)


if __name__ == "__main__":
    _reexec_with_malloc_env()
    sys.exit(main())
