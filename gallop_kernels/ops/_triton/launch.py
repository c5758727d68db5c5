"""Launch descriptions: what a launcher runs, as data the compile gate can enumerate.

Every Triton launch in `gallop_kernels.ops` is built as a `Launch` (kernel, grid, arguments,
constexprs, compiler options) and then run with ``launch()``. The same descriptions go to
`compile_for`, which compiles a launch ahead of time for a GPU architecture with the argument
specialisation that ``JITFunction.run`` derives for it (Triton's own binder: ints equal to 1 become
constexprs, ints and pointers divisible by 16 get the divisibility attribute), so the compile gate
(tests/test_compile_gate.py) and the static cost report (benchmarks/static_costs.py) see exactly the
variants a real call runs, never a hand-kept copy (`docs/design.md#compiled-kernels`).

Specialisation surface. The kernels take only pointers, float32 scalars and constexprs: sizes,
counts and seeds live in device buffers (launch tables, the selection state). Every pointer
argument is a fresh allocation or a slice at a multiple of 16 bytes (checked here), so one set of
constexprs is one compiled variant.

FP-fusion policy: every launch passes ``enable_fp_fusion=False``, so ``a * b + c`` is a multiply
and an add, each rounded, compiled as interpreted; a fused multiply-add appears only where a
kernel writes ``tl.fma`` (`docs/design.md#compiled-kernels`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

NUM_WARPS = 4
FP_FUSION = False  # the one FP-fusion policy of every launch (see the module docstring)
POINTER_ALIGN = 16  # bytes: every pointer argument is aligned to this (one specialisation)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(device: torch.device) -> None:
    """Raise unless Triton kernels can run on ``device`` here (CUDA, or the CPU interpreter)."""
    if device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {device} (or set TRITON_INTERPRET=1 before "
            f"importing triton to run them on the CPU)"
        )


def upload(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 table on ``device`` without blocking the host (pinned, non_blocking copy)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def log_slots(n: int) -> int:
    """Binary-search steps that find one of ``n`` rows (see ``multi_tensor.find_slot``)."""
    return max(1, math.ceil(math.log2(n)) + 1) if n > 1 else 0


def program_count(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Programs of a persistent launch: a few per SM (the interpreter: a handful), never more
    than there are work items, at least one."""
    if device.type == "cuda":
        programs = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    else:  # the interpreter runs programs one after another: two, so ranges split and loops loop
        programs = 2
    return max(1, min(int(work_items), programs))


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, **options)``."""

    kernel: Any  # a triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(
        default_factory=lambda: {"num_warps": NUM_WARPS, "enable_fp_fusion": FP_FUSION}
    )

    def __post_init__(self) -> None:
        for a in self.args:
            if isinstance(a, torch.Tensor) and a.data_ptr() % POINTER_ALIGN:
                raise AssertionError(
                    f"{self.name}: a pointer argument is not {POINTER_ALIGN}-byte aligned; the "
                    f"compile gate assumes every pointer is (see gallop_kernels/ops/_triton/launch.py)"
                )
            if isinstance(a, (bool, int)) and not isinstance(a, torch.Tensor):
                raise AssertionError(
                    f"{self.name}: integer argument {a!r}; pass ints through a device table so "
                    f"their value never selects a compiled variant"
                )

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(fn))

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)

    def variant_key(self) -> tuple:
        """What selects the compiled code: the kernel, its constexprs and compiler options."""
        return (self.name, tuple(sorted((k, str(v)) for k, v in self.constexprs.items())),
                tuple(sorted(self.options.items())))


def run_all(launches) -> None:
    for launch in launches:
        launch()


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed; not under TRITON_INTERPRET)
# ----------------------------------------------------------------------------------------------


def compile_for(launch: Launch, arch: int):
    """Compile ``launch`` for ``sm_<arch>`` as ``JITFunction.run`` would for the same arguments.

    Uses Triton's own binder (``create_function_from_signature``) and argument packing
    (``JITFunction._pack_args``) for the target's backend, so the signature, constexprs and
    divisibility attributes are the ones a real launch derives. Returns the CompiledKernel (its
    ``asm`` holds ttir, ttgir, llir, ptx and cubin). Must run in a process without
    TRITON_INTERPRET (the kernels must be JITFunctions).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{launch.name} is not a JITFunction (TRITON_INTERPRET=1 in this process?): compile "
            f"in a process without it"
        )
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    from triton import knobs

    kwargs = {**launch.constexprs, **launch.options}
    # the three options JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)
