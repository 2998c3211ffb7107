"""Checkpoints through megatron-core ``dist_checkpointing``: atomic, resumable, reshardable."""

from bigpt.checkpoint.state import Checkpointed, CheckpointWriter, load_checkpoint, load_weights

__all__ = ["Checkpointed", "CheckpointWriter", "load_checkpoint", "load_weights"]
