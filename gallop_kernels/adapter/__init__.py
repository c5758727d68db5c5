"""GaLLoP deltas as adapter folders: ``save_pretrained``/``from_pretrained``-shaped, a config and a
model card beside the delta, PEFT SHiRA files where SHiRA can hold it, and ``push_to_hub``
(`docs/design.md#adapter-folder`)::

    from gallop_kernels.adapter import save_adapter, load_adapter, push_to_hub
    save_adapter("out/adapter", delta, config={"target_modules": "all-linear", "data": ["train.jsonl"],
                                              "command": "gallop finetune ..."})
    adapter = load_adapter("out/adapter"); adapter.apply(model)        # or apply_delta(model, "out/adapter")
    PeftModel.from_pretrained(base, "out/adapter")                     # when SHiRA could hold it
"""

from gallop_kernels.adapter.folder import (
    ADAPTER_FILES,
    CARD_FILE,
    CONFIG_FILE,
    DERIVED_KEYS,
    Adapter,
    adapter_config,
    load_adapter,
    model_card,
    save_adapter,
)
from gallop_kernels.adapter.hub import push_to_hub
from gallop_kernels.adapter.shira import PEFT_CONFIG, PEFT_WEIGHTS, NotExportable, ShiraExport, shira_export

__all__ = [
    "ADAPTER_FILES", "CARD_FILE", "CONFIG_FILE", "DERIVED_KEYS", "PEFT_CONFIG", "PEFT_WEIGHTS",
    "Adapter", "NotExportable", "ShiraExport", "adapter_config", "load_adapter", "model_card",
    "push_to_hub", "save_adapter", "shira_export",
]
