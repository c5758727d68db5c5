"""Per-GPU peak memory of one training step under FSDP2 (``fully_shard``) on G GPUs: predictions.

The single-GPU model (`memory.model`) extended by what FSDP2 shards and what it gathers. Every
number here is a *prediction* of this analytic model: nothing was measured on several GPUs (no
GPU was available to this work; see ``docs/design.md#distributed``). Assumptions:

* Units: each decoder layer is one FSDP unit (``fully_shard(layer)``), the root unit
  (``fully_shard(model)``) holds the embedding, the final norm and ``lm_head``.
* Sharded across the G GPUs (divided by G): the weights, the optimizer state (SparseAdamW's
  state is per shard; the model assumes each shard holds ρ of its entries), the gradients kept
  until the step, lean mode's compact buffers.
* Not sharded: activations (each GPU runs its own batch, with gradient checkpointing as in the
  single-GPU model); the unsharded copy of the root unit (embedding + ``lm_head`` + norm), which
  FSDP2 keeps from the start of the forward to the end of the backward (the root is not
  resharded after its forward); the current and the prefetched decoder layer's unsharded
  parameters; one layer's unsharded gradients in flight plus FSDP2's reduce-scatter input copy;
  the unsharded ``lm_head`` gradient, held from the start of the backward to the root's
  reduce-scatter at its end, and the embedding's at the end.
* Methods: ``adamw`` (bf16 params and moments, as torch allocates them), ``adamw-mixed`` (the
  usual FSDP2 recipe: fp32 sharded params and fp32 m, v, ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``: fp32 sharded gradients), and SparseAdamW plain / lean (bf16 params,
  fp32 master of the selected entries; lean mode gathers each reduced shard in the
  post-accumulate-grad hook FSDP2 calls after the reduce-scatter, so no dense sharded gradient
  is kept). SparseAdamW refuses 8-bit moments on sharded params (their quantization blocks would
  depend on the number of ranks: `optim.distributed.check_state_bits`), so it has no row.
  Lean mode's frozen tensors (no selected entry on any shard) would skip their
  gradients; the model does not count on it.
* On CUDA, torch AdamW's foreach temporaries (``sqrt(v)`` over the shard); SparseAdamW's Triton
  step has none. The selection itself (phase one) is not modelled.
"""

from __future__ import annotations

from typing import Any

from gallop_kernels.memory import model as mm
from gallop_kernels.memory.methods import REGISTRY

FSDP2_METHODS = ("adamw", "adamw-mixed", "sparse", "sparse-lean")


def _unit_sizes(config: Any) -> tuple[int, int, int]:
    """(entries of one decoder layer, of the root unit's params, of lm_head + embedding)."""
    s = mm.Shape.of(config)
    layer = sum(t.numel for t in mm.param_specs(config) if "layers.*" in t.name)
    root = mm.count_params(config) - layer * s.layers
    head_and_embed = s.vocab * s.hidden * (1 if s.tied else 2)
    return layer, root, head_and_embed


def predict_fsdp2(config: Any, method: str, setup: mm.Setup, gpus: int) -> mm.Prediction:
    """Predicted per-GPU peak of one steady-state step of ``method`` under FSDP2 on ``gpus``."""
    if method not in FSDP2_METHODS:
        raise ValueError(f"method {method!r} has no FSDP2 row; expected one of {FSDP2_METHODS}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    m = REGISTRY[method]
    s = mm.Shape.of(config)
    G = gpus
    n = mm.count_params(config)
    a = mm.DTYPE_BYTES[setup.dtype]  # compute (and unsharded parameter) dtype
    mixed = method == "adamw-mixed"
    reduce = 4 if mixed else a  # gradient dtype of the reduce-scatter and of kept shards
    layer, root, head = _unit_sizes(config)

    persistent: dict[str, int] = {}
    if mixed:
        persistent["weights"] = 4 * n // G  # fp32 sharded params (the master copy)
        persistent["optimizer_state"] = 8 * n // G  # fp32 m, v
    else:
        persistent["weights"] = n * a // G
        persistent["optimizer_state"] = mm.optimizer_state_bytes(config, m, setup) // G
    if m.lean:
        persistent["compact_grads"] = 4 * mm.selected_entries(config, setup.density) // G
    persistent["framework"] = mm.CPU_FRAMEWORK_BYTES if setup.device == "cpu" else mm.CUDA_FRAMEWORK_BYTES
    base = sum(persistent.values())

    kept = 0 if m.lean else n * reduce // G  # sharded gradients until the step
    root_unsharded = root * a
    layers_unsharded = 2 * layer * a  # the current layer and the prefetched one
    layer_grads = layer * (a + reduce) + layer * reduce // G  # grads, reduce input, output
    head_grad = (0 if s.tied else s.vocab * s.hidden) * a

    act = mm.activation_terms(config, m, setup)
    held = act.ckpt_inputs + act.final_norm
    one_input = act.ckpt_inputs // s.layers
    moments: dict[str, int] = {}
    moments["forward: layer transient"] = (base + root_unsharded + layers_unsharded
                                           + act.ckpt_inputs + act.layer_forward_transient)
    moments["forward: logits and loss"] = base + root_unsharded + held + act.logits_forward
    moments["backward: loss"] = base + root_unsharded + held + act.logits_loss_backward
    moments["backward: lm_head"] = (base + root_unsharded + act.ckpt_inputs + act.logits_grad
                                    + head_grad)
    moments["backward: layer"] = (base + root_unsharded + head_grad + layers_unsharded
                                  + layer_grads + act.layer_saved + act.layer_grad_transient
                                  + max(act.ckpt_inputs, kept - layer * reduce // G + one_input))
    moments["backward: root reduce-scatter"] = (base + root_unsharded + root * (a + reduce)
                                                + kept)
    if setup.device == "cuda":
        temporaries = (n * a // G if method == "adamw" else 4 * n // G if mixed else 0)
    else:
        temporaries = mm.step_temporaries(config, m, setup) // G
    moments["step"] = base + kept + temporaries
    phases = {
        "forward": max(v for k, v in moments.items() if k.startswith("forward")),
        "backward": max(v for k, v in moments.items() if k.startswith("backward")),
        "step": moments["step"],
    }
    label = "FSDP2 + " + ("AdamW, fp32 sharded params + m, v (mixed precision)" if mixed else m.label)
    return mm.Prediction(method, label, persistent, phases, moments)


def fsdp2_table(name: str, config: Any, setup: mm.Setup, gpus: list[int],
                methods: tuple[str, ...] = FSDP2_METHODS) -> str:
    """Markdown: predicted per-GPU peak (GB) for each method and GPU count, next to one GPU."""
    n = mm.count_params(config)
    head = " | ".join(f"FSDP2 × {g} GPUs" for g in gpus)
    lines = [
        f"Predicted per-GPU peak of one training step under FSDP2 (prediction only: nothing "
        f"here was measured on several GPUs): {name} ({n / 1e9:.2f} B parameters), "
        f"{setup.device}, {setup.dtype}, batch {setup.batch} per GPU, seq {setup.seq}, gradient "
        f"checkpointing, ρ = {setup.density:g}. Each decoder layer is an FSDP unit; the root "
        f"unit (embedding, lm_head) stays unsharded through forward and backward.",
        "",
        f"| method | 1 GPU, no FSDP | {head} |",
        "|---|---:|" + "---:|" * len(gpus),
    ]
    for key in methods:
        one = mm.predict(config, key, setup).peak
        row = [f"{predict_fsdp2(config, key, setup, g).peak / 1e9:.1f}" for g in gpus]
        label = predict_fsdp2(config, key, setup, 1).label
        lines.append(f"| {label} | {one / 1e9:.1f} | " + " | ".join(row) + " |")
    return "\n".join(lines)


__all__ = ["FSDP2_METHODS", "fsdp2_table", "predict_fsdp2"]
