"""Checkpoints through megatron-core ``dist_checkpointing``: atomic, resumable, reshardable."""

from bigpt.checkpoint.state import CheckpointWriter, load_checkpoint, load_weights

__all__ = ["CheckpointWriter", "load_checkpoint", "load_weights"]
