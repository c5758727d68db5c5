"""Quiet output: other libraries' progress bars and one bitsandbytes notice, off for a while.

Used by `gallop finetune`, `gallop demo` and `gallop reproduce`, so that ``--no-progress`` /
``--quiet`` mean what they say and a run without a 4-bit base does not print a 4-bit warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from gallop_kernels.extras import missing

DATASETS_BARS_ENV = "HF_DATASETS_DISABLE_PROGRESS_BARS"


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers', huggingface_hub's and datasets' own progress bars (weight loading, GGUF
    conversion, downloads, dataset preparation) on or off for the duration; the previous settings
    are restored afterwards. (Without transformers there are none to switch.)"""
    if missing("transformers", "huggingface_hub"):
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    datasets = sys.modules.get("datasets")  # not imported for it: it is slow to import
    was = (hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled(),
           datasets.is_progress_bar_enabled() if datasets else None, os.environ.get(DATASETS_BARS_ENV))
    if not enabled:
        hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
        if datasets:
            datasets.disable_progress_bars()
        os.environ[DATASETS_BARS_ENV] = "1"  # read when `datasets` is first imported (a hub dataset)
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was[0] else hf_logging.disable_progress_bar)()
        (hub_utils.enable_progress_bars if was[1] else hub_utils.disable_progress_bars)()
        if was[2] is not None:
            (datasets.enable_progress_bars if was[2] else datasets.disable_progress_bars)()
        if was[3] is None:
            os.environ.pop(DATASETS_BARS_ENV, None)
        else:
            os.environ[DATASETS_BARS_ENV] = was[3]


def _not_the_cpu_kernel_notice(record: logging.LogRecord) -> bool:
    return "gemm_4bit_forward" not in record.getMessage()


@contextlib.contextmanager
def no_bitsandbytes_notice(enabled: bool = True) -> Iterator[None]:
    """transformers' Trainer imports peft when it is installed, and peft imports bitsandbytes, whose
    CPU backend logs that an optional 4-bit kernel could not be fetched from the hub. Without a
    4-bit base that line is noise: filter exactly it while the Trainer modules are imported."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if enabled:
        logger.addFilter(_not_the_cpu_kernel_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_the_cpu_kernel_notice)
