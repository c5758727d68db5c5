"""``gallop finetune``: validated JSONL data, the Trainer-based GaLLoP pipeline, and its CLI."""

from gallop_kernels.finetune.data import DataError, load_jsonl, load_records
from gallop_kernels.finetune.pipeline import FinetuneConfig, FinetuneResult, NotAvailableYet, run_finetune

__all__ = ["DataError", "FinetuneConfig", "FinetuneResult", "NotAvailableYet", "load_jsonl", "load_records",
           "run_finetune"]
