"""Multi-tensor launch tables and exact float conversions shared by the selection and step kernels.

A launch covers several tensors through one int64 table: a header row, then one row per tensor
("slot"). Field positions are named ``tl.constexpr`` globals, used both by the launcher that
fills a row (a constexpr works as a list index) and by the kernel that reads it, so no literal
offsets appear anywhere. The header holds what would otherwise be integer kernel arguments (the
number of slots and of binary-search steps), so no integer value ever selects a compiled variant
(see gallop_kernels/ops/_triton/launch.py).
"""

import torch
import triton
import triton.language as tl

TL_DTYPE = {
    torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
    torch.int32: tl.int32, torch.int64: tl.int64,
}
"""The Triton dtype a torch tensor is passed as (bf16 is addressed as uint16 inside: see below)."""

# Header row of every launch table (the rest of the header row is launch-specific or zero).
HEAD_SLOTS = tl.constexpr(0)  # number of slot rows
HEAD_LOG_SLOTS = tl.constexpr(1)  # binary-search steps to find a slot: launch.log_slots(slots)
HEAD_WORK = tl.constexpr(2)  # work items of the launch (tiles, blocks): programs split them


def build_table(header: list[int], rows: list[list[int]], row_fields: int) -> list[int]:
    """Flat values of one launch table: the header padded to a row, then the rows."""
    head = list(header) + [0] * (row_fields - len(header))
    values = head
    for row in rows:
        assert len(row) == row_fields
        values.extend(row)
    return values


@triton.jit
def find_slot(rows_ptr, item, n_slots, log_slots, ROW: tl.constexpr, START: tl.constexpr):
    """Largest slot s with rows[s, START] <= item (rows sorted by START, row 0 starts at 0).

    ``log_slots`` (from the header) bounds a runtime loop: one compiled kernel for any number of
    slots."""
    item = item.to(tl.int64)
    lo = item * 0
    hi = lo + n_slots.to(tl.int64)
    for _ in range(0, log_slots):
        mid = (lo + hi) // 2
        start = tl.load(rows_ptr + mid.to(tl.int64) * ROW + START)
        go = start <= item
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


# ----------------------------------------------------------------------------------------------
# Exact float conversions. A bf16 tensor is addressed as uint16 by the kernels: the Triton
# interpreter rounds fp32 -> bf16 half-up, so the store rounds the raw bits to nearest even
# itself (exact, and as cheap on a GPU). Loads bitcast the raw bits to bf16 and upcast (exact).
# ----------------------------------------------------------------------------------------------


@triton.jit
def as_pointer(address, DT: tl.constexpr):
    """A pointer of element type DT from an int64 address (bf16 tensors as uint16)."""
    if DT == tl.bfloat16:
        return address.to(tl.pointer_type(tl.uint16))
    else:
        return address.to(tl.pointer_type(DT))


@triton.jit
def load_f32(ptr, offs, mask, DT: tl.constexpr):
    """Load entries of a tensor of dtype DT (pointer from ``as_pointer``) upcast to float32."""
    if DT == tl.bfloat16:
        raw = tl.load(ptr + offs, mask=mask, other=0)
        return raw.to(tl.bfloat16, bitcast=True).to(tl.float32)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def bf16_bits(value):
    """The bits (in a uint32) of float32 ``value`` rounded to nearest even bfloat16."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, (bits >> 16) | 0x40, rounded)  # keep NaN a (quiet) NaN


@triton.jit
def store_from_f32(ptr, offs, value, mask, DT: tl.constexpr):
    """Store float32 ``value`` rounded to nearest even into a tensor of dtype DT."""
    if DT == tl.float32:
        tl.store(ptr + offs, value, mask=mask)
    elif DT == tl.bfloat16:
        tl.store(ptr + offs, bf16_bits(value).to(tl.uint16), mask=mask)
    else:
        tl.store(ptr + offs, value.to(DT), mask=mask)


@triton.jit
def rounded_f32(value, DT: tl.constexpr):
    """Float32 ``value`` rounded as `store_from_f32` stores it into DT, back in float32."""
    if DT == tl.float32:
        return value
    elif DT == tl.bfloat16:
        return (bf16_bits(value) << 16).to(tl.float32, bitcast=True)
    else:
        return value.to(DT).to(tl.float32)
