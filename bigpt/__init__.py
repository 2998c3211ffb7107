"""bigpt: a Megatron-Core 3D-parallel pretraining trainer driven by TOML recipes."""

__version__ = "0.1.0"
