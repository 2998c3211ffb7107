"""The training path as a GPU run takes it, checked in one CPU process with the objects bigpt
builds: inputs reach the model on its device, pipeline stages start from different weights,
interleaved pipelines exchange activations as Megatron-LM does, context parallelism needs
Transformer Engine, and a checkpoint of an optimizer that never stepped resumes with an optimizer
that creates its state lazily (Transformer Engine's fused Adam). tests/test_training_path_ranks.py
runs what needs several ranks (context-parallel split, overlapped parameter gathering)."""

import contextlib
import itertools
import os

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType

from bigpt.errors import BigptError
from bigpt.layout import Layout
from bigpt.recipe import load_recipe
from multirank import MOCK_RECIPE


@contextlib.contextmanager
def world_of_one():
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from bigpt.runtime import megatron_fixes
    from bigpt.runtime.distributed import model_parallel_of_one

    megatron_fixes.apply()  # as init_distributed does
    with model_parallel_of_one():
        try:
            yield
        finally:
            destroy_num_microbatches_calculator()


def cpu_batch(seq: int, batch: int = 2) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 512, (batch, seq))
    return {
        "tokens": tokens,
        "labels": tokens.roll(-1, dims=1),
        "loss_mask": torch.ones(batch, seq),
        "position_ids": torch.arange(seq).expand(batch, seq),
    }


# ------------------------------------------------------------ inputs on the model's device
class StandInGPT(torch.nn.Module):
    """GPTModel's forward signature around one weight per vocabulary entry: with labels, the "loss"
    of a token is its weight (so the gradient of a loss sum counts the tokens of each id); without,
    the logits are its weight times every entry's. It records the devices of the tensors it is
    handed (its lookup needs them on its own device, as CUDA's does) and the positions."""

    def __init__(self, config, vocab_size: int, device: str = "cpu"):
        super().__init__()
        self.config, self.model_type = config, ModelType.encoder_or_decoder  # what megatron-core's schedule reads
        self.weight = torch.nn.Parameter(torch.arange(vocab_size, dtype=torch.float32, device=device) / vocab_size)
        self.devices: set[str] = set()
        self.positions: list[torch.Tensor] = []

    def set_input_tensor(self, tensor):
        pass

    def forward(self, tokens, position_ids, attention_mask, labels=None):
        self.devices.update(t.device.type for t in (tokens, position_ids, labels) if t is not None)
        self.positions.append(position_ids)
        token_weights = torch.nn.functional.embedding(tokens, self.weight.unsqueeze(-1))
        return token_weights.squeeze(-1) if labels is not None else token_weights * self.weight


def test_every_forward_pass_hands_the_model_its_inputs_on_its_device(monkeypatch):
    """Batches are built on the CPU; a model on another device gets every input on its device:
    training and evaluation (``forward_step``) and logits (``compute_logits``, tools/logits.py)."""
    import bigpt.logits
    from bigpt.families.decoder import forward_step
    from bigpt.model import transformer_config

    recipe = load_recipe(MOCK_RECIPE)
    layout = Layout.from_recipe(recipe, 1)
    model = StandInGPT(
        transformer_config(recipe, layout, use_te=False, gpu=False), recipe.model.vocab_size, device="meta"
    )
    with world_of_one():
        output, loss = forward_step(iter([cpu_batch(recipe.model.seq_length)]), model)
        assert model.devices == {"meta"} and all(value.device.type == "meta" for value in loss(output)[:2])

        model.devices.clear()
        monkeypatch.setattr(bigpt.logits, "build_model_chunks", lambda *args: ([model], None))
        logits = bigpt.logits.compute_logits(recipe, layout, torch.randint(0, 512, (2, 16)))
        assert model.devices == {"meta"} and logits.shape == (2, 16, recipe.model.vocab_size)


# ------------------------------------------------------------ pipeline stages start different
def stage_weights(recipe, layout) -> dict[tuple[int, int], list[torch.Tensor]]:
    """(pipeline rank, virtual chunk) -> the weights of the chunk's transformer layers, each rank's
    chunks built as that rank builds them (megatron-core's pipeline rank set in this process)."""
    from bigpt.model import build_model_chunks
    from bigpt.runtime.seeding import seed_everything

    weights = {}
    with world_of_one():
        parallel_state.set_pipeline_model_parallel_world_size(layout.pp)
        try:
            for rank in range(layout.pp):
                parallel_state.set_pipeline_model_parallel_rank(rank)
                seed_everything(recipe.train.seed)
                chunks, _ = build_model_chunks(recipe, layout)
                for vp, chunk in enumerate(chunks):
                    weights[rank, vp] = [
                        param.detach().clone() for name, param in chunk.named_parameters() if "decoder.layers" in name
                    ]
        finally:
            parallel_state.set_pipeline_model_parallel_world_size(None)
            parallel_state.set_pipeline_model_parallel_rank(None)
    return weights


@pytest.mark.parametrize("virtual", [1, 2])
def test_no_two_pipeline_stages_or_virtual_chunks_start_equal(virtual):
    """Without a stage term in the seed, every stage but the first (whose embedding draws first)
    initialised its layers as copies of the others' (a 70B run at PP4: 60 of its 80 layers).
    megatron-core draws each weight from one stream in the order it builds them, with no layer
    number in it, so PP1 and PP4 cannot build the same global weights: the stages must differ."""
    recipe = load_recipe(
        MOCK_RECIPE, ["model.num_layers=8", "parallel.pipeline=4", f"parallel.virtual_pipeline={virtual}"]
    )
    weights = stage_weights(recipe, Layout.from_recipe(recipe, 4))
    assert len(weights) == 4 * virtual and all(len(tensors) == len(weights[0, 0]) for tensors in weights.values())
    for a, b in itertools.combinations(weights, 2):
        same = [torch.equal(x, y) for x, y in zip(weights[a], weights[b]) if x.std() > 0]  # norms start at 1
        assert not any(same), f"stage/chunk {a} and {b} start with {sum(same)} equal weight tensors"


# ------------------------------------------------------------ interleaved p2p as Megatron-LM runs it
@pytest.mark.parametrize("pipeline, virtual", [(2, 1), (2, 2), (4, 2)])
def test_interleaved_pipelines_never_batch_their_p2p(pipeline, virtual):
    """With interleaving at PP=2 both neighbours are one rank, and batched sends and receives of the
    same shape can pair up crosswise: Megatron-LM (arguments.py) refuses it unless p2p overlap is
    on, and runs interleaved schedules overlapped and unbatched (argument_utils.py). On a GPU bigpt
    configures the same; megatron-core's schedule refuses both at once."""
    import bigpt.model

    recipe = load_recipe(
        MOCK_RECIPE,
        [
            "model.num_layers=8",
            f"parallel.pipeline={pipeline}",
            f"parallel.virtual_pipeline={virtual}",
            "train.global_batch_size=16",
        ],
    )
    config = bigpt.model.transformer_config(recipe, Layout.from_recipe(recipe, pipeline), use_te=False, gpu=True)
    assert not (config.batch_p2p_comm and config.overlap_p2p_comm)
    assert config.overlap_p2p_comm == (virtual > 1) and config.batch_p2p_comm == (virtual == 1)


# ------------------------------------------------------------ context parallelism needs Transformer Engine
def test_context_parallelism_without_transformer_engine_is_refused_on_paper_and_at_init():
    """megatron-core's own attention asserts context_parallel_size == 1: a CP run without Transformer
    Engine (on a CPU, or transformer_engine = "off") is refused with the reason, not at step 1."""
    from bigpt.model import check_transformer_engine_installed, use_transformer_engine

    recipe = load_recipe(MOCK_RECIPE, ["parallel.context=2"])
    with pytest.raises(
        BigptError, match=r"parallel.context = 2 needs Transformer Engine on a CUDA GPU .* not installed"
    ):
        check_transformer_engine_installed(recipe)
    with pytest.raises(
        BigptError, match=r"parallel.context = 2 needs Transformer Engine .* this machine does not have"
    ):
        use_transformer_engine(recipe)
    with pytest.raises(BigptError, match=r"parallel.context=2 needs Transformer Engine .*transformer_engine='off'"):
        load_recipe(MOCK_RECIPE, ["parallel.context=2", "precision.transformer_engine=off"])


# ------------------------------------------------------------ a save before any step, lazily created state
class LazyFusedAdam(torch.optim.Optimizer):
    """Transformer Engine's FusedAdam as megatron-core uses it, on the CPU: its moments are created
    at its first step, its step count lives in the parameter groups, not in the state."""

    def __init__(self, params, lr, weight_decay, betas, eps, capturable=False, adam_w_mode=True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-group["lr"])


def test_a_checkpoint_of_an_optimizer_that_never_stepped_resumes_with_a_lazy_fused_adam(monkeypatch, tmp_path):
    """Every step skipped (or a preemption before step 1), then a save: Transformer Engine's fused
    Adam has no moments yet. The save must write them (zero, as its first step starts from), so
    that the resume, which expects them, loads."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.optimizer import distrib_optimizer

    from bigpt.checkpoint import CheckpointWriter, load_checkpoint
    from bigpt.train.checkpointing import checkpointed
    from bigpt.train.main import build_model_and_optimizer
    from bigpt.train.trainer import Trainer

    monkeypatch.setattr(mcore_optimizer, "Adam", LazyFusedAdam)  # as megatron-core imports TE's
    monkeypatch.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", True)
    recipe = load_recipe(MOCK_RECIPE, [f"run_dir={tmp_path}", "precision.dtype=bf16"])
    layout = Layout.from_recipe(recipe, 1)

    def training():
        destroy_num_microbatches_calculator()  # each build sets it
        model, optimizer, scheduler = build_model_and_optimizer(recipe, layout)
        assert isinstance(optimizer.optimizer, LazyFusedAdam) and not optimizer.optimizer.state
        return checkpointed(Trainer(recipe, layout, model, optimizer, scheduler, batches=None, callbacks=[]))

    with world_of_one():
        saved = training()
        CheckpointWriter(tmp_path, asynchronous=False).save(saved)
        resumed = training()
        load_checkpoint(resumed, tmp_path / "iter_0000000")
        state = resumed.optimizer.optimizer.state
        assert state and all(
            set(moments) == {"exp_avg", "exp_avg_sq"} and not any(m.any() for m in moments.values())
            for moments in state.values()
        )
        for ours, theirs in zip(resumed.model[0].parameters(), saved.model[0].parameters()):
            assert torch.equal(ours, theirs)


def test_a_world_of_one_leaves_the_environment_as_it_found_it(monkeypatch):
    """A plain `python` run sets torchrun's RANK, WORLD_SIZE and LOCAL_RANK for itself; a process
    that goes on after the run (tools/ladder.py's runs) must not look like a rank of a job after."""
    from bigpt.runtime.distributed import destroy_distributed, init_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    init_distributed(Layout.from_recipe(load_recipe(MOCK_RECIPE)))
    assert os.environ["RANK"] == "0"
    destroy_distributed()
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(os.environ)
