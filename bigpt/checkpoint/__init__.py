"""Checkpoints through megatron-core ``dist_checkpointing``: atomic, resumable, reshardable."""

from bigpt.checkpoint.state import CheckpointWriter, load_checkpoint, load_weights
from bigpt.checkpoint.store import resolve_resume

__all__ = ["CheckpointWriter", "load_checkpoint", "load_weights", "resolve_resume"]
