"""Memory report: an analytic model of a training step's peak memory per method, and the
measurements that check it (``gallop memory``, ``python -m gallop_kernels.memory``)."""

from gallop_kernels.memory.model import (
    METHODS, Prediction, Setup, count_params, param_specs, predict, predict_all,
)
from gallop_kernels.memory.presets import PRESETS, ConfigError, load_config

__all__ = ["METHODS", "PRESETS", "ConfigError", "Prediction", "Setup", "count_params",
           "load_config", "param_specs", "predict", "predict_all"]
