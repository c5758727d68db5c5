"""What the Triton launchers of every op share: launch descriptions, launch tables, the compile gate.

Importing it (every Triton launcher does) checks that the installed triton is in the declared
range (`ops/backends.py`), so an older one fails here with one clear message rather than deep
inside a compile; the torch backend never imports it.
"""

from gallop_kernels.ops.backends import triton_problem

_problem = triton_problem()
if _problem is not None:
    raise ImportError(_problem)
