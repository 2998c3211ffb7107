"""How a recipe maps onto a world of ranks: parallel degrees, layer split, micro-batches.

Pure arithmetic on paper: no torch.distributed, no device. Every rule megatron-core would
enforce later with an assert deep inside model building (or, worse, by silently dropping layers)
is checked here first, with an error that names the recipe keys and what to change.
"""

import math
from dataclasses import dataclass

from bigpt.recipe import Recipe, TrainConfig
from bigpt.recipe.checks import recipe_error


@dataclass(frozen=True)
class Layout:
    """Parallel degrees and batch arithmetic of one run (world = tp × pp × cp × dp)."""

    world_size: int
    """Total number of ranks."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size (number of stages)."""
    vpp: int
    """Virtual pipeline chunks per stage; 1 = not interleaved."""
    cp: int
    """Context-parallel size."""
    dp: int
    """Data-parallel size."""
    micro_batch_size: int
    """Sequences per micro-batch on one data-parallel rank."""
    global_batch_size: int
    """Sequences per optimizer step (after any ramp-up)."""
    num_microbatches: int
    """Micro-batches per step at the full global batch: gbs / (mbs × dp)."""
    sequence_parallel: bool
    """Whether activations outside attention/MLP are split over the tensor-parallel group."""
    layers_per_stage: tuple[int, ...]
    """Transformer layers on each pipeline rank, summed over its virtual chunks."""
    ep: int = 1
    """Expert-parallel size: the experts of an MoE layer are split over this many ranks."""
    etp: int = 1
    """Tensor-parallel size inside each expert."""

    @classmethod
    def from_recipe(cls, recipe: Recipe, world_size: int | None = None) -> "Layout":
        """Check the recipe against ``world_size`` ranks (None: the recipe's own parallel.data,
        or data parallel 1 when that is 0) and return the layout."""
        parallel = recipe.parallel
        _check_degrees(recipe)
        dp = _data_parallel_size(recipe, world_size)
        _check_tensor_split(recipe)
        _check_sequence_split(recipe)
        ep, etp = _expert_degrees(recipe, dp)
        return cls(
            world_size=parallel.tensor * parallel.pipeline * parallel.context * dp,
            tp=parallel.tensor,
            pp=parallel.pipeline,
            vpp=parallel.virtual_pipeline,
            cp=parallel.context,
            dp=dp,
            micro_batch_size=recipe.train.micro_batch_size,
            global_batch_size=recipe.train.global_batch_size,
            num_microbatches=_num_microbatches(recipe, dp),
            sequence_parallel=parallel.sequence_parallel,
            layers_per_stage=_layers_per_stage(recipe),
            ep=ep,
            etp=etp,
        )

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert weights: the ranks of a pipeline stage that hold the
        same experts (megatron-core's expert-data-parallel group)."""
        return self.tp * self.cp * self.dp // (self.ep * self.etp)


def _check_degrees(recipe: Recipe) -> None:
    parallel = recipe.parallel
    if parallel.virtual_pipeline > 1 and parallel.pipeline == 1:
        recipe_error(
            recipe,
            f"parallel.virtual_pipeline={parallel.virtual_pipeline} needs parallel.pipeline > 1",
            "interleaving splits pipeline stages into chunks; set virtual_pipeline = 1 or use pipeline parallelism",
        )
    if parallel.sequence_parallel and parallel.tensor == 1:
        recipe_error(
            recipe,
            "parallel.sequence_parallel=true needs parallel.tensor > 1",
            "it splits activations over the tensor-parallel group; set it to false",
        )
    if parallel.overlap_param_gather and not (parallel.distributed_optimizer and parallel.overlap_grad_reduce):
        recipe_error(
            recipe,
            "parallel.overlap_param_gather=true needs parallel.distributed_optimizer and parallel.overlap_grad_reduce",
            "turn both on, or overlap_param_gather off",
        )
    if parallel.context > 1 and recipe.model.family == "encoder":
        recipe_error(
            recipe,
            f'parallel.context={parallel.context} with model.family = "encoder": megatron-core splits a sequence '
            "over context-parallel ranks for causal attention only",
            "set parallel.context = 1",
        )
    if recipe.model.family == "encoder_decoder":
        refused = [
            (parallel.pipeline > 1, f"parallel.pipeline={parallel.pipeline}", "set parallel.pipeline = 1"),
            (parallel.context > 1, f"parallel.context={parallel.context}", "set parallel.context = 1"),
        ]
        for wrong, key, fix in refused:
            if wrong:
                recipe_error(
                    recipe,
                    f'{key} with model.family = "encoder_decoder": megatron-core 0.19\'s T5Model splits neither its '
                    "stacks over pipeline stages nor its sequences over context-parallel ranks (its cross-attention "
                    "and relative position bias; Megatron-LM's pretrain_t5.py refuses both too)",
                    f"{fix}, and use tensor and data parallelism",
                )
    name = recipe.optimizer.name
    if name != "adamw" and parallel.distributed_optimizer and recipe.precision.dtype != "bf16":
        recipe_error(
            recipe,
            f"optimizer.name={name!r} with parallel.distributed_optimizer=true needs "
            f"precision.dtype='bf16', got {recipe.precision.dtype!r} (megatron-core's layer-wise "
            "distributed optimizer drives its optimizers through bf16 mixed precision only)",
            "train in bf16, or set distributed_optimizer = false (every data-parallel rank "
            "then keeps the whole optimizer state)",
        )


def _data_parallel_size(recipe: Recipe, world_size: int | None) -> int:
    parallel = recipe.parallel
    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    degrees = (
        f"parallel.tensor × parallel.pipeline × parallel.context = "
        f"{parallel.tensor}×{parallel.pipeline}×{parallel.context} = {model_parallel}"
    )
    if world_size is None:
        return parallel.data or 1
    if world_size <= 0 or world_size % model_parallel:
        recipe_error(
            recipe,
            f"world size {world_size} is not a multiple of {degrees}",
            f"launch a multiple of {model_parallel} ranks or change those degrees",
        )
    dp = world_size // model_parallel
    if parallel.data and parallel.data != dp:
        recipe_error(
            recipe,
            f"parallel.data={parallel.data} but world size {world_size} / ({degrees}) gives data parallel {dp}",
            f"set parallel.data = 0 to derive it, or launch {model_parallel * parallel.data} ranks",
        )
    return dp


def fewest_data_parallel(recipe: Recipe) -> int:
    """The fewest data-parallel ranks the recipe's layout can run at: 1, or as many as make a
    pipeline stage's TP × CP × DP ranks a multiple of the expert groups' EP × expert TP."""
    parallel = recipe.parallel
    if recipe.model.family != "moe_decoder":
        return 1
    experts = parallel.expert * (parallel.expert_tensor or parallel.tensor)
    return experts // math.gcd(parallel.tensor * parallel.context, experts)


def _expert_degrees(recipe: Recipe, dp: int) -> tuple[int, int]:
    """(EP, expert TP), by megatron-core's rules: the experts split evenly over EP, and the ranks
    of a pipeline stage (TP × CP × DP) split evenly into groups of EP × expert TP."""
    if recipe.model.family != "moe_decoder":
        return 1, 1
    parallel, moe = recipe.parallel, recipe.model.moe
    ep, etp = parallel.expert, parallel.expert_tensor or parallel.tensor
    experts = moe.num_experts or 1
    if experts % ep:
        recipe_error(
            recipe,
            f"model.moe.num_experts={experts} is not divisible by parallel.expert={ep}",
            f"each expert-parallel rank holds an equal share; parallel.expert can be one of {divisors(experts)}",
        )
    stage_ranks = parallel.tensor * parallel.context * dp
    if stage_ranks % (ep * etp):
        recipe_error(
            recipe,
            f"parallel.expert × expert tensor parallel = {ep}×{etp} does not divide the {stage_ranks} ranks of a "
            f"pipeline stage (parallel.tensor × parallel.context × data parallel = "
            f"{parallel.tensor}×{parallel.context}×{dp})",
            "megatron-core takes the expert groups from those ranks: pick degrees that divide it, or launch more ranks",
        )
    width = moe.ffn_hidden_size or recipe.model.ffn_hidden_size
    if width % etp or (moe.shared_expert_ffn_hidden_size or 0) % parallel.tensor:
        recipe_error(
            recipe,
            f"the expert width {width} (model.moe.ffn_hidden_size) is not divisible by expert tensor parallel "
            f"{etp}, or model.moe.shared_expert_ffn_hidden_size by parallel.tensor={parallel.tensor}",
            "adjust the widths or parallel.expert_tensor",
        )
    if parallel.tensor > 1 and not parallel.sequence_parallel:
        recipe_error(
            recipe,
            f"MoE layers with parallel.tensor={parallel.tensor} need parallel.sequence_parallel = true "
            "(megatron-core's MoE layer refuses tensor parallelism without it)",
            "set parallel.sequence_parallel = true",
        )
    return ep, etp


def _check_tensor_split(recipe: Recipe) -> None:
    model, tp = recipe.model, recipe.parallel.tensor
    sizes = {
        "model.num_attention_heads": model.num_attention_heads,
        "model.num_query_groups": model.num_query_groups or model.num_attention_heads,
        "model.ffn_hidden_size": model.ffn_hidden_size,
    }
    for key, size in sizes.items():
        if size % tp:
            choices = divisors(math.gcd(*sizes.values()))
            recipe_error(
                recipe,
                f"{key}={size} is not divisible by parallel.tensor={tp}",
                f"each tensor-parallel rank needs an equal share; parallel.tensor can be one of {choices}",
            )


def _check_sequence_split(recipe: Recipe) -> None:
    seq, parallel = recipe.model.seq_length, recipe.parallel
    if parallel.context > 1 and seq % (2 * parallel.context):
        recipe_error(
            recipe,
            f"model.seq_length={seq} is not divisible by 2 × parallel.context = {2 * parallel.context}",
            "context parallelism cuts each sequence into 2 × context chunks (for causal load balance); adjust either",
        )
    window = recipe.model.attention_window
    if parallel.context > 1 and window and window < seq:
        recipe_error(
            recipe,
            f"model.attention_window={window} (shorter than model.seq_length={seq}) with "
            f"parallel.context={parallel.context}",
            "megatron-core's context-parallel attention (Transformer "
            "Engine's ring exchange) does not apply a sliding window exactly; set parallel.context = 1, or "
            "a seq_length no longer than the window",
        )
    per_context = seq // parallel.context
    if parallel.sequence_parallel and per_context % parallel.tensor:
        recipe_error(
            recipe,
            f"model.seq_length / parallel.context = {per_context} is not "
            f"divisible by parallel.tensor={parallel.tensor}",
            "sequence parallelism splits each sequence over the tensor-parallel ranks; adjust either",
        )
    if parallel.sequence_parallel and recipe.model.family == "encoder_decoder":
        decoder = recipe.data.span_corruption.decoder_seq_length(seq)
        if decoder % parallel.tensor:
            recipe_error(
                recipe,
                f"the decoder's length {decoder} (what span corruption of model.seq_length={seq} tokens needs, "
                f"[data.span_corruption]) is not divisible by parallel.tensor={parallel.tensor}",
                "sequence parallelism splits the decoder's sequences over the tensor-parallel ranks too; set "
                "parallel.sequence_parallel = false, or a seq_length whose decoder length is divisible",
            )


def _layers_per_stage(recipe: Recipe) -> tuple[int, ...]:
    """Megatron-core 0.16's split (TransformerConfig / get_num_layers_to_build): first/last
    stages take what the recipe says, the middle stages share the rest evenly, and every
    stage's count must divide evenly into its virtual chunks."""
    parallel, num_layers = recipe.parallel, recipe.model.num_layers
    pp, vpp = parallel.pipeline, parallel.virtual_pipeline
    model = recipe.model
    if model.family == "encoder_decoder" and pp == 1:  # both stacks, in the one stage it can have
        return (model.encoder_decoder.encoder_depth(num_layers) + num_layers,)
    fixed = {
        stage: layers
        for stage, layers in ((0, parallel.first_stage_layers), (pp - 1, parallel.last_stage_layers))
        if layers is not None
    }
    if not fixed:
        if num_layers % (pp * vpp):
            recipe_error(
                recipe,
                f"model.num_layers={num_layers} does not split evenly into "
                f"parallel.pipeline × parallel.virtual_pipeline = {pp}×{vpp} = "
                f"{pp * vpp} chunks",
                "pick degrees whose product divides num_layers, or set parallel.first_stage_layers / last_stage_layers",
            )
        return (num_layers // pp,) * pp
    if pp == 1:
        recipe_error(
            recipe,
            "parallel.first_stage_layers / last_stage_layers need parallel.pipeline > 1",
            "remove them or use pipeline parallelism",
        )
    middle_stages = pp - len(fixed)
    middle_layers = num_layers - sum(fixed.values())
    if (
        middle_layers < 0
        or (middle_stages == 0) != (middle_layers == 0)
        or (middle_stages and middle_layers % middle_stages)
    ):
        recipe_error(
            recipe,
            f"model.num_layers={num_layers} minus parallel.first_stage_layers "
            f"/ last_stage_layers leaves {middle_layers} layers for {middle_stages} "
            f"middle pipeline stage(s)",
            "the rest must split evenly over the middle stages (none left when there are no middle stages)",
        )
    per_middle = middle_layers // middle_stages if middle_stages else 0
    stages = tuple(fixed.get(stage, per_middle) for stage in range(pp))
    if any(layers % vpp for layers in stages):
        recipe_error(
            recipe,
            f"layers per pipeline stage {list(stages)} are not all multiples of parallel.virtual_pipeline={vpp}",
            "megatron-core splits each stage's layers evenly over its virtual chunks; adjust the stage layer counts",
        )
    return stages


def _num_microbatches(recipe: Recipe, dp: int) -> int:
    """Micro-batches per step, after checking the full batch and every ramp-up batch size."""
    train, parallel = recipe.train, recipe.parallel
    per_pass = train.micro_batch_size * dp
    sizes = {train.global_batch_size: "train.global_batch_size"}
    if train.rampup_batch_size:
        start, increment, _ = train.rampup_batch_size
        for size in range(start, train.global_batch_size, increment):
            sizes[size] = f"ramp-up batch size {size} (train.rampup_batch_size)"
    for size, what in sizes.items():
        if size % per_pass:
            recipe_error(
                recipe,
                f"{what} {size} is not divisible by train.micro_batch_size × "
                f"data parallel = {train.micro_batch_size}×{dp} = {per_pass}",
                f"make it a multiple of {per_pass} or change micro_batch_size",
            )
        if parallel.virtual_pipeline > 1 and (size // per_pass) % parallel.pipeline:
            recipe_error(
                recipe,
                f"{what} {size} gives {size // per_pass} micro-batches, not a "
                f"multiple of parallel.pipeline={parallel.pipeline}",
                f"megatron-core 0.16's interleaved schedule (virtual_pipeline > 1) runs "
                f"micro-batches in groups of pipeline size per virtual stage "
                f"(microbatch_group_size_per_vp_stage = pipeline), so make it a "
                f"multiple of micro_batch_size × data parallel × pipeline = "
                f"{per_pass * parallel.pipeline}",
            )
    return train.global_batch_size // per_pass


def global_batch_at(train: TrainConfig, consumed_samples: int) -> int:
    """The global batch of the step that starts after ``consumed_samples``. Under
    train.rampup_batch_size [start, increment, ramp_samples] (Megatron's --rampup-batch-size) it
    grows by ``increment`` every ramp_samples / increments samples: increment k from the first
    count c with c × increments ≥ k × ramp_samples, as megatron-core's calculator is told
    (bigpt.train.optim.rampup_schedule)."""
    if not train.rampup_batch_size:
        return train.global_batch_size
    start, increment, ramp_samples = train.rampup_batch_size
    increments = (train.global_batch_size - start) // increment
    reached = increments if ramp_samples == 0 else min(increments, consumed_samples * increments // ramp_samples)
    return start + reached * increment


def samples_by_step(train: TrainConfig, steps: int, consumed: int = 0) -> int:
    """Samples consumed by ``steps`` steps that start after ``consumed`` samples (0: from the first
    step): steps × global_batch_size, less what the smaller batches of a ramp-up leave out. The
    schedule (warmup, decay) counts samples, so its points in steps become these."""
    start = consumed
    for step in range(steps):
        batch = global_batch_at(train, consumed)
        if batch == train.global_batch_size:  # the ramp-up is over: the rest are full batches
            return consumed + (steps - step) * batch - start
        consumed += batch
    return consumed - start


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run starts: the counters of its checkpoint, and the batch settings (its
    [train]) and sequence length it was saved with, which this run may change."""

    iteration: int
    consumed_samples: int
    consumed_tokens: int
    seq_length: int
    train: TrainConfig


def data_position(consumed_tokens: int, seq_length: int) -> int:
    """The sample of the training stream (of ``seq_length``-token samples) a run continues from:
    after the samples that hold the tokens consumed so far (consumed samples, unless the sequence
    length changed), so that data phases, which start at a token count, switch at it whatever
    batch sizes and sequence lengths came before."""
    return consumed_tokens // seq_length


def samples_at_step(train: TrainConfig, step: int, resumed: Resumed | None = None) -> int:
    """Samples consumed by the end of step ``step``, with the batches of ``train`` from the start,
    or after a resume: the checkpoint's sample count at its step, its own batch settings before,
    ``train``'s after. So the schedule's points (in steps) stay at their steps when a resume
    changes train.global_batch_size or train.rampup_batch_size."""
    if resumed is None:
        return samples_by_step(train, step)
    if step <= resumed.iteration:  # past: as the checkpoint's batches consumed them
        return min(samples_by_step(resumed.train, step), resumed.consumed_samples)
    return resumed.consumed_samples + samples_by_step(train, step - resumed.iteration, resumed.consumed_samples)


def train_samples_needed(train: TrainConfig, seq_length: int, resumed: Resumed | None = None) -> int:
    """Length of the training sample stream a run to train.train_iters reads: from the resumed
    position on, the samples of its remaining steps."""
    if resumed is None:
        return samples_by_step(train, train.train_iters)
    remaining = max(train.train_iters - resumed.iteration, 0)
    return data_position(resumed.consumed_tokens, seq_length) + samples_by_step(
        train, remaining, resumed.consumed_samples
    )


def divisors(n: int, at_most: int | None = None) -> list[int]:
    """The divisors of ``n`` up to ``at_most``."""
    return [d for d in range(1, min(n, at_most or n) + 1) if n % d == 0]
