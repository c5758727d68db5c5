"""Quiet output: bitsandbytes' notice about a hub kernel we never use is dropped where we trigger it,
and nothing else is."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from gallop_kernels.quiet import BITSANDBYTES_CPU_LOGGER, no_bitsandbytes_notice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository "
          "'kernels-community/quantization-bitsandbytes' could not verify publisher trust status.")


def test_only_that_notice_is_dropped_and_only_within_the_block(caplog):
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    with caplog.at_level(logging.WARNING):
        with no_bitsandbytes_notice():
            logger.warning(NOTICE)
            logger.warning("bitsandbytes: something else")
        logger.warning(NOTICE)  # outside: a user who imports bitsandbytes themselves still sees it
    assert [r.getMessage() for r in caplog.records] == ["bitsandbytes: something else", NOTICE]


def test_importing_our_trainer_integration_prints_no_notice():
    # A fresh interpreter: bitsandbytes logs the notice once, when it is first imported (here through
    # transformers' Trainer modules -> peft -> bitsandbytes), on CPUs with AVX-512 BF16 like CI's.
    pytest.importorskip("peft")
    code = ("import logging, sys\n"
            "import gallop_kernels.integrations.transformers\n"
            "from gallop_kernels.adapter.shira import shira_export\n"
            "logging.getLogger('bitsandbytes').warning('another warning passes')\n"
            "print('bitsandbytes' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr and "another warning passes" in proc.stderr
