"""Multi-tensor launch helpers shared by the selection and sparse AdamW kernels.

A launch covers several tensors through an int64 table with one row per tensor ("slot"): data
pointers, sizes and the index of the slot's first program. A program finds its slot by binary
search over that column, so one launch serves any number of tensors without per-tensor launches.
"""

import triton
import triton.language as tl


@triton.jit
def find_slot(table_ptr, pid, n_slots, NF: tl.constexpr, F_START: tl.constexpr,
              LOG_SLOTS: tl.constexpr):
    """Largest slot s with table[s, F_START] <= pid (rows sorted by F_START, row 0 starts at 0)."""
    lo = 0
    hi = n_slots
    for _ in tl.static_range(LOG_SLOTS):
        mid = (lo + hi) // 2
        start = tl.load(table_ptr + mid.to(tl.int64) * NF + F_START)
        go = start <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


# ----------------------------------------------------------------------------------------------
# Exact float conversions. bfloat16 goes through its raw bits: the Triton interpreter converts
# bf16 subnormals wrongly and rounds fp32 -> bf16 half-up, and the bit version is exact (and as
# cheap) on a GPU too. So a bf16 tensor is addressed as uint16 by the kernels.
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
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_from_f32(ptr, offs, value, mask, DT: tl.constexpr):
    """Store float32 ``value`` rounded to nearest even into a tensor of dtype DT."""
    if DT == tl.float32:
        tl.store(ptr + offs, value, mask=mask)
    elif DT == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        out = tl.where(nan, (bits >> 16) | 0x40, rounded)  # keep NaN a (quiet) NaN
        tl.store(ptr + offs, out.to(tl.uint16), mask=mask)
    else:
        tl.store(ptr + offs, value.to(DT), mask=mask)
