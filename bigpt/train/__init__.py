"""The training loop (Trainer), the model-specific step, and callbacks."""
