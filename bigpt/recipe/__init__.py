"""Recipes: TOML files describing a training run, loaded into typed dataclasses.

recipe = load_recipe("recipes/llama_70b.toml", ["parallel.tensor=4"])
"""

from bigpt.recipe.loader import load_recipe
from bigpt.recipe.serialize import recipe_to_dict, recipe_to_toml, table_to_toml
from bigpt.recipe.tables import (
    BlendEntry,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    InitConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    Recipe,
    RecomputeConfig,
    ScheduleConfig,
    TrainConfig,
    padded_vocab_size,
)

__all__ = [
    "BlendEntry",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "InitConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "Recipe",
    "RecomputeConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_recipe",
    "padded_vocab_size",
    "recipe_to_dict",
    "recipe_to_toml",
    "table_to_toml",
]
