"""Small-scale reproduction of GaLLoP's comparison: ``gallop reproduce`` (see docs/reproduction.md)."""

from gallop_kernels.reproduce.runner import METHODS, SMOKE, ReproConfig, run_reproduction

__all__ = ["METHODS", "ReproConfig", "SMOKE", "run_reproduction"]
