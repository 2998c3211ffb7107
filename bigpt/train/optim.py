"""Recipe → megatron-core DDP wrappers, distributed optimizer, LR scheduler, batch ramp-up."""

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from bigpt.layout import Layout
from bigpt.model import DTYPES
from bigpt.recipe import Recipe


def wrap_ddp(recipe: Recipe, config: TransformerConfig, chunks: list) -> list[DistributedDataParallel]:
    """Half-precision wrapper (bf16/fp16) and megatron-core DDP around every model chunk."""
    p, prec = recipe.parallel, recipe.precision
    if prec.dtype != "fp32":
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=prec.grad_reduce_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.distributed_optimizer,
        check_for_nan_in_grad=False,  # the fault guard decides what a NaN means
    )
    return [
        # Only the first chunk buckets: later chunks' grads are ready first under interleaving.
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]


def build_optimizer(recipe: Recipe, model: list[DistributedDataParallel]):
    o, prec = recipe.optimizer, recipe.precision
    config = OptimizerConfig(
        optimizer="adam",  # megatron-core's adam is AdamW: decoupled weight decay
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=recipe.train.clip_grad,
        bf16=prec.dtype == "bf16",
        fp16=prec.dtype == "fp16",
        params_dtype=DTYPES[prec.dtype],
        initial_loss_scale=prec.initial_loss_scale,
        min_loss_scale=prec.min_loss_scale,
        loss_scale_window=prec.loss_scale_window,
        hysteresis=prec.hysteresis,
        use_distributed_optimizer=recipe.parallel.distributed_optimizer,
        overlap_param_gather=recipe.parallel.overlap_param_gather,
    )
    return get_megatron_optimizer(config, model)


def build_scheduler(recipe: Recipe, optimizer) -> OptimizerParamScheduler:
    """LR schedule in samples (not steps), so warmup and decay stay put under batch ramp-up. A
    resumed run keeps the checkpoint's position (samples consumed) and takes everything else from
    the recipe."""
    s, o, gbs = recipe.schedule, recipe.optimizer, recipe.train.global_batch_size
    decay_iters = s.decay_iters or recipe.train.train_iters
    wsd = s.decay_style == "wsd"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs,
        lr_decay_style="WSD" if wsd else s.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,  # on resume the recipe's schedule wins (see resume_changes)
        wsd_decay_steps=(s.wsd_decay_iters or 0) * gbs if wsd else None,
        lr_wsd_decay_style=s.wsd_decay_style if wsd else None,
    )


def init_batch_calculator(recipe: Recipe, layout: Layout) -> None:
    """megatron-core's micro-batch calculator (global batch ramp-up), set for this process."""
    t = recipe.train
    init_num_microbatches_calculator(
        rank=torch.distributed.get_rank(),
        rampup_batch_size=t.rampup_batch_size,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        data_parallel_size=layout.dp,
    )


def wire_model_config(config: TransformerConfig, model: list[DistributedDataParallel], optimizer) -> None:
    """The hooks the pipeline schedule calls: grad finalisation, loss scaling, overlapped syncs."""
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    one = len(model) == 1
    if model[0].ddp_config.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in model]
        config.no_sync_func = no_sync[0] if one else no_sync
        grad_sync = [chunk.start_grad_sync for chunk in model]
        config.grad_sync_func = grad_sync[0] if one else grad_sync
    if model[0].ddp_config.overlap_param_gather:
        param_sync = [chunk.start_param_sync for chunk in model]
        config.param_sync_func = param_sync[0] if one else param_sync


def apply_recipe_hyperparameters(recipe: Recipe, optimizer) -> None:
    """After a resume: loading the optimizer's state also restored the checkpoint's Adam betas and
    epsilon; the recipe's win, as the schedule's do (the scheduler sets lr and weight decay)."""
    o = recipe.optimizer
    for group in optimizer.param_groups:
        group.update(betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
