"""Cross-field checks that need only the recipe (no world size).

Checks that involve the parallel layout live in ``bigpt.layout``, so a planner can vary
[parallel] on a loaded recipe and re-check just that part.
"""

import importlib.util
import re
from typing import NoReturn

from bigpt.errors import BigptError
from bigpt.recipe.tables import (
    MODEL_FUNCTION_KEYS,
    MODEL_SHAPE_KEYS,
    EncoderConfig,
    EncoderDecoderConfig,
    MaskingConfig,
    MLAConfig,
    MoEConfig,
    PrecisionConfig,
    Recipe,
    RecomputeConfig,
    SpanCorruptionConfig,
)


def recipe_error(recipe: Recipe, problem: str, fix: str) -> NoReturn:
    """Raise the one-paragraph error for a cross-field mistake: what, where, what to do."""
    raise BigptError(f"{problem} in {recipe.where(problem)}; {fix}.")


def check_recipe(recipe: Recipe) -> None:
    for check in (
        _check_name,
        _check_model,
        _check_moe,
        _check_mla,
        _check_encoder,
        _check_encoder_decoder,
        _check_span_corruption,
        _check_optimizer,
        _check_precision,
        _check_recompute,
        _check_batch_rampup,
        _check_training_length,
        _check_seed,
        _check_lr_schedule,
        _check_data,
        _check_eval_sets,
        _check_wandb,
        _check_init,
        _check_allowed_model_changes,
    ):
        check(recipe)


def _check_name(recipe: Recipe) -> None:
    """The name is a folder of the runs folder (runs/<name>, the default run_dir) and a part of job
    names: never one that empties that path or climbs out of runs/."""
    name = recipe.name
    parts = name.split("/")
    if not name.strip("/ ") or "." in parts:
        where = "runs/ itself"
    elif ".." in parts or name.startswith(("/", "~")):
        where = "outside runs/"
    elif name != name.strip():
        where = "a folder whose name starts or ends with a space"
    else:
        return
    recipe_error(
        recipe,
        f"name = {name!r} cannot name a run: its default folder runs/<name> would be {where}",
        "name the run with letters, digits, '-' and '_' ('/' makes a subfolder of runs/), and set run_dir to "
        "write elsewhere",
    )


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
    if not model.mla.enabled():  # MLA's head widths are its own: _check_mla
        _check_head_width(recipe)
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
    if model.rope_scaling == "llama3" and model.rope_high_freq_factor <= model.rope_low_freq_factor:
        recipe_error(
            recipe,
            f"model.rope_high_freq_factor={model.rope_high_freq_factor} is not above "
            f"model.rope_low_freq_factor={model.rope_low_freq_factor}, but llama3 scaling ramps between them",
            "set rope_high_freq_factor above rope_low_freq_factor (Llama 3.1-3.3: 4.0 and 1.0)",
        )


def _check_head_width(recipe: Recipe) -> None:
    model = recipe.model
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads:
        recipe_error(
            recipe,
            f"model.hidden_size={model.hidden_size} is not divisible by "
            f"model.num_attention_heads={model.num_attention_heads}",
            "change one of them or set model.kv_channels (the head width) explicitly",
        )
    head_width = model.kv_channels or model.hidden_size // model.num_attention_heads
    if model.position_embedding == "rope" and head_width % 2:
        width = (
            f"model.kv_channels={model.kv_channels}"
            if model.kv_channels
            else f"the head width model.hidden_size / model.num_attention_heads = {head_width}"
        )
        recipe_error(
            recipe,
            f"{width} is odd, but rotary embeddings (model.position_embedding='rope') turn the channels of each "
            "head in pairs (megatron-core fails at the first forward)",
            "make the head width even, or use position_embedding = 'learned'",
        )


def _check_moe(recipe: Recipe) -> None:
    moe, model = recipe.model.moe, recipe.model
    if model.family != "moe_decoder":
        set_keys = [f"model.moe.{key}" for key, value in vars(moe).items() if value != getattr(MoEConfig(), key)]
        if set_keys or recipe.parallel.expert > 1 or recipe.parallel.expert_tensor is not None:
            given = set_keys + [
                key
                for key, unset in (
                    ("parallel.expert", recipe.parallel.expert == 1),
                    ("parallel.expert_tensor", recipe.parallel.expert_tensor is None),
                )
                if not unset
            ]
            recipe_error(
                recipe,
                f"{', '.join(given)} set while model.family={model.family!r} has no experts",
                'set model.family = "moe_decoder" for a Mixture-of-Experts model, or remove them',
            )
        return
    if moe.num_experts is None:
        recipe_error(recipe, 'model.family = "moe_decoder" without model.moe.num_experts', "set the number of experts")
    experts = moe.num_experts
    if moe.router_topk > experts:
        recipe_error(
            recipe, f"model.moe.router_topk={moe.router_topk} exceeds model.moe.num_experts={experts}", "lower it"
        )
    if moe.router_topk == 1 and moe.router_score_function == "softmax" and moe.normalize_topk:
        recipe_error(
            recipe,
            "model.moe.router_topk=1 with a softmax router and model.moe.normalize_topk=true makes every chosen "
            "probability 1, so no gradient reaches the router (megatron-core refuses it)",
            "set normalize_topk = false (the softmax over all experts, then its top 1: Switch Transformer)",
        )
    if moe.router_score_function == "sigmoid" and not moe.normalize_topk and moe.router_topk > 1:
        recipe_error(
            recipe,
            "model.moe.normalize_topk=false with model.moe.router_score_function='sigmoid': megatron-core always "
            "normalises a sigmoid router's top-k scores",
            "set normalize_topk = true (DeepSeek-V3's norm_topk_prob), or use a softmax router",
        )
    if moe.expert_bias and moe.router_score_function != "sigmoid":
        recipe_error(
            recipe,
            "model.moe.expert_bias=true needs model.moe.router_score_function='sigmoid' (megatron-core's "
            "auxiliary-loss-free balancing adds the bias to sigmoid scores)",
            "use a sigmoid router, or balance with model.moe.load_balancing instead",
        )
    if (moe.num_groups is None) != (moe.group_topk is None):
        recipe_error(
            recipe,
            "model.moe.num_groups and model.moe.group_topk go together (group-limited routing)",
            "set both or neither",
        )
    if moe.num_groups is not None and moe.group_topk is not None:
        if experts % moe.num_groups or moe.group_topk > moe.num_groups:
            recipe_error(
                recipe,
                f"model.moe.num_groups={moe.num_groups} must divide model.moe.num_experts={experts} and be at least "
                f"model.moe.group_topk={moe.group_topk}",
                "adjust them",
            )
        if moe.router_topk > moe.group_topk * (experts // moe.num_groups):
            recipe_error(
                recipe,
                f"model.moe.router_topk={moe.router_topk} exceeds the experts of model.moe.group_topk={moe.group_topk} "
                f"groups of {experts // moe.num_groups}",
                "choose more groups per token or fewer experts per token",
            )
    if moe.shared_expert_gate and moe.shared_expert_ffn_hidden_size is None:
        recipe_error(
            recipe,
            "model.moe.shared_expert_gate=true without model.moe.shared_expert_ffn_hidden_size",
            "size the shared expert",
        )
    if moe.layer_pattern is not None and (
        len(moe.layer_pattern) != model.num_layers or set(moe.layer_pattern) - {0, 1}
    ):
        recipe_error(
            recipe,
            f"model.moe.layer_pattern={moe.layer_pattern} is not one 0 (dense) or 1 (MoE) per layer of "
            f"model.num_layers={model.num_layers}",
            "give one entry per layer",
        )
    if 1 not in moe.layers(model.num_layers):
        recipe_error(
            recipe,
            "[model.moe] leaves no MoE layer (model.moe.first_dense_layers, layer_freq or layer_pattern)",
            'make at least one layer MoE, or use model.family = "decoder"',
        )
    if model.add_bias_linear:
        recipe_error(
            recipe,
            "model.add_bias_linear=true with MoE layers: megatron-core's experts have no biases",
            "set add_bias_linear = false (add_qkv_bias still gives the attention biases)",
        )
    if moe.load_balancing == "none" and moe.aux_loss_coeff and moe.aux_loss_coeff != MoEConfig().aux_loss_coeff:
        recipe_error(
            recipe,
            f"model.moe.aux_loss_coeff={moe.aux_loss_coeff} with model.moe.load_balancing='none'",
            "choose a load-balancing loss, or remove aux_loss_coeff",
        )
    if moe.capacity_factor is None and moe.pad_to_capacity:
        recipe_error(
            recipe,
            "model.moe.pad_to_capacity=true without model.moe.capacity_factor (dropless)",
            "set a capacity_factor",
        )


def _refuse_the_first(recipe: Recipe, refused: list[tuple], where: str) -> None:
    """Of (wrong, key, why, fix) rows, the first that is wrong is refused: "{key} with {where}: {why}"."""
    for wrong, key, why, fix in refused:
        if wrong:
            recipe_error(recipe, f"{key} with {where}: {why}", fix)


def _check_mla(recipe: Recipe) -> None:
    model, mla = recipe.model, recipe.model.mla
    if not mla.enabled():
        set_keys = [f"model.mla.{key}" for key, value in vars(mla).items() if value != getattr(MLAConfig(), key)]
        if set_keys:
            recipe_error(
                recipe,
                f"{', '.join(set_keys)} set without model.mla.kv_lora_rank",
                "set kv_lora_rank for multi-latent attention, or remove them",
            )
        return
    groups = model.num_query_groups
    # What megatron-core's multi-latent attention does not compute, or a key it would silently ignore
    refused = [
        (
            model.family == "encoder",
            'model.family = "encoder"',
            "megatron-core's multi-latent attention is a causal decoder's",
            "remove [model.mla]",
        ),
        (
            model.kv_channels is not None,
            f"model.kv_channels={model.kv_channels}",
            "MLA's head widths are model.mla.qk_head_dim, qk_pos_emb_head_dim and v_head_dim",
            "remove it",
        ),
        (
            groups is not None and groups != model.num_attention_heads,
            f"model.num_query_groups={groups}",
            "MLA projects every head's key and value from one shared latent (no grouped-query attention)",
            "remove it",
        ),
        (
            model.qk_layernorm,
            "model.qk_layernorm=true",
            "MLA normalises its query and key/value latents (always), not each head",
            "remove it",
        ),
        (
            model.add_bias_linear or model.add_qkv_bias,
            "model.add_bias_linear / add_qkv_bias = true",
            "megatron-core's MLA projections have no biases",
            "set them to false",
        ),
        (
            model.position_embedding != "rope",
            f"model.position_embedding={model.position_embedding!r}",
            "MLA rotates the qk_pos_emb_head_dim part of its queries and keys",
            'set it to "rope"',
        ),
        (
            model.rope_scaling not in ("none", "yarn"),
            f"model.rope_scaling={model.rope_scaling!r}",
            "megatron-core's MLA builds its rotary embedding unscaled or with YaRN only",
            'use "none" or "yarn"',
        ),
        (
            mla.qk_pos_emb_head_dim % 2,
            f"model.mla.qk_pos_emb_head_dim={mla.qk_pos_emb_head_dim} (odd)",
            "rotary embeddings turn channels in pairs",
            "make it even",
        ),
    ]
    _refuse_the_first(recipe, refused, "multi-latent attention ([model.mla])")


def _check_encoder(recipe: Recipe) -> None:
    model, encoder = recipe.model, recipe.model.encoder
    masking = recipe.data.masking
    if model.family != "encoder":
        set_keys = [
            f"model.encoder.{key}" for key, value in vars(encoder).items() if value != getattr(EncoderConfig(), key)
        ] + [f"data.masking.{key}" for key, value in vars(masking).items() if value != getattr(MaskingConfig(), key)]
        if set_keys:
            recipe_error(
                recipe,
                f"{', '.join(set_keys)} set while model.family={model.family!r} is not a masked-LM encoder",
                'set model.family = "encoder", or remove them'
                + (
                    " (an encoder-decoder's masking is [data.span_corruption])"
                    if model.family == "encoder_decoder"
                    else ""
                ),
            )
        return
    if encoder.next_sentence_prediction:
        recipe_error(
            recipe,
            "model.encoder.next_sentence_prediction=true is not offered: RoBERTa showed that BERT's "
            "next-sentence objective does not help, and it needs sentence pairs that bigpt's masked datasets "
            "do not build",
            "remove it (masked language modelling alone, as RoBERTa trains)",
        )
    if not 0 < masking.probability < 1:
        recipe_error(
            recipe,
            f"data.masking.probability = {masking.probability} leaves nothing to predict or nothing to see",
            "choose a share between 0 and 1 (BERT: 0.15)",
        )
    if masking.span_lengths == "geometric" and masking.max_span == 1:
        recipe_error(
            recipe,
            "data.masking.span_lengths = 'geometric' with data.masking.max_span = 1: every span is one token long",
            "raise max_span (SpanBERT: 10), or remove span_lengths",
        )
    # What megatron-core's BertModel does not do, or a decoder's key that means nothing bidirectionally
    refused = [
        (
            model.attention_window is not None,
            f"model.attention_window={model.attention_window}",
            "a sliding window is causal (the tokens before), and an encoder attends both ways",
            "remove it",
        ),
        (
            model.qk_layernorm,
            "model.qk_layernorm=true",
            "megatron-core's BERT layers have no query/key norms",
            "set it to false",
        ),
        (
            model.rope_scaling != "none",
            f"model.rope_scaling={model.rope_scaling!r}",
            "megatron-core's BertModel takes no RoPE scaling",
            'set it to "none"',
        ),
        (
            model.position_embedding == "rope" and model.rope_base != 10000,
            f"model.rope_base={model.rope_base}",
            "megatron-core's BertModel builds its rotary embedding with base 10000 and takes no other",
            "set it to 10000, or use learned position embeddings",
        ),
    ]
    _refuse_the_first(recipe, refused, 'model.family = "encoder"')


def _check_encoder_decoder(recipe: Recipe) -> None:
    model, table = recipe.model, recipe.model.encoder_decoder
    if model.family != "encoder_decoder":
        set_keys = [
            f"model.encoder_decoder.{key}"
            for key, value in vars(table).items()
            if value != getattr(EncoderDecoderConfig(), key)
        ] + (["model.position_embedding = 'relative'"] if model.position_embedding == "relative" else [])
        if set_keys:
            recipe_error(
                recipe,
                f"{', '.join(set_keys)} set while model.family={model.family!r} is not an encoder-decoder",
                'set model.family = "encoder_decoder" (T5), or remove them',
            )
        return
    # What megatron-core's T5Model does not do, or a key that means nothing for T5's relative positions
    refused = [
        (
            model.position_embedding != "relative",
            f"model.position_embedding={model.position_embedding!r}",
            "bigpt's encoder-decoder is T5's, with a learned relative position bias",
            "set it to 'relative'",
        ),
        (
            (model.num_query_groups or model.num_attention_heads) != model.num_attention_heads,
            f"model.num_query_groups={model.num_query_groups}",
            "megatron-core's cross-attention has no grouped-query form",
            "remove it (one key/value head per query head)",
        ),
        (
            model.attention_window is not None,
            f"model.attention_window={model.attention_window}",
            "megatron-core's T5 attends to every position (its encoder both ways)",
            "remove it",
        ),
        (
            model.qk_layernorm,
            "model.qk_layernorm=true",
            "megatron-core's T5 layers have no query/key norms",
            "set it to false",
        ),
        (
            model.max_position_embeddings is not None,
            f"model.max_position_embeddings={model.max_position_embeddings}",
            "relative positions have no position table (distances from "
            "model.encoder_decoder.relative_attention_max_distance on share one bucket)",
            "remove it",
        ),
    ]
    _refuse_the_first(recipe, refused, 'model.family = "encoder_decoder"')
    buckets, distance = table.relative_attention_num_buckets, table.relative_attention_max_distance
    if buckets < 4 or distance <= buckets // 2:
        recipe_error(
            recipe,
            f"model.encoder_decoder.relative_attention_num_buckets={buckets} with relative_attention_max_distance="
            f"{distance}: T5's buckets go half to exact distances (a quarter per direction in the encoder) and "
            "half to logarithmic ranges up to the max distance, which must lie beyond the exact ones",
            "use at least 4 buckets and a max distance above half of them (T5: 32 and 128)",
        )


def _check_span_corruption(recipe: Recipe) -> None:
    span = recipe.data.span_corruption
    if recipe.model.family != "encoder_decoder":
        set_keys = [
            f"data.span_corruption.{key}"
            for key, value in vars(span).items()
            if value != getattr(SpanCorruptionConfig(), key)
        ]
        if set_keys:
            recipe_error(
                recipe,
                f"{', '.join(set_keys)} set while model.family={recipe.model.family!r} is not an encoder-decoder",
                'set model.family = "encoder_decoder" for span corruption (T5), or remove them',
            )
        return
    if span.mean_span_length < 1:
        recipe_error(
            recipe,
            f"data.span_corruption.mean_span_length = {span.mean_span_length}: a span holds at least one token",
            "choose 1 or more (T5: 3)",
        )
    # Each span is cut out between kept tokens, so spans ≤ kept tokens: density / mean ≤ 1 - density.
    most = span.mean_span_length / (span.mean_span_length + 1)
    if not 0 < span.noise_density <= most:
        recipe_error(
            recipe,
            f"data.span_corruption.noise_density = {span.noise_density} with mean_span_length = "
            f"{span.mean_span_length}: "
            + (
                "nothing would be dropped"
                if span.noise_density <= 0
                else f"each span needs a kept token before it, so at most {most:.3g} of a sample can be dropped "
                "in spans of that mean length"
            ),
            "choose a share above 0 and at most mean_span_length / (mean_span_length + 1) (T5: 0.15)",
        )
    if recipe.model.seq_length < 4:
        recipe_error(
            recipe,
            f"model.seq_length = {recipe.model.seq_length} with span corruption: a sample holds "
            "model.seq_length - 2 tokens, and a span is dropped only between kept ones",
            "use 4 or more",
        )


def _check_optimizer(recipe: Recipe) -> None:
    for key in ("adam_beta1", "adam_beta2"):
        beta = getattr(recipe.optimizer, key)
        if recipe.optimizer.name == "adamw" and beta >= 1:
            recipe_error(
                recipe,
                f"optimizer.{key}={beta} with optimizer.name='adamw': the moment would never decay and Adam's bias "
                "correction 1 - beta^t is 0 (torch refuses it at the first step)",
                "use a decay below 1, e.g. 0.9 for adam_beta1 and 0.95 for adam_beta2",
            )
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
    if recipe.parallel.context > 1 and precision.transformer_engine == "off":
        recipe_error(
            recipe,
            f"parallel.context={recipe.parallel.context} needs Transformer Engine (megatron-core's context-parallel "
            "attention is Transformer Engine's) but precision.transformer_engine='off'",
            "set transformer_engine to 'auto' or 'on', or parallel.context = 1",
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


def _check_recompute(recipe: Recipe) -> None:
    precision = recipe.precision
    recompute = recipe.recompute
    if (
        recompute.granularity == "selective"
        and "core_attn" in recompute.modules
        and precision.transformer_engine != "off"
    ):
        recipe_error(
            recipe,
            f"recompute.modules={recompute.modules} with precision.transformer_engine="
            f"{precision.transformer_engine!r}: Transformer Engine's fused attention keeps no s² scores, so "
            "recomputing core_attn costs time and saves no memory",
            'drop [recompute] if the activations fit (tools/plan.py shows it), recompute.modules = ["mlp"] '
            'to trade one MLP forward for its inner activations, recompute.granularity = "full", or '
            'precision.transformer_engine = "off" for the unfused layers',
        )
    defaults = RecomputeConfig()
    unused = [
        f"recompute.{key}"
        for key, used_by in (("modules", "selective"), ("method", "full"), ("num_layers", "full"))
        if recompute.granularity != used_by and getattr(recompute, key) != getattr(defaults, key)
    ]
    if unused:
        recipe_error(
            recipe,
            f"{', '.join(unused)} set while recompute.granularity = {recompute.granularity!r}, which does not use "
            "them (modules is for selective; method and num_layers are for full)",
            "set the granularity they belong to, or remove them",
        )
    if not recompute.modules and recompute.granularity == "selective":
        recipe_error(
            recipe,
            'recompute.granularity = "selective" with recompute.modules = [] recomputes nothing',
            'name the modules to recompute or set granularity = "none"',
        )
    if recompute.granularity == "selective":
        _check_recomputed_modules_exist(recipe)


def _check_recomputed_modules_exist(recipe: Recipe) -> None:
    """Each selective module must find something to recompute in this model: megatron-core
    silently skips one that does not (mlp on MoE layers, moe on dense ones)."""
    model = recipe.model
    kinds = model.moe.layers(model.num_layers) if model.family == "moe_decoder" else [0] * model.num_layers
    found = {
        "core_attn": True,
        "mlp": not all(kinds),
        "moe": any(kinds),
        "shared_experts": any(kinds) and bool(model.moe.shared_expert_ffn_hidden_size),
    }
    missing = [module for module in recipe.recompute.modules if not found[module]]
    if missing:
        recipe_error(
            recipe,
            f"recompute.modules names {missing}, which this model does not have: mlp is a dense layer's "
            f"MLP (this model has {len(kinds) - sum(map(bool, kinds))} dense layers), moe an MoE layer "
            f"({sum(map(bool, kinds))} here), shared_experts an MoE layer's shared experts "
            "(model.moe.shared_expert_ffn_hidden_size), and megatron-core silently recomputes nothing for them",
            'recompute "moe" (or "shared_experts") for MoE layers and "mlp" for dense ones, or drop them',
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


INDEX_INT_MAX = 2**63 - 1
"""megatron-core's dataset indices and bigpt's counters count samples and tokens in int64."""


def _check_training_length(recipe: Recipe) -> None:
    train, seq_length = recipe.train, recipe.model.seq_length
    for key, count in (("train.train_iters", train.train_iters), ("eval.iters", recipe.eval.iters)):
        tokens = count * train.global_batch_size * seq_length  # at most: a ramp-up trains fewer
        if tokens >= INDEX_INT_MAX:
            recipe_error(
                recipe,
                f"{key}={count} × train.global_batch_size={train.global_batch_size} × "
                f"model.seq_length={seq_length} = {tokens:.3e} tokens, more than the {INDEX_INT_MAX:.3e} that "
                "megatron-core's dataset indices (int64) can count",
                f"lower {key}",
            )


NUMPY_SEED_MAX = 2**32 - 1


def _check_seed(recipe: Recipe) -> None:
    # NumPy takes seeds up to 2**32 - 1: bigpt seeds each pipeline stage with seed + 100 × stage
    # (as Megatron-LM) and megatron-core's dataset shuffles each data phase with seed + phase.
    offset = max(100 * (recipe.parallel.pipeline - 1), len(recipe.data.phases))
    if recipe.train.seed + offset > NUMPY_SEED_MAX:
        recipe_error(
            recipe,
            f"train.seed={recipe.train.seed} is too large: the seeds derived from it (up to train.seed + {offset}, "
            f"for parallel.pipeline={recipe.parallel.pipeline} and {len(recipe.data.phases)} data.phases) must be at "
            f"most {NUMPY_SEED_MAX}, the largest seed NumPy takes",
            f"use a seed of at most {NUMPY_SEED_MAX - offset}",
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


EVAL_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_eval_sets(recipe: Recipe) -> None:
    sets = recipe.eval.sets
    if sets and recipe.data.source != "indexed":
        recipe_error(
            recipe,
            "eval.sets names validation sets, but data.source is 'mock' (random tokens, no datasets to read)",
            "set data.source = 'indexed' with the datasets, or remove eval.sets",
        )
    if recipe.eval.tasks and recipe.model.family in ("encoder", "encoder_decoder"):
        recipe_error(
            recipe,
            f"eval.tasks with model.family = {recipe.model.family!r}: a task is scored by the log-likelihood of each "
            "choice given its context, as a causal decoder continues it, which "
            f"{'a masked-LM encoder' if recipe.model.family == 'encoder' else 'an encoder-decoder'} does not compute",
            "score encoders' downstream tasks by fine-tuning outside bigpt, or remove eval.tasks",
        )
    if recipe.eval.tasks and not recipe.data.tokenizer:
        recipe_error(
            recipe,
            "eval.tasks needs the model's tokenizer to tokenize its examples, and data.tokenizer is not set",
            "set data.tokenizer (the tokenizer the model was trained with)",
        )
    for table, entries, metric in (
        ("eval.sets", sets, "valid/<name>/loss"),
        ("eval.tasks", recipe.eval.tasks, "task/<name>/acc"),
    ):
        names = [entry.name for entry in entries]
        for i, name in enumerate(names):
            if not EVAL_SET_NAME.fullmatch(name) or name == "valid":
                recipe_error(
                    recipe,
                    f"{table}[{i}].name = {name!r} is not a usable name (it becomes {metric})",
                    'use letters, digits, "_", "-" or ".", other than "valid", e.g. name = "domain"',
                )
            if name in names[:i]:
                recipe_error(
                    recipe, f"{table}[{i}].name = {name!r} is given twice", f"give each [[{table}]] its own name"
                )


WANDB_TAG_LENGTH = 64  # the W&B server's limit


def _check_wandb(recipe: Recipe) -> None:
    wandb = recipe.logging.wandb
    if wandb.project is None:
        ignored = [key for key in ("entity", "name", "tags") if getattr(wandb, key)]
        if ignored:
            recipe_error(
                recipe,
                f"logging.wandb.{', logging.wandb.'.join(ignored)} set without logging.wandb.project",
                "name the W&B project to log to, or remove them",
            )
        return
    if not wandb.project.strip() or "/" in wandb.project:
        recipe_error(
            recipe,
            f"logging.wandb.project = {wandb.project!r} is not a W&B project name",
            'write the project alone, e.g. project = "continual" (a team goes in logging.wandb.entity)',
        )
    for i, tag in enumerate(wandb.tags):
        if not tag or len(tag) > WANDB_TAG_LENGTH:
            recipe_error(
                recipe,
                f"logging.wandb.tags[{i}] = {tag!r} is empty or longer than W&B's {WANDB_TAG_LENGTH} characters",
                "shorten it",
            )
    if importlib.util.find_spec("wandb") is None:
        recipe_error(
            recipe,
            "logging.wandb.project is set, but the wandb package is not installed",
            "install it (pip install 'bigpt[wandb]'), or remove [logging.wandb]",
        )


def _check_init(recipe: Recipe) -> None:
    if recipe.init.from_hf and recipe.init.from_checkpoint:
        recipe_error(
            recipe, "init.from_hf and init.from_checkpoint are both set", "start from one of them and remove the other"
        )
    if recipe.init.extend_vocab and not recipe.init.from_hf:
        recipe_error(
            recipe,
            f"init.extend_vocab = {recipe.init.extend_vocab} is set without init.from_hf",
            "a vocabulary grows while a Hugging Face model is imported: start from init.from_hf (export a bigpt "
            "checkpoint with tools/convert_hf.py export first), or remove init.extend_vocab",
        )
    if recipe.init.upcycle:
        _check_upcycle(recipe)


def _check_upcycle(recipe: Recipe) -> None:
    """What megatron-core's upcycling (transformer/moe/upcycling_utils.py) cannot convert."""
    model, moe = recipe.model, recipe.model.moe
    dense_width, width = model.ffn_hidden_size, moe.ffn_hidden_size or model.ffn_hidden_size
    problems = [
        (
            model.family != "moe_decoder",
            f"model.family={model.family!r}",
            "upcycling makes an MoE model: set model.family = 'moe_decoder'",
        ),
        (
            not (recipe.init.from_hf or recipe.init.from_checkpoint),
            "neither init.from_hf nor init.from_checkpoint is set",
            "name the dense model to upcycle",
        ),
        (
            not all(moe.layers(model.num_layers)),
            "some layers are dense (model.moe.first_dense_layers, layer_freq or layer_pattern)",
            "megatron-core's upcycling converts every layer's MLP: make every layer an MoE layer",
        ),
        (
            moe.shared_expert_ffn_hidden_size is not None,
            f"model.moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size}",
            "a shared expert has no dense counterpart to copy: remove it",
        ),
        (
            dense_width % width or (moe.num_experts or 0) % (dense_width // width or 1),
            f"model.moe.ffn_hidden_size={width} does not split model.ffn_hidden_size={dense_width} (the dense "
            f"MLP) into a number of slices that divides model.moe.num_experts={moe.num_experts}",
            "make the experts as wide as the dense MLP (a copy each), or a divisor of it",
        ),
        (
            (recipe.parallel.expert_tensor or recipe.parallel.tensor) != recipe.parallel.tensor,
            f"parallel.expert_tensor={recipe.parallel.expert_tensor} differs from "
            f"parallel.tensor={recipe.parallel.tensor}",
            "megatron-core splits each rank's dense MLP shard into its experts: leave parallel.expert_tensor unset",
        ),
    ]
    for wrong, problem, fix in problems:
        if wrong:
            recipe_error(recipe, f"init.upcycle = true but {problem}", fix)


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
