"""The alternatives a user would pick instead of our kernels, callable from the benchmarks.

* torch selection baselines on the concatenated (materialised) scores: ``torch.topk``,
  ``torch.kthvalue``, ``torch.sort``; where a flat tensor is too large for them, a chunked
  top-k-then-merge (exact: the k largest of the whole are among the k largest of every chunk);
* the native CUDA baselines of ``kernels/`` (CUB top-k threshold, plain sparse AdamW), loaded with
  ctypes from the CMake build (``cmake -S . -B build && cmake --build build``);
* bitsandbytes ``AdamW8bit`` where it is installed and runs on the device.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
LIB_NAME = "libgallop_baselines.so"

# Largest flat tensor handed to torch.topk / kthvalue / sort in one piece. torch.topk's multi-block
# path and sort index with int32 inside; past this we use the chunked top-k-then-merge.
TORCH_FLAT_LIMIT = 2**31 - 1
CHUNK = 2**30

# --------------------------------------------------------------------------------------------------
# torch selection baselines (input: the float32 scores, already materialised)
# --------------------------------------------------------------------------------------------------


def topk_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest value with ``torch.topk`` (chunked past TORCH_FLAT_LIMIT)."""
    if scores.numel() > TORCH_FLAT_LIMIT:
        return chunked_topk(scores, k)[0].min()
    return torch.topk(scores, k, sorted=False).values.min()


def kthvalue_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest value with ``torch.kthvalue`` (the (N-k+1)-th smallest)."""
    return torch.kthvalue(scores, scores.numel() - k + 1).values


def sort_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest value with a full ``torch.sort``."""
    return torch.sort(scores, descending=True).values[k - 1]


def chunked_topk(scores: torch.Tensor, k: int, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (values, flat int64 indices) of a tensor too large for one ``torch.topk``:
    the top-min(k, chunk) of every chunk, then the top-k of the candidates."""
    vals, idxs = [], []
    n = scores.numel()
    for start in range(0, n, chunk):
        part = scores[start:start + chunk]
        kk = min(k, part.numel())
        v, i = torch.topk(part, kk, sorted=False)
        vals.append(v)
        idxs.append(i.to(torch.int64) + start)
    v = torch.cat(vals)
    i = torch.cat(idxs)
    top_v, pos = torch.topk(v, k, sorted=False)
    return top_v, i[pos]


def topk_select_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """What a user writes for a selection: sorted flat indices of ``torch.topk`` (ties arbitrary)."""
    if scores.numel() > TORCH_FLAT_LIMIT:
        idx = chunked_topk(scores, k)[1]
    else:
        idx = torch.topk(scores, k, sorted=False).indices
    return torch.sort(idx).values


def exact_compact(scores: torch.Tensor, threshold: torch.Tensor, k: int,
                  chunk: int = CHUNK) -> torch.Tensor:
    """The exact rule given the k-th largest value: sorted flat indices of every entry above the
    threshold plus the lowest-index ties, k in all (what an exact torch composition ends with).
    Chunked past ``chunk`` entries (torch.nonzero refuses more than 2^31 - 1 on CUDA)."""
    above, ties = [], []
    n = scores.numel()
    for start in range(0, n, chunk):
        part = scores[start:start + chunk]
        above.append((part > threshold).nonzero().squeeze(1) + start)
        ties.append((part == threshold).nonzero().squeeze(1) + start)
    above_t = torch.cat(above)
    ties_t = torch.cat(ties)[: k - above_t.numel()]
    return torch.cat([above_t, ties_t]).sort().values


def stable_sort_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The exact rule with one stable descending sort (ties keep index order), then sorted."""
    return torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values


def threshold_compact(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """torch compaction baseline: flat indices of the entries at or above the threshold.

    (Ignores the tie rule, so it is a lower bound on what an exact torch compaction costs.)"""
    return torch.nonzero(scores >= threshold).view(-1)


# --------------------------------------------------------------------------------------------------
# Native CUDA baselines (kernels/, via ctypes)
# --------------------------------------------------------------------------------------------------

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TOPK_METHODS = {0: "cub::DeviceRadixSort (full sort)", 1: "cub::DeviceTopK (AIR top-k)"}


def library_candidates() -> list[Path]:
    env = os.environ.get("GALLOP_BASELINES_LIB")
    paths = [Path(env)] if env else []
    paths += [REPO_ROOT / "build" / LIB_NAME, REPO_ROOT / "build" / "lib" / LIB_NAME]
    return paths


class NativeBaselines:
    """ctypes binding of ``kernels/gallop_baselines.h``. Raises ``RuntimeError`` on a failed call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        c = ctypes
        lib.gallop_bl_abi_version.restype = c.c_int
        lib.gallop_bl_topk_method.restype = c.c_int
        lib.gallop_bl_last_error.restype = c.c_char_p
        lib.gallop_bl_gallop_score.argtypes = [
            c.c_void_p, c.c_void_p, c.c_int, c.c_int64, c.c_float, c.c_void_p, c.c_void_p]
        lib.gallop_bl_topk_threshold_temp_bytes.argtypes = [c.c_int64, c.c_int64, c.POINTER(c.c_size_t)]
        lib.gallop_bl_topk_threshold.argtypes = [
            c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_size_t, c.c_void_p, c.c_void_p]
        lib.gallop_bl_sparse_adamw.argtypes = [
            c.c_void_p, c.c_int, c.c_void_p, c.c_int, c.c_void_p, c.c_int, c.c_void_p, c.c_void_p,
            c.c_void_p, c.c_int64, c.c_int64, c.c_double, c.c_double, c.c_double, c.c_double,
            c.c_double, c.c_void_p]
        for name in ("gallop_bl_gallop_score", "gallop_bl_topk_threshold_temp_bytes",
                     "gallop_bl_topk_threshold", "gallop_bl_sparse_adamw"):
            getattr(lib, name).restype = c.c_int
        self.lib = lib
        self.abi_version = lib.gallop_bl_abi_version()
        self.topk_method = TOPK_METHODS.get(lib.gallop_bl_topk_method(), "unknown")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed ({rc}): {self.lib.gallop_bl_last_error().decode()}")

    @staticmethod
    def _stream() -> int:
        return torch.cuda.current_stream().cuda_stream

    def gallop_score(self, theta: torch.Tensor, grad: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
        self._check(self.lib.gallop_bl_gallop_score(
            theta.data_ptr(), grad.data_ptr(), DTYPE_CODE[theta.dtype], theta.numel(), eps,
            out.data_ptr(), self._stream()), "gallop_bl_gallop_score")
        return out

    def threshold_temp(self, n: int, k: int, device: torch.device) -> torch.Tensor:
        nbytes = ctypes.c_size_t()
        self._check(self.lib.gallop_bl_topk_threshold_temp_bytes(n, k, ctypes.byref(nbytes)),
                    "gallop_bl_topk_threshold_temp_bytes")
        return torch.empty(max(1, nbytes.value), dtype=torch.uint8, device=device)

    def topk_threshold(self, scores: torch.Tensor, k: int, temp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self._check(self.lib.gallop_bl_topk_threshold(
            scores.data_ptr(), scores.numel(), k, temp.data_ptr(), temp.numel(), out.data_ptr(),
            self._stream()), "gallop_bl_topk_threshold")
        return out

    def sparse_adamw(self, param, grad, indices, exp_avg, exp_avg_sq, master, step, lr, beta1,
                     beta2, eps, weight_decay) -> None:
        self._check(self.lib.gallop_bl_sparse_adamw(
            param.data_ptr(), DTYPE_CODE[param.dtype], grad.data_ptr(), DTYPE_CODE[grad.dtype],
            indices.data_ptr(), int(indices.dtype == torch.int64), exp_avg.data_ptr(),
            exp_avg_sq.data_ptr(), master.data_ptr() if master is not None else None,
            indices.numel(), step, lr, beta1, beta2, eps, weight_decay, self._stream()),
            "gallop_bl_sparse_adamw")


def load_native(device: torch.device) -> tuple[NativeBaselines | None, str]:
    """The native baselines, or None and the reason they are unavailable (shown in the report)."""
    if device.type != "cuda":
        return None, "native CUDA baselines need a CUDA device (CPU run)"
    for path in library_candidates():
        if path.is_file():
            try:
                return NativeBaselines(path), f"loaded {path}"
            except OSError as exc:
                return None, f"could not load {path}: {exc}"
    return None, ("native baselines not built: run `cmake -S . -B build && cmake --build build` "
                  "in the repository root (needs nvcc), or set GALLOP_BASELINES_LIB")


# --------------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------------


def bnb_status(device: torch.device) -> tuple[Any, str]:
    """bitsandbytes' AdamW8bit class if it runs on ``device`` (tried on a small tensor), else None
    and why."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None, "bitsandbytes not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
        return None, f"bitsandbytes does not import: {type(exc).__name__}: {exc}"
    try:
        p = torch.nn.Parameter(torch.randn(8192, device=device))
        p.grad = torch.randn_like(p)
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        opt.step()
    except Exception as exc:  # noqa: BLE001
        return None, f"bitsandbytes {bnb.__version__} AdamW8bit does not run on {device.type}: {type(exc).__name__}: {exc}"
    return bnb.optim.AdamW8bit, f"bitsandbytes {bnb.__version__}"
