"""Data: tokenizers, megatron-core indexed datasets and blends, and the micro-batch stream.

    train_ds, valid_ds = build_datasets(recipe, world_rank=rank, train_samples=n, valid_samples=m)
    batches = micro_batches(train_ds, consumed_samples=k, micro_batch_size=mbs,
                            dp_rank=r, dp_size=dp)

Names are imported on first use, so tools that only tokenize do not pay for importing torch
and megatron-core.
"""

import importlib

_HOMES = {
    "build_datasets": "bigpt.data.datasets",
    "build_validation_sets": "bigpt.data.datasets",
    "default_validation_samples": "bigpt.data.phases",
    "micro_batches": "bigpt.data.batches",
    "BATCH_KEYS": "bigpt.data.batches",
    "load_tokenizer": "bigpt.data.tokenizer",
    "Tokenizer": "bigpt.data.tokenizer",
    "plan_tokens": "bigpt.data.phases",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'bigpt.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
