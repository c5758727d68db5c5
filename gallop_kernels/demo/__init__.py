"""Offline demos. ``gallop demo``: GaLLoP teaches the embedded SmolLM2-135M-Instruct a new skill,
measured before and after together with six skills it had (`demo/real.py`). ``gallop demo --tiny``: the seconds-long version on a tiny
random Llama and generated tasks, for CI and quick checks (`demo/tiny.py`).
"""

from gallop_kernels.demo.real import DemoConfig, DemoResult, print_result, run_demo
from gallop_kernels.demo.tiny import TinyDemoConfig, TinyDemoResult, print_tiny_result, run_tiny_demo

__all__ = ["DemoConfig", "DemoResult", "TinyDemoConfig", "TinyDemoResult", "print_result", "print_tiny_result",
           "run_demo", "run_tiny_demo"]
