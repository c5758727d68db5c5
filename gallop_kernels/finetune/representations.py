"""The two trainable representations ``gallop finetune`` runs, behind one small interface.

* :class:`SparseWeights` -- SparseAdamW state on the model's own weights; phase one runs inside
  the ``Trainer`` (`GallopCallback`), and the delta is read from the optimizer's indices.
* :class:`SparseDelta4bit` -- a sparse fp32 delta on a 4-bit NF4 base; phase one runs before the
  ``Trainer`` is built (the delta values it creates are what the optimizer trains), and plain
  AdamW trains them.

Each supplies what the skeleton in `finetune.pipeline` needs (`docs/design.md#finetune`):
``prepare`` (make the model trainable, phase one where it comes first), ``trainer_options`` (the
optimizer spec), ``callbacks``, ``selection`` (the one summary, and how it was made), the counts
for the result, and ``extract_delta``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from torch import nn

from gallop_kernels.summary import Summary, summarize


class Representation:
    """The interface (and its neutral defaults)."""

    four_bit = False  # the model loads with a 4-bit base

    def __init__(self, config: Any, log: Callable[[str], Any] | None = None) -> None:
        self.config = config
        self.log = log or (lambda line: None)  # progress lines of phase one
        self.num_trainable = 0

    def prepare(self, model: nn.Module, dataset: Any, collate_fn: Any) -> None:
        raise NotImplementedError

    def trainer_options(self, model: nn.Module, args: Any) -> dict[str, Any]:
        raise NotImplementedError

    def callbacks(self) -> list[Any]:
        return []

    @contextlib.contextmanager
    def trainer_context(self, model: nn.Module) -> Iterator[None]:
        yield

    def selection(self) -> tuple[Summary | None, str]:
        """The selection summary (None before phase one) and how it was made."""
        raise NotImplementedError

    def calibration_examples(self) -> int:
        raise NotImplementedError

    def num_selected(self, trainer: Any) -> int:
        raise NotImplementedError

    def extract_delta(self, model: nn.Module, trainer: Any, base_model: str, metadata: dict[str, Any],
                      base: Any = None) -> Any:
        """The trained delta: differences from ``base`` (the base's weights folder, see
        `gallop_kernels.delta.base`) at the trained entries."""
        raise NotImplementedError


class SparseWeights(Representation):
    """SparseAdamW on the targeted weights themselves (plain or lean)."""

    def __init__(self, config: Any, log: Callable[[str], Any] | None = None) -> None:
        from gallop_kernels.integrations.transformers import GallopCallback

        super().__init__(config, log)
        self.phase_one = GallopCallback(calibration_fraction=config.calibration_fraction, log=log)

    def prepare(self, model: nn.Module, dataset: Any, collate_fn: Any) -> None:
        from gallop_kernels.integrations.targets import select_trainable

        c = self.config
        names = select_trainable(model, c.target_modules, embeddings=c.train_embeddings, norms=c.train_norms)
        self.num_trainable = sum(model.get_parameter(n).numel() for n in names)
        if c.quantization_floor:
            self.floors = gguf_floors(model, names, c.model)
            self.log(f"quantization floor: {sum(f > 0 for f in self.floors.values())} of {len(names)} trained "
                     "tensors are quantized in the GGUF file; their |θ| is floored at half its step")

    def trainer_options(self, model: nn.Module, args: Any) -> dict[str, Any]:
        from gallop_kernels.integrations.transformers import gallop_optimizer_cls_and_kwargs

        c = self.config
        spec = gallop_optimizer_cls_and_kwargs(args, density=c.density, score=c.score, seed=c.seed, lean=c.lean)
        return {"optimizer_cls_and_kwargs": spec}

    def callbacks(self) -> list[Any]:
        floors = getattr(self, "floors", None)
        return ([score_floor_callback(floors)] if floors is not None else []) + [self.phase_one]

    def selection(self) -> tuple[Summary | None, str]:
        how = ("loaded from the checkpoint" if self.phase_one.resumed else
               f"from the mean gradient of {self.phase_one.num_examples} calibration example(s)")
        return self.phase_one.summary, how

    def calibration_examples(self) -> int:
        return self.phase_one.num_examples

    def num_selected(self, trainer: Any) -> int:
        from gallop_kernels.optim.unwrap import unwrap_optimizer

        return unwrap_optimizer(trainer.optimizer).num_selected

    def extract_delta(self, model: nn.Module, trainer: Any, base_model: str, metadata: dict[str, Any],
                      base: Any = None) -> Any:
        from gallop_kernels.delta import extract_delta

        return extract_delta(model, trainer.optimizer, base=base, base_model=base_model, metadata=metadata)


class SparseDelta4bit(Representation):
    """A sparse fp32 delta on the targeted layers of a 4-bit NF4 base."""

    four_bit = True

    def __init__(self, config: Any, log: Callable[[str], Any] | None = None) -> None:
        super().__init__(config, log)
        self.wrapped: dict[str, Any] = {}
        self.summary: Summary | None = None
        self.examples = 0

    def prepare(self, model: nn.Module, dataset: Any, collate_fn: Any) -> None:
        import torch

        from gallop_kernels.integrations import bitsandbytes as bnb_delta

        c = self.config
        self.log(f"phase one (4-bit base): calibrating on a {c.calibration_fraction:g} fraction of "
                 f"{len(dataset)} training examples and selecting ...")
        t0 = time.perf_counter()
        self.wrapped, self.examples = bnb_delta.select_sparse_delta_from_dataset(
            model, dataset, collate_fn, c.density, score=c.score, target_modules=c.target_modules,
            fraction=c.calibration_fraction, batch_size=c.batch_size, seed=c.seed,
            autocast_dtype=torch.bfloat16 if c.bf16 else None, quantization_floor=c.quantization_floor,
        )
        self.num_trainable = sum(m.weight_numel for m in self.wrapped.values())
        self.summary = summarize((f"{name}.weight", m.delta_indices.numel(), m.weight_numel)
                                 for name, m in self.wrapped.items())
        selected = self.num_selected(None)
        self.log(f"phase one (4-bit base): {self.examples} calibration examples; selected {selected:,} of "
                 f"{self.num_trainable:,} entries ({selected / max(self.num_trainable, 1):.2%}) "
                 f"in {time.perf_counter() - t0:.1f} s")

    def trainer_options(self, model: nn.Module, args: Any) -> dict[str, Any]:
        from gallop_kernels.integrations import bitsandbytes as bnb_delta

        optimizer = bnb_delta.delta_optimizer(model, lr=self.config.lr, weight_decay=self.config.weight_decay)
        return {"optimizers": (optimizer, None)}

    @contextlib.contextmanager
    def trainer_context(self, model: nn.Module) -> Iterator[None]:
        # The Trainer refuses a "purely quantized" model (it looks for PEFT adapters); the sparse
        # delta is our adapter, so pass its check while the Trainer is built.
        flag = getattr(model, "_hf_peft_config_loaded", False)
        model._hf_peft_config_loaded = True
        try:
            yield
        finally:
            model._hf_peft_config_loaded = flag

    def selection(self) -> tuple[Summary | None, str]:
        return self.summary, f"4-bit base, from the mean gradient of {self.examples} calibration example(s)"

    def calibration_examples(self) -> int:
        return self.examples

    def num_selected(self, trainer: Any) -> int:
        return sum(int(m.delta_indices.numel()) for m in self.wrapped.values())

    def extract_delta(self, model: nn.Module, trainer: Any, base_model: str, metadata: dict[str, Any],
                      base: Any = None) -> Any:
        # (the 4-bit layers hold their own base: differences are taken against the dequantized weights)
        from gallop_kernels.integrations import bitsandbytes as bnb_delta

        return bnb_delta.extract_sparse_delta(model, base_model=base_model,
                                              metadata={**metadata, "bits": 4})


def gguf_floors(model: nn.Module, names: list[str], spec: Any) -> dict[int, float]:
    """``{id(param): floor}`` for the trained params of a model loaded from a GGUF file: half the
    median step of each one's GGUF quantization (0 for a param the file stores unquantized)."""
    from gallop_kernels import score_floor
    from gallop_kernels.models import gguf_quantization, gguf_source

    source = gguf_source(spec)
    if source is None:
        raise ValueError("--quantization-floor needs a quantized base: --bits 4, or a .gguf --model")
    formats = gguf_quantization(source)
    return {id(model.get_parameter(n)): f
            for n, f in zip(names, score_floor.floors([(n, model.get_parameter(n)) for n in names], formats))}


def score_floor_callback(floors: dict[int, float]) -> Any:
    """A callback that sets each param group's ``score_floor`` (one floor per param) when training
    begins, before `GallopCallback` selects: the Trainer builds the groups, the floors follow them."""
    from transformers import TrainerCallback

    from gallop_kernels.optim.unwrap import unwrap_optimizer

    class ScoreFloorCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            for group in unwrap_optimizer(optimizer).param_groups:
                group["score_floor"] = [floors.get(id(p), 0.0) for p in group["params"]]
            return control

    return ScoreFloorCallback()


def representation_for(config: Any, log: Callable[[str], Any] | None = None) -> Representation:
    """``--bits 4``: the delta on a 4-bit base; otherwise SparseAdamW on the weights."""
    return (SparseDelta4bit if config.bits == 4 else SparseWeights)(config, log)
