"""Checkpoints through megatron-core ``dist_checkpointing``: atomic, resumable, reshardable."""

from bigpt.checkpoint.state import load_checkpoint, load_weights, save_checkpoint
from bigpt.checkpoint.store import resolve_resume

__all__ = ["load_checkpoint", "load_weights", "resolve_resume", "save_checkpoint"]
