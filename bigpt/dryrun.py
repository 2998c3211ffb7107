"""The --dry-run report: the resolved recipe and its plan, computed on paper."""

from bigpt.errors import BigptError, BigptErrors
from bigpt.flops import attention_counted, flops_per_step, num_parameters, parameters_per_stage
from bigpt.layout import Layout, samples_by_step
from bigpt.memory import stage_memory
from bigpt.numbers import short
from bigpt.plan import GIB
from bigpt.recipe import Recipe, padded_vocab_size, recipe_to_toml
from bigpt.runtime import console

REFUSED = object()
"""What a check gives back in a dry run that collects problems, when it found one."""
SEE_PROBLEMS = "not known: see the problems below"


def _training_tokens(recipe: Recipe) -> str:
    train, seq = recipe.train, recipe.model.seq_length
    tokens = samples_by_step(train, train.train_iters) * seq
    per_step = train.global_batch_size * seq
    if train.rampup_batch_size:
        return (
            f"training tokens  {train.train_iters:,} steps, ramping up to {per_step:,} = {tokens:,} ({short(tokens)})"
        )
    return f"training tokens  {train.train_iters:,} steps × {per_step:,} = {tokens:,} ({short(tokens)})"


def _context(recipe: Recipe, layout: Layout) -> str:
    """A longer context than the model was pretrained at: how far its RoPE scaling reaches, the
    busiest GPU's memory at this length, and the context-parallel degree that keeps each GPU's
    share of a sequence at the original length."""
    model = recipe.model
    original = (
        model.rope_original_max_position_embeddings
        if model.rope_scaling in ("llama3", "yarn")
        else round(model.seq_length / model.rope_scaling_factor)
    )
    reach = model.rope_scaling_factor * original
    peak = max(stage_memory(recipe, layout), key=lambda stage: stage.total)
    cp = 1
    while model.seq_length / cp > original and cp < model.seq_length // 2:
        cp *= 2
    beyond = f"; seq_length is beyond the {reach:,.0f} the scaling reaches" if model.seq_length > reach else ""
    return (
        f"context          {model.seq_length:,} tokens, rope_scaling {model.rope_scaling!r} × "
        f"{model.rope_scaling_factor:g} over {original:,}{beyond}; the busiest GPU holds {peak.total / GIB:.1f} GiB "
        f"({peak.activations / GIB:.1f} GiB activations) at CP {layout.cp}; CP {cp} keeps each GPU's share of a "
        f"sequence at {model.seq_length // cp:,} tokens (tools/plan.py ranks the layouts that fit)"
    )


def describe(recipe: Recipe, layout: Layout, problems: list[str] | None = None, overwrite: bool = False) -> str:
    """Resolved recipe as TOML, then the layout, sizes and batch arithmetic, then what a start
    checks before step 1 (outputs, tokenizer, resume point, initial weights, data). Each of those
    refusals raises at once, as at a real start, unless ``problems`` is given: then its paragraph
    is added to that list and the report goes on with what it can still compute. A model that
    megatron-core refuses has no plan to show and raises either way. ``overwrite``: --overwrite."""
    model, train = recipe.model, recipe.train
    vocab = padded_vocab_size(model, layout.tp)
    total = num_parameters(model, vocab)
    tokens_per_step = layout.global_batch_size * model.seq_length
    chunk_sizes = "/".join(str(n) for n in sorted({n // layout.vpp for n in layout.layers_per_stage}))
    chunks = f" ({layout.vpp} virtual chunks of {chunk_sizes} layers per stage)" if layout.vpp > 1 else ""
    unpadded = num_parameters(model)
    lines = [
        f"# Resolved recipe (from {recipe.source})",
        recipe_to_toml(recipe),
        "# Plan",
        f"world size       {layout.world_size} = TP {layout.tp} × PP {layout.pp} × CP {layout.cp} "
        f"× DP {layout.dp}"
        + (" (sequence parallel)" if layout.sequence_parallel else "")
        + (f"; experts over EP {layout.ep} × expert TP {layout.etp}" if model.family == "moe_decoder" else ""),
        f"layers           {model.num_layers} over pipeline stages: {list(layout.layers_per_stage)}{chunks}",
        f"vocab            {model.vocab_size:,} padded to {vocab:,} (a multiple of "
        f"make_vocab_size_divisible_by {model.make_vocab_size_divisible_by} × TP {layout.tp})",
        f"parameters       {total:,} ({short(total)})"
        + (f"; {unpadded:,} without vocab padding" if unpadded != total else ""),
    ]
    if model.family == "moe_decoder":
        active = num_parameters(model, vocab, active=True)
        lines.append(
            f"  active         {active:,} ({short(active)}) per token: {model.moe.router_topk} of "
            f"{model.moe.num_experts} experts (FLOPs per step count these)"
        )
    stages = parameters_per_stage(model, layout.layers_per_stage, vocab, layout.vpp)
    split = f"TP {layout.tp}" + (
        f", experts at EP {layout.ep} × expert TP {layout.etp}" if layout.ep * layout.etp > 1 else ""
    )
    lines += [
        f"  stage {stage:<3}      {count:,} ({short(count)}; {short(memory.parameters)} per GPU at {split})"
        for stage, (count, memory) in enumerate(zip(stages, stage_memory(recipe, layout)))
    ]
    lines += [
        f"batch            global {layout.global_batch_size} = micro {layout.micro_batch_size} "
        f"× DP {layout.dp} × {layout.num_microbatches} micro-batches",
        f"tokens per step  {layout.global_batch_size} × seq {model.seq_length} = {tokens_per_step:,}",
        _training_tokens(recipe),
        f"FLOPs per step   {flops_per_step(recipe, layout.global_batch_size):.3e} "
        f"(3 × forward, {attention_counted(model)})",
    ]
    if model.rope_scaling != "none":
        lines.append(_context(recipe, layout))
    if train.rampup_batch_size:
        start, increment, samples = train.rampup_batch_size
        lines.append(
            f"batch ramp-up    from {start} by {increment} over {samples:,} samples (warmup and decay "
            f"end at the steps the recipe names; evaluation uses the full batch)"
        )
    # What a real start refuses before step 1, checked the same way (torch + megatron-core, only here).
    from bigpt.data import plan_tokens
    from bigpt.data.datasets import data_vocabulary
    from bigpt.data.tasks import plan_tasks
    from bigpt.model import check_gpu_transformer_config, check_transformer_engine_installed
    from bigpt.train.initial import check_initial_weights
    from bigpt.train.preflight import check_outputs, checkpoint_dir, resume_changes, resume_point

    check_gpu_transformer_config(recipe, layout)  # a model megatron-core refuses has no plan to show

    def checked(check, *args, **kwargs):
        """The check's result; a refusal raises at once without ``problems``, else joins them."""
        if problems is None:
            return check(*args, **kwargs)
        try:
            return check(*args, **kwargs)
        except BigptError as err:
            problems.extend(err.problems if isinstance(err, BigptErrors) else [str(err)])
            return REFUSED

    checked(check_transformer_engine_installed, recipe)
    checked(check_outputs, recipe, overwrite)
    if recipe.data.tokenizer:
        checked(data_vocabulary, recipe)
    resume_point_and_changes = checked(resume_point, recipe, warn=console.warn)
    if resume_point_and_changes is REFUSED:
        lines.append(f"start            {SEE_PROBLEMS}")
    else:
        resume, changes = resume_point_and_changes
        if resume is None:
            lines.append(f"start            fresh at step 0; checkpoints go to {checkpoint_dir(recipe)}")
            initial = checked(check_initial_weights, recipe)
            lines.append(
                f"initial weights  {SEE_PROBLEMS if initial is REFUSED else initial or 'random (model.init_std)'}"
            )
        else:
            changed = f"; changed by checkpoint.allow_model_changes: {', '.join(changes)}" if changes else ""
            lines.append(f"start            resume from {resume}{changed}")
            if schedule_changes := resume_changes(recipe, resume):
                lines.append(
                    f"                 the recipe's optimizer and schedule replace the checkpoint's: "
                    f"{'; '.join(schedule_changes)}"
                )
    data_plan = checked(plan_tokens, recipe)
    lines += [f"data plan        {SEE_PROBLEMS}"] if data_plan is REFUSED else ["data plan", data_plan]
    if recipe.eval.tasks:
        tasks = checked(plan_tasks, recipe)
        lines += [f"tasks            {SEE_PROBLEMS}"] if tasks is REFUSED else ["tasks", tasks]
    return "\n".join(lines)
