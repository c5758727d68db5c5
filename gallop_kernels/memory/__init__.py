"""Memory report: an analytic model of a training step's peak memory per method, and the
measurements that check it (``gallop memory``, ``python -m gallop_kernels.memory``). The methods
and their optimizer-state formulas are one registry, `memory.methods`."""

from gallop_kernels.memory.methods import REGISTRY, Method, state_bytes
from gallop_kernels.memory.model import Prediction, Setup, count_params, param_specs, predict, predict_all
from gallop_kernels.memory.presets import PRESETS, ConfigError, load_config

__all__ = ["PRESETS", "REGISTRY", "ConfigError", "Method", "Prediction", "Setup", "count_params",
           "load_config", "param_specs", "predict", "predict_all", "state_bytes"]
