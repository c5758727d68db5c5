"""Quiet output: other libraries' progress bars and one bitsandbytes notice, off for a while.

Used by `gallop finetune`, `gallop demo` and `gallop reproduce`, so that ``--no-progress`` /
``--quiet`` mean what they say, and around every import of ours that imports bitsandbytes, so that
its notice about a hub kernel we never use is not printed.
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


BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def _not_the_cpu_kernel_notice(record: logging.LogRecord) -> bool:
    return "gemm_4bit_forward" not in record.getMessage()


@contextlib.contextmanager
def no_bitsandbytes_notice(enabled: bool = True) -> Iterator[None]:
    """bitsandbytes logs, once, *when it is imported* on a CPU with AVX-512 BF16, that it could not
    fetch an optional 4-bit CPU kernel from the hub (``Failed to load CPU gemm_4bit_forward ...
    trust_remote_code``). We never use that kernel, and we import bitsandbytes only indirectly
    (transformers' Trainer modules import peft, peft imports bitsandbytes), so the line is noise.

    Within the block exactly that record of that logger is dropped; every other warning passes.
    Because the notice comes at import, the block must surround the import that triggers it: every
    ``gallop`` command runs inside one (`gallop_kernels.cli.main`), and so do the imports of peft
    and of the Trainer in the Python API (`integrations.transformers`, `adapter.shira`), the
    finetune pipeline, the reproduction's workers and the memory measurement's subprocess. (It
    missed before because it surrounded only `gallop finetune` without ``--bits 4`` and
    `gallop reproduce`, while `gallop demo` and the Python API imported peft outside it.)"""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if enabled:
        logger.addFilter(_not_the_cpu_kernel_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_the_cpu_kernel_notice)
