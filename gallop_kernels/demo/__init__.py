"""Offline demo: a tiny Llama learns a new generated task with SparseAdamW and keeps the old one.

``gallop demo`` (or ``python -m gallop_kernels demo``) runs it; ``run_demo`` is the same as a function.
"""

from gallop_kernels.demo.run import DemoConfig, DemoResult, print_result, run_demo

__all__ = ["DemoConfig", "DemoResult", "print_result", "run_demo"]
