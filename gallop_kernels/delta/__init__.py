"""The trained sparse delta: differences from the base at the trained entries, in one small file.

A GaLLoP fine-tune changes only the selected entries of the trained tensors, so what it learned is
a sparse delta: per tensor, sorted flat indices and the differences trained − base there, plus a
fingerprint of the base (`docs/design.md#delta-format`)::

    delta = extract_delta(model, optimizer, base="path/to/base")    # or base=<the base model>
    save_delta("gallop_delta.safetensors", delta)
    apply_delta(base_model, "gallop_delta.safetensors")             # rebuilds the fine-tune exactly
    apply_delta(base_model, delta, scale=0.5)                       # half of it
    restore = merge_delta(base_model, delta); unmerge_delta(base_model, restore)
    both = combine_deltas([delta_a, delta_b], weights=[0.7, 0.3])

Modules: `format` (the dataclass, its checks and the file), `fingerprint` (the base sample),
`base` (where base values come from), `ops` (apply, merge, unmerge, combine, convert), `extract`
(from a SparseAdamW run). The 4-bit path's reader and writer are in
`gallop_kernels.integrations.bitsandbytes.io`; adapter folders in `gallop_kernels.adapter`.
"""

from gallop_kernels.delta.base import BaseSource, BaseTensors, open_base
from gallop_kernels.delta.extract import extract_delta
from gallop_kernels.delta.fingerprint import BaseSample, TensorView
from gallop_kernels.delta.format import (
    ABSOLUTE,
    DELTA_FILE,
    DIFFERENCE,
    FORMAT,
    READABLE_VERSIONS,
    RESERVED_KEYS,
    VERSION,
    SparseDelta,
    check_delta,
    check_entries,
    load_delta,
    new_delta,
    save_delta,
    score_label,
)
from gallop_kernels.delta.ops import (
    apply_delta,
    as_delta,
    check_base,
    check_scale,
    combine_deltas,
    exact_difference,
    merge_delta,
    to_difference,
    unmerge_delta,
)

__all__ = [
    "ABSOLUTE", "DELTA_FILE", "DIFFERENCE", "FORMAT", "READABLE_VERSIONS", "RESERVED_KEYS", "VERSION",
    "BaseSample", "BaseSource", "BaseTensors", "SparseDelta", "TensorView",
    "apply_delta", "as_delta", "check_base", "check_delta", "check_entries", "check_scale",
    "combine_deltas", "exact_difference", "extract_delta", "load_delta", "merge_delta", "new_delta",
    "open_base", "save_delta", "score_label", "to_difference", "unmerge_delta",
]
