"""``gallop finetune``: validated chat/prompt/text data, the config, the Trainer-based GaLLoP pipeline, its CLI.

In Python, ``run_finetune(FinetuneConfig(data=["train.jsonl"], density=0.01))`` (or
``run_finetune(FinetuneConfig.from_file("run.yaml"))``) does what the command does.
"""

from gallop_kernels.finetune.config import FinetuneConfig, NotAvailableYet
from gallop_kernels.finetune.data import (
    CausalLMCollator,
    DataError,
    encode_records,
    load_jsonl,
    load_records,
    load_training_data,
)
from gallop_kernels.finetune.pipeline import FinetuneResult, run_finetune

__all__ = ["CausalLMCollator", "DataError", "FinetuneConfig", "FinetuneResult", "NotAvailableYet", "encode_records",
           "load_jsonl", "load_records", "load_training_data", "run_finetune"]
