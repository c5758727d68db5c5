"""A kernel compiled only to look at how the installed Triton lowers it (`launch.histogram_uses_ballots`)."""

import triton
import triton.language as tl


@triton.jit
def histogram_probe(x_ptr, out_ptr):
    """A 64-bin histogram of 128 keys."""
    offs = tl.arange(0, 128)
    tl.store(out_ptr + tl.arange(0, 64), tl.histogram(tl.load(x_ptr + offs), 64))
