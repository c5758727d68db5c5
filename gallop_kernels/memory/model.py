"""An analytic model of the peak memory of one fine-tuning step of a Llama-architecture model.

The step is the steady-state one (the optimizer state exists already): forward to the loss,
backward, ``optimizer.step()``, for batch B, sequence S, gradient checkpointing on every decoder
layer (non-reentrant ``torch.utils.checkpoint``, as transformers enables it). Everything is
counted in bytes of *live tensors*; the peak is the maximum over the moments listed below, never
the sum of everything.

Notation: T = B·S tokens, h hidden, I MLP width, V vocabulary, L layers, nh/nkv query/key-value
heads of width d, w bytes per parameter (2 for bf16), a bytes per activation (the compute dtype:
w, or bf16 over a 4-bit base), N parameters, k = round(ρ·N) selected entries.

Persistent through the whole step (``persistent``):
  * weights: N·w; a 4-bit NF4 base keeps every decoder-layer linear at 0.5 byte/entry plus one
    fp32 absmax per block of 64 (bitsandbytes' default, no double quantization), while the
    embedding, ``lm_head`` and norms stay in the compute dtype (transformers never quantizes
    ``lm_head``);
  * LoRA adapters: r·(in + out) per decoder-layer linear, fp32 (peft's ``autocast_adapter_dtype``
    upcasts adapters of a bf16 model);
  * optimizer state, per method (the formulas of `memory.methods.state_bytes`):
      - torch AdamW: exp_avg, exp_avg_sq in the *parameter's* dtype (2·N·w; torch allocates them
        ``zeros_like(param)``);
      - AdamW with fp32 master and fp32 moments (the mixed-precision recipe; a reference row):
        12·N;
      - bitsandbytes AdamW8bit: 1 byte per entry for each of m, v plus an fp32 absmax per block
        of 256, for tensors of >= 4096 entries (``min_8bit_size``); smaller ones keep fp32 m, v;
      - LoRA: fp32 AdamW m, v of the adapters;
      - SparseAdamW: per selected entry an int32 index + fp32 m + fp32 v (+ fp32 master for
        bf16/fp16 params) = 12–16 bytes; lean mode adds the compact fp32 gradient buffer
        (4 bytes per selected entry, kept between steps);
      - 8-bit state (``SparseAdamW(state_bits=8)``): m, v 1 byte each + an fp32 absmax per 256
        entries (blockwise, bitsandbytes' maps), index and master unchanged; a tensor with
        fewer than 4096 selected entries keeps fp32 m, v;
      - 4-bit base + delta (`gallop_kernels.integrations.bitsandbytes`): k = round(ρ·N_linear)
        over the linear weights but ``lm_head`` ("all-linear"; embedding, ``lm_head``, norms frozen);
        per selected entry an fp32 delta value + int32 index (module buffers) + fp32 m, v of
        ``delta_optimizer``'s fused AdamW; the fp32 gradient of the delta values (4 bytes per
        entry) exists from the backward to the step;
  * framework: a constant — on CPU the tensors that autograd, the model's Python objects and
    small buffers hold (measured: ~16 MB, independent of the model size); on CUDA the cuBLAS
    workspace (32 MiB on Hopper), which the caching allocator counts.

Activations with gradient checkpointing:
  * checkpoint inputs: every decoder layer's input, L·T·h·a, held from the forward until that
    layer's backward;
  * the final RMSNorm's saved tensors (an fp32 copy of its input, the normalized and the scaled
    output): (4 + 2a)·T·h;
  * logits: ``lm_head`` writes T·V in the compute dtype, transformers' loss upcasts them to fp32
    (``logits.float()``: 4·T·V, none for fp32) and ``cross_entropy`` keeps its fp32 log-softmax
    (4·T·V) for the backward. For vocab 128256 these dominate the activations;
  * one layer's recompute: the tensors autograd saves inside a decoder layer (its RMSNorms,
    q/k/v after RoPE, attention output and its contiguous copy, logsumexp; eager attention also
    keeps the fp32 softmax and its cast, B·nh·S²·(4 + a); the MLP's gate, SiLU, up and product,
    4·a·T·I; LoRA adds fp32 copies of each adapted linear's input) plus the gradients flowing
    through the MLP (3·a·T·I).

Moments of the step (the phases of ``phases``):
  * forward: persistent + checkpoint inputs + final norm + logits (a + 4 + 4)·T·V (the bf16
    logits, their fp32 copy, the log-softmax), or one layer's transient if larger;
  * backward, loss: the saved log-softmax, the gradient of the loss w.r.t. it and the gradient
    w.r.t. the logits, 12·T·V, all fp32, at the same moment; then the cast back (4 + a)·T·V; then
    ``lm_head``'s backward: a·T·V + its weight gradient;
  * backward, layers: gradients accumulated so far (dense methods keep every trainable tensor's
    gradient until the step; lean mode gathers each gradient into its compact buffer in the
    post-accumulate-grad hook and frees it, so at most one dense gradient — the largest tensor's —
    exists at a time) + the checkpoint inputs still held + one layer's recompute;
  * a 4-bit base dequantizes each linear's weight (W + Δ in the compute dtype, a·out·in) inside
    its forward and again for grad_x; before that, the delta's backward forms the dense fp32
    weight gradient grad_outᵀx (4·out·in; on CPU from fp32 copies of both operands) only to
    gather the selected entries — never at the same time as the dequantized weight;
  * backward, end: all dense gradients (the embedding's gradient is the last one written);
  * step: persistent + dense gradients + the optimizer's temporaries:
      - torch AdamW on CPU (single-tensor loop, torch's default there): ``sqrt(v)`` and its
        quotient for the largest tensor, 2·w·max(numel); on CUDA (foreach, the default there):
        ``_foreach_sqrt(exp_avg_sqs)`` over all tensors at once, N·w (0 with ``fused=True``);
      - bitsandbytes AdamW8bit on CPU (its pure-torch CPU kernel): fp32 copies of m, v, the
        gradient, the parameter, ``sqrt(v)`` and the denominator for the largest tensor,
        24·max(numel) (20 for fp32 params); on CUDA a fused kernel, 0;
      - SparseAdamW, torch backend (CPU): k-sized temporaries of one tensor's selection — int64
        indices, sqrt(v), the denominator, the gathered fp32 gradient in plain mode, and the
        dequantized m, v with 8-bit state (16–36 bytes per selected entry); Triton on CUDA: 0;
      - the 4-bit delta's fused AdamW: 0.

Where the selected entries land is data-dependent; the model assumes every tensor gets ρ of its
entries. This only moves small terms: the sparse step's k-sized temporaries (sized by the tensor
with the most selected entries) and which tensors keep fp32 moments under 8-bit state. Measured
on llama-0.3b with the gallop score, the busiest tensor held ~7 % of its entries and the norms
none (lean mode freezes them).

What this model does not cover: the memory of the selection itself (phase one; see
`gallop_kernels.calibrate`, which keeps the dense gradient on the host), allocator
fragmentation and caching (on CUDA the *reserved* memory can exceed ``max_memory_allocated``), and
a CUDA context (≈0.5 GB, outside ``max_memory_allocated``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gallop_kernels.memory import methods as registry
from gallop_kernels.memory.methods import Method
from gallop_kernels.rules import check_fraction

GB = 1e9
GIB = 2**30

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

CPU_FRAMEWORK_BYTES = 16 * 2**20  # measured constant, see the module docstring
CUDA_FRAMEWORK_BYTES = 32 * 2**20  # cuBLAS workspace on sm90
NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize (one fp32 absmax per block)


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor shape of the model, repeated ``count`` times (e.g. once per layer)."""

    name: str
    shape: tuple[int, ...]
    count: int
    kind: str  # "embedding", "lm_head", "linear" (decoder-layer projection), "norm", "bias"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def total(self) -> int:
        return self.numel * self.count


@dataclass(frozen=True)
class Setup:
    """What is trained, and how."""

    batch: int = 1
    seq: int = 2048
    dtype: str = "bf16"  # parameters and compute (bf16 compute over a 4-bit base)
    device: str = "cuda"  # selects the optimizers' kernels (their temporaries) and the overhead
    attn: str = "sdpa"  # "sdpa" (flash/efficient kernels) or "eager"
    density: float = 0.01
    lora_rank: int = 16
    adamw_fused: bool = False  # torch's default: foreach on CUDA, a per-tensor loop on CPU

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.attn not in ("sdpa", "eager"):
            raise ValueError(f"attn must be 'sdpa' or 'eager', got {self.attn!r}")
        check_fraction(self.density, "density")
        if self.batch < 1 or self.seq < 1:
            raise ValueError("batch and seq must be >= 1")


@dataclass
class Prediction:
    method: str
    label: str
    persistent: dict[str, int]  # bytes held through the whole step, by term
    phases: dict[str, int]  # peak bytes of each phase
    moments: dict[str, int] = field(default_factory=dict)  # every modelled moment, bytes

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def as_dict(self) -> dict[str, Any]:
        return dict(method=self.method, label=self.label, peak=self.peak,
                    peak_phase=self.peak_phase, phases=dict(self.phases),
                    persistent=dict(self.persistent), moments=dict(self.moments))


# ----------------------------------------------------------------------------------------------
# Shapes and parameter counts
# ----------------------------------------------------------------------------------------------


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def of(cls, config: Any) -> "Shape":
        hidden = int(_get(config, "hidden_size"))
        heads = int(_get(config, "num_attention_heads"))
        kv = _get(config, "num_key_value_heads") or heads
        head_dim = _get(config, "head_dim") or hidden // heads
        return cls(
            hidden=hidden, layers=int(_get(config, "num_hidden_layers")),
            intermediate=int(_get(config, "intermediate_size")),
            vocab=int(_get(config, "vocab_size")), heads=heads, kv_heads=int(kv),
            head_dim=int(head_dim), tied=bool(_get(config, "tie_word_embeddings", False)),
            attention_bias=bool(_get(config, "attention_bias", False)),
            mlp_bias=bool(_get(config, "mlp_bias", False)),
        )


def param_specs(config: Any) -> list[TensorSpec]:
    """Every parameter tensor of ``LlamaForCausalLM(config)``; GQA k/v widths; tied embeddings
    give no ``lm_head`` entry (the tensor is shared)."""
    s = Shape.of(config)
    h, L, q, kv = s.hidden, s.layers, s.heads * s.head_dim, s.kv_heads * s.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (s.vocab, h), 1, "embedding")]
    linears = [
        ("self_attn.q_proj", q, h, s.attention_bias),
        ("self_attn.k_proj", kv, h, s.attention_bias),
        ("self_attn.v_proj", kv, h, s.attention_bias),
        ("self_attn.o_proj", h, q, s.attention_bias),
        ("mlp.gate_proj", s.intermediate, h, s.mlp_bias),
        ("mlp.up_proj", s.intermediate, h, s.mlp_bias),
        ("mlp.down_proj", h, s.intermediate, s.mlp_bias),
    ]
    for name, out, inp, bias in linears:
        specs.append(TensorSpec(f"model.layers.*.{name}.weight", (out, inp), L, "linear"))
        if bias:
            specs.append(TensorSpec(f"model.layers.*.{name}.bias", (out,), L, "bias"))
    specs.append(TensorSpec("model.layers.*.input_layernorm.weight", (h,), L, "norm"))
    specs.append(TensorSpec("model.layers.*.post_attention_layernorm.weight", (h,), L, "norm"))
    specs.append(TensorSpec("model.norm.weight", (h,), 1, "norm"))
    if not s.tied:
        specs.append(TensorSpec("lm_head.weight", (s.vocab, h), 1, "lm_head"))
    return specs


def count_params(config: Any) -> int:
    return sum(t.total for t in param_specs(config))


def lora_params(config: Any, rank: int = 16) -> int:
    """Adapter entries of LoRA on every decoder-layer linear (peft's "all-linear" leaves out
    ``lm_head``): r·(in + out) each."""
    return sum(rank * (t.shape[0] + t.shape[1]) * t.count
               for t in param_specs(config) if t.kind == "linear")


def selected_entries(config: Any, density: float) -> int:
    """k = round(ρ·N) over all parameters (one param group), as SparseAdamW."""
    n = count_params(config)
    return min(n, max(1, math.floor(density * n + 0.5)))


def delta_entries(config: Any, density: float) -> int:
    """k of the 4-bit base + delta: `select_sparse_delta` selects round(ρ·N) over the targeted
    ("all-linear": every linear but ``lm_head``) layers' weights; embedding, ``lm_head`` and norms
    stay frozen."""
    n = sum(t.total for t in param_specs(config) if t.kind == "linear")
    return min(n, max(1, math.floor(density * n + 0.5)))


def _method(method: str | Method) -> Method:
    return method if isinstance(method, Method) else registry.get(method)


# ----------------------------------------------------------------------------------------------
# Terms
# ----------------------------------------------------------------------------------------------


def weight_bytes(config: Any, setup: Setup, four_bit: bool = False) -> int:
    w = DTYPE_BYTES[setup.dtype]
    total = 0
    for t in param_specs(config):
        if four_bit and t.kind == "linear":
            total += t.count * (t.numel // 2 + math.ceil(t.numel / NF4_BLOCK) * 4)
        else:
            total += t.total * w
    return total


def optimizer_state_bytes(config: Any, method: str | Method, setup: Setup) -> int:
    """Bytes of optimizer state (persistent), excluding lean mode's compact gradients: the
    registry's formula over the tensors the method trains."""
    m = _method(method)
    specs = param_specs(config)
    if m.trains == "lora":  # fp32 adapters r·(in + out) per decoder-layer linear
        tensors = [(setup.lora_rank * (t.shape[0] + t.shape[1]), t.count) for t in specs if t.kind == "linear"]
        return registry.state_bytes(m, tensors, param_bytes=4)
    if m.trains == "delta":  # the fp32 delta values, one per selected entry
        return registry.state_bytes(m, [(delta_entries(config, setup.density), 1)], param_bytes=4)
    return registry.state_bytes(m, [(t.numel, t.count) for t in specs],
                                param_bytes=DTYPE_BYTES[setup.dtype], density=setup.density)


@dataclass(frozen=True)
class Activations:
    ckpt_inputs: int
    final_norm: int
    logits_forward: int
    logits_loss_backward: int
    logits_cast_backward: int
    logits_grad: int  # gradient w.r.t. the logits in the compute dtype, during lm_head backward
    layer_saved: int  # one decoder layer's saved tensors during its recompute
    layer_grad_transient: int  # gradients flowing through one layer's backward
    layer_forward_transient: int  # the largest live set inside one layer's forward (no saving)


def activation_terms(config: Any, method: str | Method, setup: Setup) -> Activations:
    method = _method(method)
    s = Shape.of(config)
    a = 2 if method.four_bit else DTYPE_BYTES[setup.dtype]
    T, h, I, V = setup.batch * setup.seq, s.hidden, s.intermediate, s.vocab
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    upcast = 4 if a < 4 else 0  # the fp32 copy RMSNorm and the loss make (none when fp32)
    lora = method.trains == "lora"

    # One RMSNorm: fp32 copy of the input (pow, mul), the normalized tensor before the weight,
    # and its output (saved by the next linear when its weight is trained).
    norm = (upcast + 2 * a) * T * h
    attn = a * T * (q + 2 * kv)  # q, k after RoPE and v, saved by the attention kernel
    attn += a * T * q  # attention output saved by the kernel
    attn += a * T * q  # its contiguous copy, o_proj's input
    attn += 4 * setup.batch * s.heads * setup.seq  # logsumexp (fp32)
    if setup.attn == "eager":
        attn += setup.batch * s.heads * setup.seq**2 * (4 + a)  # fp32 softmax and its cast
    mlp = 4 * a * T * I  # gate, SiLU(gate), up, product
    layer_saved = 2 * norm + attn + mlp
    if lora:
        # peft casts each adapted linear's input to the adapters' fp32 for lora_A: q, k, v, gate
        # and up each make their own copy of the norm output, o of the attention output, down of
        # the MLP product; lora_A's r-wide outputs are saved by lora_B.
        layer_saved += 4 * T * (5 * h + q + I) + 7 * 4 * T * setup.lora_rank
    layer_grad = 3 * a * T * I
    layer_fwd = 3 * a * T * I + 2 * a * T * h
    if setup.attn == "eager":
        layer_fwd = max(layer_fwd, setup.batch * s.heads * setup.seq**2 * (2 * a + 4))

    logits_fwd = (a + upcast + 4) * T * V
    return Activations(
        ckpt_inputs=s.layers * T * h * a,
        final_norm=(4 + 2 * a) * T * h,
        logits_forward=logits_fwd,
        logits_loss_backward=12 * T * V,
        logits_cast_backward=(4 + a) * T * V if a < 4 else 4 * T * V,
        logits_grad=a * T * V,
        layer_saved=layer_saved,
        layer_grad_transient=layer_grad,
        layer_forward_transient=layer_fwd,
    )


def step_temporaries(config: Any, method: str | Method, setup: Setup) -> int:
    method = _method(method)
    w = DTYPE_BYTES[setup.dtype]
    specs = param_specs(config)
    largest = max(t.numel for t in specs)
    cpu = setup.device == "cpu"
    if method.trains == "lora":
        lin = [t for t in specs if t.kind == "linear"]
        largest_adapter = max(setup.lora_rank * max(t.shape) for t in lin)
        return 2 * 4 * largest_adapter if cpu else 4 * lora_params(config, setup.lora_rank)
    if method.trains == "delta":
        return 0  # delta_optimizer: fused torch AdamW (CPU and CUDA kernels), no temporaries
    if method.optimizer == "adamw":
        if setup.adamw_fused:
            return 0
        return 2 * w * largest if cpu else w * count_params(config)
    if method.optimizer == "adamw-mixed":
        return 0 if setup.adamw_fused else (2 * 4 * largest if cpu else 4 * count_params(config))
    if method.optimizer == "adamw8bit":
        return ((24 if w < 4 else 20) * largest) if cpu else 0
    if not cpu:
        return 0  # the Triton kernels update in place
    # torch backend, one tensor at a time: int64 copy of the indices (8 bytes per selected
    # entry), sqrt(v) and the denominator (4 + 4), the gathered fp32 gradient (plain mode: 4;
    # lean mode's compact gradient is already fp32), a fp32 weight copy without a master (4);
    # 8-bit state adds the dequantized fp32 m, v (4 + 4) and their int64 codes (8).
    # Where the selected entries land is data-dependent; assumed: each tensor gets ρ of its
    # entries, so the largest tensor has the most.
    k_max = max(round(setup.density * largest), 1)
    per_entry = 16 + (0 if method.lean else 4)
    per_entry += 0 if w < 4 else 4
    if method.state_bits == 8:
        per_entry += 16
    return per_entry * k_max


# ----------------------------------------------------------------------------------------------
# The peak
# ----------------------------------------------------------------------------------------------


def predict(config: Any, method: str | Method, setup: Setup | None = None) -> Prediction:
    """The predicted peak of one steady-state training step of ``method`` (see module doc)."""
    setup = setup or Setup()
    method = _method(method)
    four_bit, lean, lora = method.four_bit, method.lean, method.trains == "lora"
    w = DTYPE_BYTES[setup.dtype]
    a = 2 if four_bit else w  # compute dtype
    shape = Shape.of(config)
    specs = param_specs(config)
    vocab_h = shape.vocab * shape.hidden
    largest_linear = max(t.numel for t in specs if t.kind == "linear")

    persistent: dict[str, int] = {"weights": weight_bytes(config, setup, four_bit)}
    if lora:
        persistent["adapters"] = 4 * lora_params(config, setup.lora_rank)
    if four_bit:
        persistent["delta_values_and_indices"] = 8 * delta_entries(config, setup.density)
    persistent["optimizer_state"] = optimizer_state_bytes(config, method, setup)
    if lean:
        persistent["compact_grads"] = 4 * selected_entries(config, setup.density)
    persistent["framework"] = CPU_FRAMEWORK_BYTES if setup.device == "cpu" else CUDA_FRAMEWORK_BYTES
    base = sum(persistent.values())

    # Gradients. kept: bytes of gradients alive at the end of the backward and in the step;
    # head/embed: the lm_head's and embedding's weight gradients when they are written (0 when
    # frozen); before_layers/after_layers: gradients kept when the backward reaches the first /
    # leaves the last decoder layer.
    if lora:
        kept, head, embed = 4 * lora_params(config, setup.lora_rank), 0, 0
        before_layers, after_layers = 0, kept
    elif four_bit:  # only the delta values train: their fp32 gradient, k entries
        kept, head, embed = 4 * delta_entries(config, setup.density), 0, 0
        before_layers, after_layers = 0, kept
    elif lean:  # gathered into the compact buffers (persistent) as soon as each is written
        kept, head, embed = 0, vocab_h * w, vocab_h * w
        before_layers = after_layers = 0
    else:
        kept = count_params(config) * w
        head = 0 if shape.tied else vocab_h * w
        embed = vocab_h * w
        before_layers, after_layers = head, kept - embed
    # One dense weight gradient in flight inside a layer's backward: lean mode's (the hook frees
    # it), or the 4-bit delta's fp32 grad_outᵀx (plus, on CPU, fp32 copies of both operands), or
    # the 4-bit base's dequantized weight for grad_x, whichever is larger (they never coexist).
    if lean:
        in_flight = largest_linear * w
    elif four_bit:
        big = max((t for t in specs if t.kind == "linear"), key=lambda t: t.numel)
        copies = 4 * setup.batch * setup.seq * sum(big.shape) if setup.device == "cpu" else 0
        in_flight = max(4 * largest_linear + copies, a * largest_linear)
    else:
        in_flight = 0

    act = activation_terms(config, method, setup)
    m: dict[str, int] = {}
    held = act.ckpt_inputs + act.final_norm
    m["forward: layer transient"] = (base + act.ckpt_inputs + act.layer_forward_transient
                                     + (a * largest_linear if four_bit else 0))
    m["forward: logits and loss"] = base + held + act.logits_forward
    m["backward: loss"] = base + held + act.logits_loss_backward
    m["backward: logits cast"] = base + held + act.logits_cast_backward
    m["backward: lm_head"] = base + act.ckpt_inputs + act.logits_grad + head
    # A decoder layer's backward: its recompute's saved tensors, the gradients flowing through
    # it and the one in flight, on top of the gradients kept so far and the checkpoint inputs
    # still held — the worst of the first layer processed (every input still held) and the last
    # one (every layer's gradients kept).
    layer = act.layer_saved + act.layer_grad_transient + in_flight
    one_input = act.ckpt_inputs // shape.layers
    m["backward: layer"] = base + layer + max(before_layers + act.ckpt_inputs,
                                              after_layers + one_input)
    m["backward: end"] = base + max(kept, embed)  # the embedding's gradient is written last
    m["step"] = base + kept + step_temporaries(config, method, setup)

    phases = {
        "forward": max(v for k, v in m.items() if k.startswith("forward")),
        "backward": max(v for k, v in m.items() if k.startswith("backward")),
        "step": m["step"],
    }
    return Prediction(method.key, method.label, persistent, phases, m)


def predict_all(config: Any, setup: Setup | None = None,
                methods: list[str] | None = None) -> list[Prediction]:
    keys = methods or list(registry.REGISTRY)
    return [predict(config, k, setup) for k in keys]
