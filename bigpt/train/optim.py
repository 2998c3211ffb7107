"""Recipe → megatron-core DDP wrappers, distributed optimizer, LR scheduler, batch ramp-up."""

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)
from megatron.core.optimizer import (
    HAVE_EMERGING_OPTIMIZERS,
    LayerWiseDistributedOptimizer,
    OptimizerConfig,
    get_megatron_optimizer,
)
from megatron.core.optimizer.layer_wise_optimizer import tag_params_for_buffer_routing
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from bigpt.errors import BigptError
from bigpt.layout import Layout, Resumed, samples_at_step
from bigpt.model import DTYPES
from bigpt.recipe import Recipe

MEGATRON_OPTIMIZERS = {"adamw": "adam", "lion": "lion", "muon": "muon"}
"""optimizer.name -> megatron-core's OptimizerConfig.optimizer (its "adam" is AdamW: decoupled decay)."""


def layer_wise(recipe: Recipe) -> bool:
    """Whether the distributed optimizer is megatron-core's LayerWiseDistributedOptimizer: the one
    for its emerging optimizers (lion, muon), which must update whole matrices, so each
    data-parallel rank owns whole parameters rather than flattened element ranges."""
    return recipe.parallel.distributed_optimizer and recipe.optimizer.name != "adamw"


def _check_installed(recipe: Recipe) -> None:
    if recipe.optimizer.name != "adamw" and not HAVE_EMERGING_OPTIMIZERS:
        raise BigptError(
            f'optimizer.name = "{recipe.optimizer.name}" is megatron-core\'s emerging optimizer, which needs '
            "the emerging-optimizers package (>= 0.2), not installed here; run scripts/setup.sh (it installs "
            'it on Python 3.11 too) or `pip install emerging-optimizers`, or set optimizer.name = "adamw".'
        )


def wrap_ddp(recipe: Recipe, config: TransformerConfig, chunks: list) -> list[DistributedDataParallel]:
    """Half-precision wrapper (bf16/fp16) and megatron-core DDP around every model chunk."""
    _check_installed(recipe)  # before anything depends on the optimizer's layout
    if layer_wise(recipe):
        tag_params_for_buffer_routing(chunks)  # before DDP: which buffer, and so which layout, each takes
    if recipe.precision.dtype != "fp32":
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = ddp_config_for(recipe)
    # Only the first chunk buckets: later chunks' grads are ready first under interleaving.
    return [
        DistributedDataParallel(
            config,
            ddp_config,
            chunk,
            disable_bucketing=index > 0,
            full_param_layout=_layer_wise_layout(recipe, ddp_config, chunk, index),
        )
        for index, chunk in enumerate(chunks)
    ]


def ddp_config_for(recipe: Recipe) -> DistributedDataParallelConfig:
    p = recipe.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=recipe.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        # As Megatron-LM: with interleaving, every pipeline stage starts its chunks' parameter
        # all-gathers from the schedule (config.param_sync_func, wire_model_config); without it,
        # DDP's forward hooks dispatch them. Both at once dispatch each bucket twice (megatron-core
        # warns on every rank).
        align_param_gather=p.overlap_param_gather and p.virtual_pipeline > 1,
        use_distributed_optimizer=p.distributed_optimizer,
        check_for_nan_in_grad=False,  # the fault guard decides what a NaN means
    )


def _layer_wise_layout(recipe: Recipe, ddp_config: DistributedDataParallelConfig, chunk, index: int):
    """For the layer-wise optimizer, buckets whose data-parallel shards hold whole parameters (its
    own layout); None lets DDP lay out the buffers for megatron-core's DistributedOptimizer."""
    if not layer_wise(recipe):
        return None
    bucketed = index == 0 and parallel_state.get_pipeline_model_parallel_rank() == 0  # as DDP decides
    return LayerWiseDistributedOptimizer.compute_full_param_layout(
        [param for param in chunk.parameters() if param.requires_grad],
        ddp_config.bucket_size if bucketed else None,
        parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        ddp_config,
    )


def optimizer_config(recipe: Recipe) -> OptimizerConfig:
    o, prec = recipe.optimizer, recipe.precision
    return OptimizerConfig(
        optimizer=MEGATRON_OPTIMIZERS[o.name],
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        muon_momentum=o.muon_momentum,
        muon_tp_mode=o.muon_tp_mode,
        clip_grad=recipe.train.clip_grad,
        bf16=prec.dtype == "bf16",
        fp16=prec.dtype == "fp16",
        params_dtype=DTYPES[prec.dtype],
        initial_loss_scale=prec.initial_loss_scale,
        min_loss_scale=prec.min_loss_scale,
        loss_scale_window=prec.loss_scale_window,
        hysteresis=prec.hysteresis,
        # megatron-core takes the layer-wise flag instead for its emerging optimizers
        use_distributed_optimizer=recipe.parallel.distributed_optimizer and not layer_wise(recipe),
        use_layer_wise_distributed_optimizer=layer_wise(recipe),
        overlap_param_gather=recipe.parallel.overlap_param_gather,
    )


def build_optimizer(recipe: Recipe, model: list[DistributedDataParallel]):
    return get_megatron_optimizer(optimizer_config(recipe), model)


def build_scheduler(recipe: Recipe, optimizer, resumed: Resumed | None = None) -> OptimizerParamScheduler:
    """LR schedule in samples (megatron-core's scheduler steps by the samples of each step), its
    points (warmup, decay, WSD's decay) set in steps by the recipe: each becomes the samples
    consumed by that step, so under a batch ramp-up warmup ends and decay reaches min_lr at the
    steps the recipe names. A resumed run keeps the checkpoint's position (samples consumed) and
    takes everything else from the recipe; ``resumed`` counts the samples of steps before the
    checkpoint's as they were consumed, so a changed batch size moves no point (``samples_at_step``)."""
    s, o, train = recipe.schedule, recipe.optimizer, recipe.train
    decay_iters = s.decay_iters or train.train_iters

    def at(step: int) -> int:
        return samples_at_step(train, step, resumed)

    decay_samples = at(decay_iters)
    wsd = s.decay_style == "wsd"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=at(s.warmup_iters),
        lr_decay_steps=decay_samples,
        lr_decay_style="WSD" if wsd else s.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_samples,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,  # on resume the recipe's schedule wins (see resume_changes)
        wsd_decay_steps=decay_samples - at(decay_iters - (s.wsd_decay_iters or 0)) if wsd else None,
        lr_wsd_decay_style=s.wsd_decay_style if wsd else None,
    )


def rampup_schedule(rampup_batch_size: list[int], global_batch_size: int) -> str:
    """``train.rampup_batch_size`` [start, increment, ramp_samples] (Megatron's --rampup-batch-size:
    the batch grows by ``increment`` every ramp_samples / increments samples) as megatron-core's
    step schedule "SAMPLES:BATCH ...", which replaced the ramp-up calculator in 0.19. Increment k
    starts at the first sample count c with c * increments >= k * ramp_samples."""
    start, increment, ramp_samples = rampup_batch_size
    increments = (global_batch_size - start) // increment
    steps = {0: start}
    for k in range(1, increments + 1):
        steps[-(-k * ramp_samples // increments)] = start + k * increment  # later sizes win a shared threshold
    return " ".join(f"{samples}:{batch}" for samples, batch in steps.items())


def init_batch_calculator(recipe: Recipe, layout: Layout) -> None:
    """megatron-core's micro-batch calculator (global batch ramp-up), set for this process: a
    previous run's in the same process (a ladder's runs, one after another) is replaced."""
    t = recipe.train
    destroy_num_microbatches_calculator()  # megatron-core refuses to set it twice
    init_num_microbatches_calculator(
        rank=torch.distributed.get_rank(),
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        data_parallel_size=layout.dp,
        step_batch_size_schedule=t.rampup_batch_size and rampup_schedule(t.rampup_batch_size, t.global_batch_size),
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
    if model[0].ddp_config.align_param_gather:  # else DDP's forward hooks start them (ddp_config_for)
        param_sync = [chunk.start_param_sync for chunk in model]
        config.param_sync_func = param_sync[0] if one else param_sync


def apply_recipe_hyperparameters(recipe: Recipe, optimizer) -> None:
    """After a resume: loading the optimizer's state also restored the checkpoint's Adam betas and
    epsilon; the recipe's win, as the schedule's do (the scheduler sets lr and weight decay from
    the groups' lr bounds, which stay the recipe's: megatron_fixes._resume_with_new_lr_bounds)."""
    o = recipe.optimizer
    for group in optimizer.param_groups:
        group.update(betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
