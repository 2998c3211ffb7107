"""The parts of the training path that need two ranks, in one 2-process gloo job (spawned once for
the module) that plays two scenarios; each test checks one from what the ranks wrote.

- Context parallelism at CP=2: megatron-core's schedule with bigpt's ``forward_step`` and model
  config, around a stand-in model (megatron-core's own attention refuses CP without Transformer
  Engine): each rank gets its zigzag half of every sequence, and the reported loss and the
  gradients are those of the whole sequence.
- A DP=2 run with overlapped parameter gathering (launchers' ``train``): its checkpoint holds the
  weights of the step it is named after, i.e. its own fp32 master weights.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp

from multirank import MOCK_RECIPE
from test_data_distributed import free_port
from test_training_path import StandInGPT

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
SEQ = 64
VOCAB = 512


def global_batch() -> dict[str, torch.Tensor]:
    """The same micro-batch on every rank: one sequence, a quarter of its tokens masked out."""
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=generator)
    return {
        "tokens": tokens,
        "labels": tokens.roll(-1, dims=1),
        "loss_mask": (torch.rand(1, SEQ, generator=generator) > 0.25).float(),
        "position_ids": torch.arange(SEQ).unsqueeze(0),
    }


def scenario_context_parallel(rank: int, directory) -> dict:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bigpt.families.decoder import forward_step
    from bigpt.layout import Layout
    from bigpt.model import transformer_config
    from bigpt.recipe import load_recipe
    from bigpt.runtime.distributed import destroy_distributed, init_distributed
    from bigpt.train.optim import wrap_ddp
    from bigpt.train.step import reduce_losses

    # Without the distributed optimizer every rank's gradient buffer holds all of the gradients.
    recipe = load_recipe(
        MOCK_RECIPE, ["parallel.context=2", "train.micro_batch_size=1", "parallel.distributed_optimizer=false"]
    )
    layout = Layout.from_recipe(recipe, WORLD_SIZE)
    init_distributed(layout)
    try:
        config = transformer_config(recipe, layout, use_te=False, gpu=False)
        config.finalize_model_grads_func = finalize_model_grads  # as bigpt wires it (wire_model_config)
        stand_in = StandInGPT(config, VOCAB)
        (model,) = wrap_ddp(recipe, config, [stand_in])
        model.zero_grad_buffer()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([global_batch()]),
            model=model,
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=1,
            forward_only=False,
        )
        return {
            "positions": stand_in.positions[0].flatten().tolist(),
            "reported": reduce_losses(losses).tolist(),
            "grad": stand_in.weight.main_grad.clone(),
        }
    finally:
        destroy_distributed()


def scenario_overlapped_save(rank: int, directory) -> None:
    from bigpt.layout import Layout
    from bigpt.recipe import load_recipe
    from bigpt.train.main import train

    recipe = load_recipe(
        MOCK_RECIPE,
        [
            f"run_dir={directory / 'overlapped'}",
            "parallel.overlap_grad_reduce=true",
            "parallel.overlap_param_gather=true",
            "train.train_iters=2",
            "schedule.warmup_iters=0",
            "checkpoint.save_interval=0",  # the save at the end, right after step 2's update
        ],
    )
    train(recipe, Layout.from_recipe(recipe, WORLD_SIZE))


def rank_main(rank, directory, ports):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1"
    )
    torch.set_num_threads(1)
    results = {}
    for scenario, port in zip((scenario_context_parallel, scenario_overlapped_save), ports):
        os.environ["MASTER_PORT"] = str(port)
        results[scenario.__name__] = scenario(rank, directory)
    torch.save(results, directory / f"results{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("training_path")
    ports = (free_port(), free_port())
    mp.start_processes(rank_main, args=(directory, ports), nprocs=WORLD_SIZE, start_method="spawn")
    return directory, [torch.load(directory / f"results{rank}.pt") for rank in range(WORLD_SIZE)]


def test_context_parallel_ranks_split_each_sequence_and_train_on_all_of_it(results):
    """Each CP rank gets chunks r and 2×cp-1-r of the 2×cp chunks of every sequence (megatron-core's
    zigzag), split within its context-parallel group; the loss bigpt reports and the gradients
    megatron-core finalises (divided by the global token count) are the whole sequence's."""
    _, ranks = results
    quarter = SEQ // 4
    expected_positions = [
        [*range(0, quarter), *range(3 * quarter, SEQ)],
        [*range(quarter, 3 * quarter)],
    ]
    batch = global_batch()
    mask = batch["loss_mask"].flatten()
    tokens = mask.sum()
    counts = torch.zeros(VOCAB).index_add_(0, batch["tokens"].flatten(), mask)
    loss_sum = (counts * torch.arange(VOCAB) / VOCAB).sum()
    for rank, result in enumerate(r["scenario_context_parallel"] for r in ranks):
        assert result["positions"] == expected_positions[rank]
        assert result["reported"] == pytest.approx([loss_sum.item(), tokens.item()], rel=1e-6)
        torch.testing.assert_close(result["grad"], counts / tokens)


def test_a_save_with_overlapped_parameter_gathering_writes_the_weights_of_its_step(results):
    """megatron-core gathers each rank's non-local weights at the next forward: a save right after
    an update (here the final one; a preemption's, any save not just after an evaluation) wrote
    the previous step's for them (35.6% of the elements at DP=2), so its weights differed from its
    own fp32 master weights. Megatron-LM forces the gather before every save; so does bigpt."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory, _ = results
    checkpoint = directory / "overlapped" / "checkpoints" / "iter_0000002"
    dcp_to_torch_save(checkpoint, directory / "saved.pt")
    saved = torch.load(directory / "saved.pt", weights_only=False)
    masters = {
        key.removeprefix("optimizer.state.fp32_param."): value for key, value in saved.items() if "fp32_param" in key
    }
    assert masters and "decoder.layers.self_attention.linear_qkv.weight" in masters
    stale = {name: (saved[name] != master).float().mean().item() for name, master in masters.items()}
    assert not any(stale.values()), f"fraction of each saved weight that is not its master's: {stale}"
