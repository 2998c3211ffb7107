"""How much does bigpt add to a training step, over a bare megatron-core loop on the same model?

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 bench/step_overhead.py
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 bench/step_overhead.py --recipe recipes/tiny.toml \
        --steps 20 --warmup 2 [key=value ...]

In one run, on every rank, this builds

- bigpt's trainer with ``bigpt.train.main.build_trainer`` (model chunks, DDP, distributed
  optimizer, LR scheduler, callbacks) and times ``Trainer.train_step``, and
- a bare loop written here directly against megatron-core: ``GPTModel`` (local layer spec; an MoE
  recipe's block spec of MoE and dense layers) +
  ``DistributedDataParallel`` + ``get_megatron_optimizer`` + ``OptimizerParamScheduler`` +
  ``get_forward_backward_func`` and a minimal forward step. Its ``TransformerConfig`` comes
  from ``bigpt.model.transformer_config``, so both run exactly the same model; the bare model
  starts from a copy of bigpt's initial weights.

Both are fed identical synthetic micro-batches (the recipe's data is replaced by mock data, which
only the trainer's constructor touches). Steps alternate A B B A ..., each starts after a barrier,
and a step's time is that of the slowest rank. Warmup steps are not counted. Rank 0 prints the
median step times, the ratio bigpt/bare (target < 1.05), and whether the two loops' losses
agree step by step (they should be identical: same weights, data and arithmetic).

Callbacks (logging, throughput, checkpoints) run outside ``train_step`` and are not timed.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is deprecated\. Please use")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TARGET = 1.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe",
        default=str(ROOT / "bench" / "tiny_mock.toml"),
        help="TOML recipe (its data is replaced by mock data)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    parser.add_argument(
        "--fail-above",
        type=float,
        default=None,
        help="exit 1 if the median ratio bigpt/bare is above this (default: only report)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. parallel.tensor=1")
    return parser.parse_args(argv)


def load(args):
    from bigpt.recipe import load_recipe

    total = args.warmup + args.steps
    overrides = [
        'data.source="mock"',
        "data.blend=[]",
        'checkpoint.load="none"',
        "eval.interval=0",
        "logging.tensorboard=false",
        f'run_dir="{os.path.join(tempfile.gettempdir(), "bigpt-bench")}"',
        *args.overrides,
    ]
    recipe = load_recipe(args.recipe, overrides)
    if recipe.train.train_iters < total:
        recipe = load_recipe(args.recipe, [*overrides, f"train.train_iters={total}"])
    recipe.data.tokenizer = None  # mock data needs only the vocabulary size
    if recipe.train.rampup_batch_size:
        raise SystemExit("bench: batch-size ramp-up is not supported; use a recipe without it")
    return recipe


# --- the bare megatron-core loop --------------------------------------------------------------------


def build_bare(recipe, layout, bigpt_chunks):
    """GPTModel chunks + DDP + distributed optimizer + scheduler, straight from megatron-core."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    from bigpt.model import DTYPES, transformer_config
    from bigpt.recipe import padded_vocab_size
    from bigpt.runtime.device import on_gpu

    m, p, prec, o, s, t = (
        recipe.model,
        recipe.parallel,
        recipe.precision,
        recipe.optimizer,
        recipe.schedule,
        recipe.train,
    )
    config = transformer_config(recipe, layout, use_te=False, gpu=on_gpu())
    normalization = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[m.normalization]
    chunks = []
    for vp_stage in range(layout.vpp):
        vp = vp_stage if layout.vpp > 1 else None
        if m.family == "moe_decoder":  # MoE or dense layers by the layer pattern, megatron-core's block spec
            spec = get_gpt_decoder_block_spec(
                config, use_transformer_engine=False, normalization=normalization, vp_stage=vp
            )
        else:
            spec = get_gpt_layer_local_spec(normalization=normalization)
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(m, layout.tp),
            max_sequence_length=m.max_position_embeddings or m.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type={"rope": "rope", "learned": "learned_absolute"}[m.position_embedding],
            rotary_base=m.rope_base,
            rope_scaling=m.rope_scaling == "llama3",
            rope_scaling_factor=m.rope_scaling_factor,
            vp_stage=vp,
        )
        if prec.dtype != "fp32":
            chunk = Float16Module(config, chunk)
        chunk.load_state_dict(bigpt_chunks[vp_stage].module.state_dict())  # same starting weights
        chunks.append(chunk)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=prec.grad_reduce_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=t.clip_grad,
            bf16=prec.dtype == "bf16",
            fp16=prec.dtype == "fp16",
            params_dtype=DTYPES[prec.dtype],
            initial_loss_scale=prec.initial_loss_scale,
            min_loss_scale=prec.min_loss_scale,
            loss_scale_window=prec.loss_scale_window,
            hysteresis=prec.hysteresis,
            use_distributed_optimizer=p.distributed_optimizer,
            overlap_param_gather=p.overlap_param_gather,
        ),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if p.overlap_grad_reduce:
        config.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync
        config.grad_sync_func = [c.start_grad_sync for c in model] if len(model) > 1 else model[0].start_grad_sync
    if p.overlap_param_gather:
        config.param_sync_func = [c.start_param_sync for c in model] if len(model) > 1 else model[0].start_param_sync
    gbs, decay = t.global_batch_size, s.decay_iters or t.train_iters
    wsd = s.decay_style == "wsd"
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_iters * gbs,
        lr_decay_steps=decay * gbs,
        lr_decay_style="WSD" if wsd else s.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=(s.wsd_decay_iters or 0) * gbs if wsd else None,
        lr_wsd_decay_style=s.wsd_decay_style if wsd else None,
    )
    return model, optimizer, scheduler


def bare_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].view(-1).float()

    def loss_func(per_token_loss):
        loss = torch.sum(per_token_loss.float().view(-1) * mask)
        tokens = mask.sum()
        return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens])}

    return output, loss_func


def bare_step(model, optimizer, scheduler, data_iterator, recipe, num_microbatches, forward_backward):
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward(
        forward_step_func=bare_forward_step,
        data_iterator=data_iterator,
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=recipe.model.seq_length,
        micro_batch_size=recipe.train.micro_batch_size,
        forward_only=False,
    )
    updated, _, _ = optimizer.step()
    if updated:
        scheduler.step(increment=recipe.train.global_batch_size)
    return losses


# --- shared -------------------------------------------------------------------------------------------


def synthetic_batches(recipe, layout, step, dp_rank, num_microbatches):
    """This rank's micro-batches for global step ``step``: the same for both loops."""
    g = torch.Generator().manual_seed(1_000_003 * step + dp_rank)
    mbs, seq, vocab = recipe.train.micro_batch_size, recipe.model.seq_length, recipe.model.vocab_size
    batches = []
    for _ in range(num_microbatches):
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        batches.append(
            {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "loss_mask": torch.ones(mbs, seq),
                "position_ids": torch.arange(seq).expand(mbs, seq).contiguous(),
            }
        )
    return batches


def iterators(batches, chunks):
    """One iterator per virtual pipeline chunk over the same micro-batches, or a single one."""
    return iter(batches) if chunks == 1 else [iter(batches) for _ in range(chunks)]


def timed(fn):
    dist.barrier()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run(args) -> int:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bigpt.layout import Layout
    from bigpt.runtime.distributed import destroy_distributed, init_distributed
    from bigpt.train.main import build_trainer

    recipe = load(args)
    layout = Layout.from_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed(layout)
    try:
        rank0 = dist.get_rank() == 0
        trainer = build_trainer(recipe, layout)
        model, optimizer, scheduler = build_bare(recipe, layout, trainer.model)
        forward_backward = get_forward_backward_func()
        num_microbatches = get_num_microbatches()
        dp_rank = parallel_state.get_data_parallel_rank()
        chunks = len(trainer.model)

        times = {"bigpt": [], "bare": []}
        losses = {"bigpt": [], "bare": []}
        total = args.warmup + args.steps
        for step in range(total):
            batches = synthetic_batches(recipe, layout, step, dp_rank, num_microbatches)

            def run_bigpt():
                metrics, seconds = timed(lambda: trainer.train_step(iterators(batches, chunks)))
                times["bigpt"].append(seconds)
                losses["bigpt"].append(metrics["loss"])

            def run_bare():
                out, seconds = timed(
                    lambda: bare_step(
                        model,
                        optimizer,
                        scheduler,
                        iterators(batches, chunks),
                        recipe,
                        num_microbatches,
                        forward_backward,
                    )
                )
                times["bare"].append(seconds)
                local = torch.zeros(2, dtype=torch.float64)
                for entry in out:
                    local += entry["lm loss"].to(torch.float64)
                losses["bare"].append(local)

            for fn in (run_bigpt, run_bare) if step % 2 == 0 else (run_bare, run_bigpt):  # A B B A ...
                fn()

        # A step lasts as long as its slowest rank; the bare loop's loss is summed here, untimed
        # (tensor-parallel duplicates count twice in both sum and tokens, which cancels).
        step_times = torch.tensor([times["bigpt"], times["bare"]], dtype=torch.float64)
        dist.all_reduce(step_times, op=dist.ReduceOp.MAX)
        bare_loss = torch.stack(losses["bare"])
        dist.all_reduce(bare_loss)
        bare_loss = (bare_loss[:, 0] / bare_loss[:, 1].clamp(min=1)).tolist()
        if rank0:
            report(args, recipe, layout, num_microbatches, step_times[:, args.warmup :], losses["bigpt"], bare_loss)
        ratio = statistics.median(step_times[0, args.warmup :].tolist()) / statistics.median(
            step_times[1, args.warmup :].tolist()
        )
        return 1 if args.fail_above is not None and ratio > args.fail_above else 0
    finally:
        destroy_distributed()


def report(args, recipe, layout, num_microbatches, step_times, bigpt_loss, bare_loss):
    bigpt, bare = step_times[0].tolist(), step_times[1].tolist()
    ratio = statistics.median(bigpt) / statistics.median(bare)
    paired = statistics.median(a / b for a, b in zip(bigpt, bare))
    max_diff = max(abs(a - b) for a, b in zip(bigpt_loss, bare_loss))
    t = recipe.train
    print(
        f"step overhead: {os.path.relpath(args.recipe)} | {layout.world_size} ranks = TP {layout.tp} x PP {layout.pp} "
        f"(VPP {layout.vpp}) x CP {layout.cp} x DP {layout.dp}"
        + (f", experts over EP {layout.ep} x expert TP {layout.etp}" if layout.ep * layout.etp > 1 else "")
        + f" | gbs {t.global_batch_size} = mbs "
        f"{t.micro_batch_size} x DP {layout.dp} x {num_microbatches} micro-batches | seq "
        f"{recipe.model.seq_length} | {recipe.precision.dtype} | torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(
        f"{args.warmup} warmup + {args.steps} timed steps per loop, interleaved A B B A; "
        "time of a step = its slowest rank"
    )
    print(f"{'':8}{'median s':>10}{'mean s':>10}{'min s':>10}{'max s':>10}")
    for name, values in (("bigpt", bigpt), ("bare", bare)):
        print(
            f"{name:8}{statistics.median(values):>10.4f}{statistics.mean(values):>10.4f}"
            f"{min(values):>10.4f}{max(values):>10.4f}"
        )
    verdict = "OK" if ratio < TARGET else "ABOVE TARGET"
    print(
        f"ratio bigpt/bare: {ratio:.3f} (medians), {paired:.3f} (median of paired steps); target < {TARGET}: {verdict}"
    )
    print(
        f"losses, all {len(bigpt_loss)} steps: bigpt {bigpt_loss[0]:.4f} -> {bigpt_loss[-1]:.4f}, "
        f"bare {bare_loss[0]:.4f} -> {bare_loss[-1]:.4f}, max |difference| {max_diff:.2e}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(run(parse_args()))
