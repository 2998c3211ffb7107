"""Cross-field checks that need only the recipe (no world size).

Checks that involve the parallel layout live in ``bigpt.layout``, so a planner can vary
[parallel] on a loaded recipe and re-check just that part.
"""

from typing import NoReturn

from bigpt.errors import BigptError
from bigpt.recipe.tables import MODEL_FUNCTION_KEYS, MODEL_SHAPE_KEYS, PrecisionConfig, Recipe


def recipe_error(recipe: Recipe, problem: str, fix: str) -> NoReturn:
    """Raise the one-paragraph error for a cross-field mistake: what, where, what to do."""
    raise BigptError(f"{problem} in {recipe.source or 'the recipe'}; {fix}.")


def check_recipe(recipe: Recipe) -> None:
    for check in (
        _check_model,
        _check_optimizer,
        _check_precision,
        _check_batch_rampup,
        _check_lr_schedule,
        _check_data,
        _check_init,
        _check_allowed_model_changes,
    ):
        check(recipe)


def _check_model(recipe: Recipe) -> None:
    model = recipe.model
    groups = model.num_query_groups or model.num_attention_heads
    if model.num_attention_heads % groups:
        recipe_error(
            recipe,
            f"model.num_attention_heads={model.num_attention_heads} is not a multiple of "
            f"model.num_query_groups={groups}",
            "each key/value group must serve the same number of query heads",
        )
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads:
        recipe_error(
            recipe,
            f"model.hidden_size={model.hidden_size} is not divisible by "
            f"model.num_attention_heads={model.num_attention_heads}",
            "change one of them or set model.kv_channels (the head width) explicitly",
        )
    positions = model.max_position_embeddings or model.seq_length
    if model.position_embedding == "learned" and positions < model.seq_length:
        recipe_error(
            recipe,
            f"model.max_position_embeddings={positions} is shorter than model.seq_length={model.seq_length}",
            "the learned position table needs a row per position; raise it",
        )
    if model.rope_scaling != "none" and model.position_embedding != "rope":
        recipe_error(
            recipe,
            f"model.rope_scaling={model.rope_scaling!r} needs model.position_embedding='rope'",
            "set rope_scaling = 'none'",
        )


def _check_optimizer(recipe: Recipe) -> None:
    if recipe.optimizer.name == "adafactor":
        recipe_error(
            recipe,
            "optimizer.name='adafactor' cannot be offered: its factored second moments (a row "
            "and a column statistic per matrix) cannot be saved, since megatron-core's checkpointing "
            "requires every optimizer state to have its parameter's shape, and parallel.tensor > 1 "
            "would split the matrices those statistics are taken over (parallel.distributed_optimizer "
            "with lion/muon's layer-wise sharding keeps matrices whole, so data parallelism alone would "
            "be exact)",
            "use optimizer.name = 'adamw', 'lion' or 'muon'",
        )


def _check_precision(recipe: Recipe) -> None:
    precision = recipe.precision
    if recipe.optimizer.name != "adamw" and precision.dtype == "fp16":
        recipe_error(
            recipe,
            f"optimizer.name={recipe.optimizer.name!r} cannot train in precision.dtype="
            "'fp16' (megatron-core's emerging optimizers have no loss scaling)",
            "use dtype 'bf16' or 'fp32', or optimizer.name = 'adamw'",
        )
    if precision.fp8 != "none" and precision.transformer_engine == "off":
        recipe_error(
            recipe,
            f"precision.fp8={precision.fp8!r} needs Transformer Engine but precision.transformer_engine='off'",
            "set transformer_engine to 'auto' or 'on', or fp8 = 'none'",
        )
    _check_fp8_scaling(recipe)


FP8_SCALING_KEYS = {
    "delayed": ("fp8_amax_history_len", "fp8_amax_compute_algo"),
    "tensorwise": ("fp8_bf16_first_layers", "fp8_bf16_last_layers"),
}
"""[precision] keys that apply to one FP8 scaling recipe only."""


def _check_fp8_scaling(recipe: Recipe) -> None:
    precision = recipe.precision
    defaults = PrecisionConfig()
    for scaling, keys in FP8_SCALING_KEYS.items():
        changed = [
            f"precision.{key}={getattr(precision, key)!r}"
            for key in keys
            if getattr(precision, key) != getattr(defaults, key)
        ]
        if changed and precision.fp8 != scaling:
            many = len(changed) > 1
            why = (
                "megatron-core cannot keep layers in bf16 with delayed scaling"
                if scaling == "tensorwise" and precision.fp8 == "delayed"
                else f"{'they' if many else 'it'} would be ignored"
            )
            recipe_error(
                recipe,
                f"{' and '.join(changed)} {'apply' if many else 'applies'} to precision.fp8='{scaling}' only, "
                f"and precision.fp8={precision.fp8!r}: {why}",
                f"remove {'them' if many else 'it'}, or use fp8 = '{scaling}'",
            )
    # megatron-core's bound (TransformerConfig): at most the layers of one pipeline stage each
    per_stage = recipe.model.num_layers // recipe.parallel.pipeline
    for key in FP8_SCALING_KEYS["tensorwise"]:
        if getattr(precision, key) > per_stage:
            recipe_error(
                recipe,
                f"precision.{key}={getattr(precision, key)} is more than the {per_stage} layers of a pipeline stage "
                f"(model.num_layers={recipe.model.num_layers} / parallel.pipeline={recipe.parallel.pipeline})",
                f"keep at most {per_stage} layers in bf16 at each end",
            )


def _check_batch_rampup(recipe: Recipe) -> None:
    train = recipe.train
    if train.rampup_batch_size is None:
        return
    if len(train.rampup_batch_size) != 3:
        recipe_error(
            recipe,
            f"train.rampup_batch_size={train.rampup_batch_size} does not have 3 entries",
            "write [start, increment, ramp_samples], e.g. [32, 32, 2000000]",
        )
    start, increment, samples = train.rampup_batch_size
    if start <= 0 or increment <= 0 or samples < 0:
        recipe_error(
            recipe,
            f"train.rampup_batch_size={train.rampup_batch_size} has a "
            f"non-positive start or increment, or negative ramp samples",
            "use positive start and increment and ramp_samples >= 0",
        )
    gap = train.global_batch_size - start
    if gap <= 0 or gap % increment:
        recipe_error(
            recipe,
            f"train.rampup_batch_size start {start} + k × increment {increment} "
            f"never reaches train.global_batch_size={train.global_batch_size}",
            "pick start below global_batch_size with (global_batch_size - start) a "
            "multiple of increment, or remove rampup_batch_size",
        )


def _check_lr_schedule(recipe: Recipe) -> None:
    optimizer, schedule = recipe.optimizer, recipe.schedule
    decay_end = schedule.decay_iters or recipe.train.train_iters
    if optimizer.min_lr > optimizer.lr:
        recipe_error(
            recipe,
            f"optimizer.min_lr={optimizer.min_lr} is above optimizer.lr={optimizer.lr}",
            "min_lr is where the decay ends; lower it",
        )
    if schedule.warmup_iters >= decay_end:
        recipe_error(
            recipe,
            f"schedule.warmup_iters={schedule.warmup_iters} is not below the "
            f"end of the decay ({decay_end}, schedule.decay_iters or else "
            f"train.train_iters)",
            "shorten the warmup or lengthen the decay",
        )
    if schedule.decay_style == "wsd":
        room = decay_end - schedule.warmup_iters
        if schedule.wsd_decay_iters is None or schedule.wsd_decay_iters > room:
            recipe_error(
                recipe,
                f"schedule.decay_style='wsd' needs schedule.wsd_decay_iters "
                f"between 1 and {room} (decay end minus warmup), got "
                f"{schedule.wsd_decay_iters}",
                "set wsd_decay_iters to the final annealing length",
            )


def _check_data(recipe: Recipe) -> None:
    data = recipe.data
    if data.source == "indexed" and not (data.blend and data.tokenizer):
        recipe_error(
            recipe,
            "data.source='indexed' needs data.tokenizer and a non-empty data.blend",
            "preprocess a corpus with tools/preprocess_data.py and name "
            "its prefix in blend = [{path = ...}], or use source = 'mock'",
        )
    if data.source == "mock":  # random tokens: a key naming real data would be ignored without a word
        ignored = [
            key
            for key, value in (
                ("data.blend", data.blend),
                ("data.phases", data.phases),
                ("data.cache_dir", data.cache_dir),
            )
            if value
        ]
        if ignored:
            recipe_error(
                recipe,
                f"{' and '.join(ignored)} set, but data.source='mock' (random tokens, the "
                "default when source is not set) ignores them",
                "set source = 'indexed' to train on that data, or remove them to train on random tokens",
            )
    parts = data.split.split(",")
    try:
        shares = [float(part) for part in parts]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) < 0 or shares[0] <= 0:
        recipe_error(
            recipe,
            f"data.split={data.split!r} is not three comma-separated "
            f"train,validation,test proportions with a positive train share",
            'write e.g. split = "98,2,0"',
        )
    if recipe.eval.interval and data.source == "indexed" and shares[1] == 0:
        recipe_error(
            recipe,
            f"eval.interval={recipe.eval.interval} but data.split={data.split!r} leaves no validation data",
            "give validation a share or set interval = 0",
        )


def _check_init(recipe: Recipe) -> None:
    if recipe.init.from_hf and recipe.init.from_checkpoint:
        recipe_error(
            recipe, "init.from_hf and init.from_checkpoint are both set", "start from one of them and remove the other"
        )


def _check_allowed_model_changes(recipe: Recipe) -> None:
    changeable = [key for key in MODEL_FUNCTION_KEYS if key not in MODEL_SHAPE_KEYS]
    for key in recipe.checkpoint.allow_model_changes:
        if key not in changeable:
            why = (
                "changes the shapes of the weights"
                if key in MODEL_SHAPE_KEYS
                else "is not a [model] key that changes what the weights compute"
            )
            recipe_error(
                recipe,
                f"checkpoint.allow_model_changes names {key!r}, which {why}",
                f"list only some of {', '.join(changeable)}",
            )
