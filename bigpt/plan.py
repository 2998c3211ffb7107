"""Plan a recipe on a number of GPUs: memory per GPU, step time, compute budget, and the valid
layouts that fit, ranked. All on paper; the FLOPs come from bigpt.flops (as in the training log),
the memory from bigpt.memory, the divisibility rules from bigpt.layout.
"""

import dataclasses
import itertools
from dataclasses import dataclass

from bigpt.errors import BigptError
from bigpt.flops import (
    Gpu,
    attention_counted,
    flops_per_step,
    gpu_named,
    num_parameters,
    parameters_per_stage,
    recompute_flops_per_step,
    stage_layer_kinds,
)
from bigpt.layout import Layout, divisors, samples_by_step
from bigpt.memory import ADAM_STATE_BYTES, DTYPE_BYTES, MASTER_WEIGHT_BYTES, StageMemory, peak_memory, stage_memory
from bigpt.recipe import ModelConfig, Recipe, padded_vocab_size
from bigpt.scaling import ScalingLaw, scaling_parameters

CHINCHILLA_TOKENS_PER_PARAMETER = 20
"""Compute-optimal training tokens per parameter (Hoffmann et al. 2022)."""
GIB = 2**30
SAVE_SHARE_WARNING = 0.03
"""Warn when synchronous saves take more than this share of the training time."""


@dataclass(frozen=True)
class Option:
    """One way to lay a recipe out on the GPUs, with its cost on paper."""

    recipe: Recipe
    """The recipe with this option's [parallel] degrees and micro-batch size."""
    layout: Layout
    memory: StageMemory
    """The most loaded pipeline stage."""
    bubble: float
    """Pipeline bubble as a fraction of the busy time: (pp - 1) / (vpp × micro-batches)."""


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    gpus: int
    gpu_name: str
    gpu: Gpu
    mfu: float
    """Share of the peak the GPUs reach while busy (outside the pipeline bubble) on all the FLOPs
    they run, the recomputed forwards included; the peak is the FP8 one for an FP8 recipe."""
    headroom: float
    """Fraction of each GPU's memory kept free for what the estimate leaves out."""
    fs_bytes_per_second: float
    """Aggregate write bandwidth of the filesystem holding checkpoint.dir."""
    law: ScalingLaw | None
    """A scaling law fitted to one's own ladder (tools/ladder.py fit); None: Chinchilla's 20
    tokens per parameter."""
    chosen: Option
    """The recipe's own layout, or the best option when the recipe's does not work here."""
    recipe_layout_problem: str | None
    """Why the recipe's own layout cannot run on these GPUs (None: it can)."""
    options: list[Option]
    """Valid options that fit in memory, best first (see _rank)."""
    valid_options: int

    def fits(self, option: Option) -> bool:
        return option.memory.total <= (1 - self.headroom) * self.gpu.memory_gib * GIB

    def peak_flops_per_second(self) -> float:
        """All the GPUs' peak, for the recipe's precision."""
        return self.gpus * self.gpu.peak_flops_per_second(self.recipe)

    def step_seconds(self, option: Option) -> float:
        """Time of one step: the model's FLOPs and the recomputed ones at the busy utilisation,
        stretched by the pipeline bubble."""
        flops = flops_per_step(option.recipe, option.layout.global_batch_size) + recompute_flops_per_step(
            option.recipe, option.layout
        )
        return flops / (self.peak_flops_per_second() * self.mfu) * (1 + option.bubble)

    def logged_mfu(self, option: Option) -> float:
        """The MFU the training log will show: the model's FLOPs per step (recompute not counted)
        over step time and peak."""
        flops = flops_per_step(option.recipe, option.layout.global_batch_size)
        return flops / self.step_seconds(option) / self.peak_flops_per_second()


def make_plan(
    recipe: Recipe,
    gpus: int,
    gpu_name: str,
    *,
    mfu: float,
    headroom: float,
    gpus_per_node: int,
    fs_bytes_per_second: float = 5e9,
    law: ScalingLaw | None = None,
) -> Plan:
    """Every valid layout of ``recipe`` on ``gpus`` GPUs; the ones that fit, ranked (see _rank)."""
    gpu = gpu_named(gpu_name)
    if gpus < 1:
        raise BigptError(f"--gpus {gpus}: plan for at least one GPU.")
    valid = [_option(candidate) for candidate in _candidates(recipe, gpus, gpus_per_node)]
    if not valid:
        raise BigptError(
            f"no layout of {recipe.source} works on {gpus} GPUs: no tensor × pipeline "
            f"× context × data split of {gpus} satisfies the recipe's divisibility "
            f"rules (heads, layers, global batch); try a GPU count with more factors "
            f"of 2, or check with `launchers/run.py {recipe.source} --dry-run "
            f"--world-size {gpus}`."
        )
    plan = Plan(
        recipe,
        gpus,
        gpu_name,
        gpu,
        mfu,
        headroom,
        fs_bytes_per_second,
        law,
        chosen=valid[0],
        recipe_layout_problem=None,
        options=[],
        valid_options=len(valid),
    )
    fitting = sorted((option for option in valid if plan.fits(option)), key=_rank)
    if not fitting:
        least = min(valid, key=lambda option: option.memory.total)
        raise BigptError(
            f"{recipe.source} fits on no layout of {gpus} × {gpu_name}: the smallest need is "
            f"{least.memory.total / GIB:.1f} GiB per GPU ({describe_layout(least.layout)}) against "
            f"{(1 - headroom) * gpu.memory_gib:.1f} GiB usable; use more or larger GPUs, "
            + (
                "a shorter model.seq_length or train.micro_batch_size."
                if recipe.recompute.granularity == "full"
                else 'or recompute.granularity = "full" (or "selective" with recompute.modules = ["mlp"]).'
            )
        )
    try:
        own = _option((recipe, Layout.from_recipe(recipe, gpus)))
        problem = None
    except BigptError as err:
        own, problem = fitting[0], str(err)
    return dataclasses.replace(plan, chosen=own, recipe_layout_problem=problem, options=fitting)


def _candidates(recipe: Recipe, gpus: int, gpus_per_node: int):
    """(recipe, layout) for each split of ``gpus`` the layout rules accept. Tensor parallelism
    stays inside a node (it communicates every layer); sequence parallelism is on whenever
    tensor parallelism is; the recipe's recompute, precision and batch size are kept."""
    model, train = recipe.model, recipe.train
    # Each degree is bounded by what it splits (heads, half the sequence, layers), so an absurd GPU
    # count answers at once instead of testing every one of its divisors.
    for tp in divisors(min(gpus, gpus_per_node), at_most=model.num_attention_heads):
        for cp in divisors(gpus // tp, at_most=max(1, model.seq_length // 2)) if gpus % tp == 0 else ():
            for pp in divisors(gpus // (tp * cp), at_most=model.num_layers):
                for vpp in divisors(model.num_layers // pp) if pp > 1 else (1,):
                    dp = gpus // (tp * cp * pp)
                    for ep, mbs in itertools.product(
                        _expert_parallel_sizes(model, tp * cp * dp), divisors(train.global_batch_size // dp)
                    ):
                        parallel = dataclasses.replace(
                            recipe.parallel,
                            tensor=tp,
                            context=cp,
                            pipeline=pp,
                            virtual_pipeline=vpp,
                            data=0,
                            sequence_parallel=tp > 1,
                            expert=ep,
                            expert_tensor=1 if model.family == "moe_decoder" else None,
                        )
                        candidate = dataclasses.replace(
                            recipe, parallel=parallel, train=dataclasses.replace(train, micro_batch_size=mbs)
                        )
                        try:
                            yield candidate, Layout.from_recipe(candidate, gpus)
                        except BigptError:
                            continue


def all_to_all_bytes(recipe: Recipe, layout: Layout) -> float:
    """Bytes one GPU of the most loaded stage sends to other expert-parallel ranks in a step: each
    of its tokens goes to router_topk experts and comes back (dispatch and combine), in the forward
    and again in the backward, a (EP - 1) / EP share of them to other ranks (balanced routing)."""
    model = recipe.model
    moe_layers_per_stage = max(sum(kinds) for kinds in stage_layer_kinds(model, layout.layers_per_stage, layout.vpp))
    tokens = layout.micro_batch_size * model.seq_length // (layout.cp * (layout.tp if layout.sequence_parallel else 1))
    per_layer = 4 * tokens * model.moe.router_topk * model.hidden_size * DTYPE_BYTES[recipe.precision.dtype]
    return per_layer * moe_layers_per_stage * layout.num_microbatches * (layout.ep - 1) / layout.ep


def _expert_parallel_sizes(model: ModelConfig, stage_ranks: int) -> list[int]:
    """Expert-parallel sizes to plan: those that split the experts evenly over ranks of a stage
    (expert tensor parallelism 1, as Megatron-LM advises with EP); 1 for a dense model."""
    if model.family != "moe_decoder":
        return [1]
    return [ep for ep in divisors(stage_ranks) if (model.moe.num_experts or 1) % ep == 0]


def _option(candidate: tuple[Recipe, Layout]) -> Option:
    recipe, layout = candidate
    bubble = (layout.pp - 1) / (layout.vpp * layout.num_microbatches)
    return Option(recipe, layout, peak_memory(recipe, layout), bubble)


def checkpoint_bytes(recipe: Recipe, layout: Layout) -> tuple[float, float]:
    """(bytes of one checkpoint, bytes its busiest rank writes), as bigpt saves them: the weights in
    the recipe's dtype, and the optimizer's fp32 main weights (the distributed optimizer saves its
    own copy even in fp32) and Adam moments. What the data-parallel ranks of a model-parallel rank
    hold is written once, spread evenly over them (megatron-core's fully parallel save), whatever
    checkpoint.optimizer_format: each rank writes about a data-parallel share of its model shard."""
    model, p = recipe.model, recipe.parallel
    weight = DTYPE_BYTES[recipe.precision.dtype]
    optimizer = ADAM_STATE_BYTES + (MASTER_WEIGHT_BYTES if p.distributed_optimizer or weight < 4 else 0)
    busiest = max(stage.parameters for stage in stage_memory(recipe, layout))
    vocab = padded_vocab_size(model, layout.tp)
    return num_parameters(model, vocab) * (weight + optimizer), busiest * (weight + optimizer) / layout.dp


def _rank(option: Option) -> tuple:
    """Megatron's rules of thumb (Narayanan et al. 2021), in order: the smallest model-parallel
    group that fits (the other GPUs do data parallelism, which communicates least); within it,
    tensor parallelism inside the node before context parallelism before pipeline stages; then
    the smaller pipeline bubble (in whole percent, under 1% counting as none), fewer pipeline
    chunks (less point-to-point traffic), larger micro-batches (more efficient matmuls) and less
    memory."""
    layout = option.layout
    return (
        layout.tp * layout.cp * layout.pp,
        layout.pp,
        layout.cp,
        layout.ep,  # the all-to-all reaches fewer ranks
        round(max(option.bubble, 0.01), 2),
        layout.vpp,
        -layout.micro_batch_size,
        option.memory.total,
    )


def describe_layout(layout: Layout) -> str:
    vpp = f" (VPP {layout.vpp})" if layout.vpp > 1 else ""
    sp = ", sequence parallel" if layout.sequence_parallel else ""
    experts = f", EP {layout.ep} × expert TP {layout.etp}" if layout.ep * layout.etp > 1 else ""
    return (
        f"TP {layout.tp} × PP {layout.pp}{vpp} × CP {layout.cp} × DP {layout.dp}{sp}{experts}, "
        f"micro-batch {layout.micro_batch_size} × {layout.num_microbatches} micro-batches"
    )


def report(plan: Plan, top: int) -> str:
    """The plan as text: sizes, memory per GPU, time, budget, then the ranked layouts."""
    recipe, chosen = plan.recipe, plan.chosen
    layout = chosen.layout
    lines = [
        f"Plan for {recipe.source} on {plan.gpus} × {plan.gpu_name} "
        f"({plan.gpu.memory_gib:.1f} GiB, {plan.peak_flops_per_second() / plan.gpus / 1e12:,.0f} TFLOP/s dense "
        + ("FP8" if recipe.precision.fp8 != "none" else "bf16")
        + ")"
    ]
    lines += _parameter_lines(chosen)
    if plan.recipe_layout_problem:
        lines.append(
            f"layout           the recipe's own does not work here ({plan.recipe_layout_problem}); "
            f"planned with the best below:"
        )
    rank = next(
        (
            f"; ranks {number} of the {len(plan.options)} that fit"
            for number, option in enumerate(plan.options, 1)
            if _same_degrees(option.layout, layout)
        ),
        "",
    )
    lines.append(f"layout           {describe_layout(layout)}{rank}")
    lines += _memory_lines(plan, chosen)
    flops = flops_per_step(chosen.recipe, layout.global_batch_size)
    recomputed = recompute_flops_per_step(chosen.recipe, layout)
    step = plan.step_seconds(chosen)
    lines += [
        f"FLOPs per step   {flops:.3e} (3 × forward, {attention_counted(chosen.recipe.model)}; as the training log)"
        + (f" + {recomputed:.3e} recomputed ({recomputed / flops:.1%})" if recomputed else ""),
        f"step time        {step:.2f} s at {plan.mfu:.0%} of peak while busy, pipeline bubble "
        f"{chosen.bubble:.1%}"
        + (", recompute included" if recomputed else "")
        + f" → the training log's MFU ≈ {plan.logged_mfu(chosen):.1%}",
    ]
    if recipe.model.family == "moe_decoder":
        lines.append(
            f"all-to-all       {all_to_all_bytes(chosen.recipe, layout) / 1e9:,.2f} GB per GPU per step leave "
            f"for other expert-parallel ranks (tokens to and from their experts, forward and backward; "
            f"{recipe.model.moe.token_dispatcher} dispatcher at EP {layout.ep})"
        )
    lines += _checkpoint_lines(plan, chosen)
    lines += _budget_lines(plan, chosen)
    lines += [
        "",
        f"Layouts of {plan.gpus} GPUs that fit ({len(plan.options)} of {plan.valid_options} valid; "
        f"memory of the most loaded GPU with {plan.headroom:.0%} kept free; the smallest model-parallel "
        f"group first, then TP before CP before PP, a smaller bubble (<1% counts as none), fewer "
        f"chunks, larger micro-batches)",
        _table(plan, plan.options[:top]),
    ]
    return "\n".join(lines)


def _parameter_lines(option: Option) -> list[str]:
    model, layout = option.recipe.model, option.layout
    vocab = padded_vocab_size(model, layout.tp)
    released, allocated = num_parameters(model), num_parameters(model, vocab)
    lines = [
        f"parameters       {released:,} ({released / 1e9:.2f}B); {allocated:,} allocated "
        f"with the vocab padded to {vocab:,}"
    ]
    if model.family == "moe_decoder":
        active = num_parameters(model, active=True)
        lines.append(
            f"  active         {active:,} ({active / 1e9:.2f}B) per token ({model.moe.router_topk} of "
            f"{model.moe.num_experts} experts; FLOPs and MFU count these)"
        )
    stages = parameters_per_stage(model, layout.layers_per_stage, vocab, layout.vpp)
    lines += [
        f"  stage {stage:<3}      {count:,} ({layers} layers"
        + (", embedding" if stage == 0 else "")
        + (", output layer" if stage == len(stages) - 1 else "")
        + f"; {memory.parameters / 1e9:.2f}B per GPU)"
        for stage, (count, layers, memory) in enumerate(
            zip(stages, layout.layers_per_stage, stage_memory(option.recipe, layout))
        )
    ]
    return lines


def _memory_lines(plan: Plan, option: Option) -> list[str]:
    memory, recipe, layout = option.memory, option.recipe, option.layout
    precision = recipe.precision
    verdict = "fits" if plan.fits(option) else "DOES NOT FIT"
    recompute = recipe.recompute.granularity + (
        f" ({', '.join(recipe.recompute.modules)})" if recipe.recompute.granularity == "selective" else ""
    )
    return [
        f"memory per GPU   {memory.total / GIB:.1f} GiB on pipeline stage {memory.stage} (the most loaded): "
        f"{verdict} in {plan.gpu.memory_gib:.1f} GiB with {plan.headroom:.0%} kept free",
        f"  weights        {memory.weights / GIB:6.1f} GiB  "
        f"{memory.parameters / 1e9:.2f}B parameters in {precision.dtype}",
        f"  gradients      {memory.gradients / GIB:6.1f} GiB  "
        + ("fp32" if precision.grad_reduce_in_fp32 or precision.dtype == "fp32" else precision.dtype)
        + " gradient buffer",
        f"  optimizer      {memory.optimizer / GIB:6.1f} GiB  Adam moments"
        + ("" if precision.dtype == "fp32" else " + fp32 master weights")
        + (f", sharded over DP {layout.dp}" if recipe.parallel.distributed_optimizer else ", not sharded")
        + (
            f" (the experts' over expert DP {layout.expert_dp})"
            if recipe.parallel.distributed_optimizer and layout.ep * layout.etp > 1
            else ""
        ),
        f"  activations    {memory.activations / GIB:6.1f} GiB  {memory.in_flight} micro-batch(es) in flight × "
        f"{layout.layers_per_stage[memory.stage] // layout.vpp} layers, recompute {recompute}"
        + (", sequence parallel" if layout.sequence_parallel else ""),
    ]


def _checkpoint_lines(plan: Plan, option: Option) -> list[str]:
    recipe, checkpoint = option.recipe, option.recipe.checkpoint
    total, busiest = checkpoint_bytes(recipe, option.layout)
    save = total / plan.fs_bytes_per_second
    lines = [
        f"checkpoint       {total / 1e9:,.1f} GB per save ({recipe.precision.dtype} weights, fp32 optimizer "
        f"state, {checkpoint.optimizer_format}); the busiest rank writes {busiest / 1e9:,.2f} GB; "
        f"{save:,.0f} s at {plan.fs_bytes_per_second / 1e9:g} GB/s (--fs-gbps)"
    ]
    if checkpoint.save_interval and checkpoint.async_save:
        lines[0] += f"; every {checkpoint.save_interval:,} steps, asynchronous (written while training goes on)"
    elif checkpoint.save_interval:
        share = save / (save + checkpoint.save_interval * plan.step_seconds(option))
        lines[0] += f"; every {checkpoint.save_interval:,} steps, synchronous: {share:.1%} of training time"
        if share > SAVE_SHARE_WARNING:
            lines.append(
                f"  warning        synchronous saves take more than {SAVE_SHARE_WARNING:.0%} of the training "
                "time: raise checkpoint.save_interval, set checkpoint.async_save = true, or save "
                "to a faster filesystem"
            )
    return lines


def _budget_lines(plan: Plan, option: Option) -> list[str]:
    recipe, layout = option.recipe, option.layout
    steps = recipe.train.train_iters
    samples = samples_by_step(recipe.train, steps)
    full_batches = samples / layout.global_batch_size  # a ramp-up's smaller steps as shares of a full one
    tokens = samples * recipe.model.seq_length
    total_flops = full_batches * flops_per_step(recipe, layout.global_batch_size)
    seconds = full_batches * plan.step_seconds(option)
    parameters = num_parameters(recipe.model)
    if plan.law is None:
        optimal: float = CHINCHILLA_TOKENS_PER_PARAMETER * parameters
        optimum = (
            f"compute-optimal  {CHINCHILLA_TOKENS_PER_PARAMETER} tokens/parameter (Chinchilla) = {optimal:.3g} tokens; "
            f"this plan trains {tokens / parameters:.1f} tokens/parameter"
        )
    else:
        optimum, optimal = _law_line(plan.law, recipe.model, tokens)
    ratio = tokens / optimal
    verdict = (
        "under-trained for its size: a smaller model on more tokens would do better with this compute"
        if ratio < 0.8
        else "about compute-optimal"
        if ratio <= 1.25
        else "over-trained for its size: more tokens than compute-optimal, buying a smaller model to serve"
    )
    return [
        f"compute budget   {steps:,} steps × {layout.global_batch_size * recipe.model.seq_length:,} tokens"
        + (" (ramping up)" if recipe.train.rampup_batch_size else "")
        + " = "
        f"{tokens:.3g} tokens: {total_flops:.3g} FLOPs = {total_flops / 1e15 / 86400:,.0f} PF/s-days = "
        f"{seconds * plan.gpus / 3600:,.0f} GPU-hours ({seconds / 86400:,.1f} days on {plan.gpus} GPUs)",
        f"{optimum} ({ratio:.2g}× compute-optimal): {verdict}",
    ]


def _law_line(law: ScalingLaw, model: ModelConfig, tokens: float) -> tuple[str, float]:
    """The fitted law's compute-optimal allocation of this recipe's budget C = 6ND (N as the law
    counts it) and the loss it predicts for the recipe as written; and the optimal token count."""
    parameters = scaling_parameters(model)
    flops = 6 * parameters * tokens
    best_parameters, best_tokens = law.optimal(flops)
    return (
        f"compute-optimal  by the fitted law, C = 6ND = {flops:.3g} FLOPs (N = {parameters:.3g} without the input "
        f"embedding) is best spent on N = {best_parameters:.3g}, D = {best_tokens:.3g} tokens (predicted loss "
        f"{law.loss(best_parameters, best_tokens):.4f}); this recipe as written: predicted loss "
        f"{law.loss(parameters, tokens):.4f}, D = {tokens:.3g} tokens"
        + (
            f" (an extrapolation {flops / law.largest_fitted_flops:.2g}× beyond the largest run fitted)"
            if law.largest_fitted_flops and flops > 10 * law.largest_fitted_flops
            else ""
        )
    ), best_tokens


def _table(plan: Plan, options: list[Option]) -> str:
    experts = plan.recipe.model.family == "moe_decoder"
    header = ("rank", "TP", "PP", "VPP", "CP", "DP") + (("EP",) if experts else ())
    header += ("mbs", "micro-batches", "bubble", "GiB/GPU", "step s", "")
    own = plan.chosen.layout if plan.recipe_layout_problem is None else None
    rows = [header] + [
        (
            str(rank),
            str(o.layout.tp),
            str(o.layout.pp),
            str(o.layout.vpp),
            str(o.layout.cp),
            str(o.layout.dp),
            *((str(o.layout.ep),) if experts else ()),
            str(o.layout.micro_batch_size),
            str(o.layout.num_microbatches),
            f"{o.bubble:.1%}",
            f"{o.memory.total / GIB:.1f}",
            f"{plan.step_seconds(o):.2f}",
            "← recipe" if _same_degrees(o.layout, own) else "",
        )
        for rank, o in enumerate(options, 1)
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _same_degrees(layout: Layout, other: Layout | None) -> bool:
    fields = ("tp", "pp", "vpp", "cp", "dp", "ep", "etp", "micro_batch_size")
    return other is not None and all(getattr(layout, f) == getattr(other, f) for f in fields)
