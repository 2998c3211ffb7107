"""Fixes for megatron-core bugs bigpt hits, on the megatron-core line it is tested with
(``megatron_line``).

Applied on every machine (GPU or not) by ``apply()``; each fix is a no-op where the bug cannot
trigger. A fix whose target has moved or changed stops bigpt at start (``patch_target_error``):
it never runs without a fix it needs. Each one has a test that fails without it
(tests/test_megatron_line.py).
"""

import copy
import inspect
import math
import multiprocessing
from multiprocessing.managers import SyncManager

import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.models.T5.t5_model import T5Model
from megatron.core.optimizer import HAVE_EMERGING_OPTIMIZERS
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import MegatronOptimizer, param_group_identifier_keys
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from bigpt.runtime import model_space
from bigpt.runtime.megatron_line import check_megatron_line, patch_target_error
from bigpt.runtime.preemption import start_helper_process


def _keep_torch_adam_step_on_reshardable_load() -> None:
    """megatron-core (0.16.1 and the 0.19 line) with torch's AdamW (no Transformer Engine / Apex) restores each
    parameter's 'step' from the param groups (``load_state_dict``), then loads the rest of the
    state per parameter, which goes wrong three ways: the fully_reshardable load copies *every*
    key of the live state, 'step' included, which the checkpoint lacks (KeyError: 'step'); the
    dp_reshardable load overwrites the restored step with a 0 it never saved, and copies into the
    parameters with gradients enabled (a RuntimeError). And every parameter gets the *same*
    'step' tensor, which AdamW increments once per parameter per step, corrupting the bias
    correction after a resume. Keep the restored step, one copy per parameter; load the rest
    under no_grad."""
    original = getattr(DistributedOptimizer, "_set_main_param_and_optimizer_states", None)
    if original is None:
        raise patch_target_error(
            "torch AdamW's step on a distributed-optimizer load",
            "DistributedOptimizer._set_main_param_and_optimizer_states is gone",
        )

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        step = state.pop("step", None)
        try:
            with torch.no_grad():
                original(self, model_param, {key: value for key, value in tensors.items() if key != "step"})
        finally:
            if step is not None:
                state["step"] = step.clone()

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _name_the_state_of_the_optimizer_it_wraps() -> None:
    """megatron-core 0.19 names the per-parameter state a DistributedOptimizer saves and loads after
    the top-level ``config.optimizer``. With "lion" (an emerging optimizer: Lion on the weight
    matrices, AdamW on embeddings, output layer and norms), the AdamW part's DistributedOptimizer
    carries the top-level config, so it saves exp_avg only, and the resume fails (KeyError:
    'exp_avg_sq'). Name the state after the torch optimizer it wraps: Lion keeps exp_avg only."""
    if not isinstance(getattr(DistributedOptimizer, "optimizer_state_keys", None), property):
        raise patch_target_error(
            "distributed optimizer's state keys", "DistributedOptimizer.optimizer_state_keys is no longer a property"
        )

    def state_keys(self) -> tuple:
        if HAVE_EMERGING_OPTIMIZERS:
            from emerging_optimizers.scalar_optimizers import Lion

            if isinstance(self.optimizer, Lion):
                return ("exp_avg",)
        return ("exp_avg", "exp_avg_sq")

    DistributedOptimizer.optimizer_state_keys = property(state_keys)


def _model_space_optimizer_state_without_flattened_ranges() -> None:
    """megatron-core 0.19 refuses the ``flattened_range`` its own ``fully_sharded_model_space``
    optimizer format (its default) describes each rank's slices with ("ShardedTensor.flattened_range
    is not supported"). Describe them as blocks of the parameters instead (``model_space``)."""
    for name in ("sharded_param_state_fs_model_space", "load_parameter_state_from_fs_model_space"):
        if not callable(getattr(DistributedOptimizer, name, None)):
            raise patch_target_error("model-space optimizer checkpoint format", f"DistributedOptimizer.{name} is gone")
    DistributedOptimizer.sharded_param_state_fs_model_space = model_space.sharded_param_state
    DistributedOptimizer.load_parameter_state_from_fs_model_space = model_space.load_param_state


def _start_checkpoint_results_queue() -> None:
    """megatron-core's checkpoint writer collects write results through a Manager process
    it spawns at the first save. Two problems with it:

    - It sits in the rank's process group, and torchrun forwards SIGTERM/SIGUSR1 to the whole
      group: the preemption signal that should make bigpt save kills it, and the save then fails
      with BrokenPipeError. It is started ignoring those signals, and ends with its rank.
    - Spawned, it is a fresh interpreter that imports torch to unpickle the first results it is
      sent: 4-5 s added to the first save of every process. It is forked instead, and now, while
      the process is small (``apply`` runs before CUDA and the communicators start): a fork
      made later would keep a copy of every page the training process changes afterwards."""
    if getattr(filesystem_async, "_results_queue", "missing") is not None:
        raise patch_target_error(
            "checkpoint writer's results queue",
            "filesystem_async._results_queue, the queue it creates at the first save, is gone",
        )
    manager = SyncManager(ctx=multiprocessing.get_context("fork"))
    manager.start(initializer=start_helper_process)
    filesystem_async._results_queue = manager.Queue()  # what get_write_results_queue() returns from now on


def _torch_norms_accept_sequence_parallelism() -> None:
    """megatron-core's torch norms (the local spec's, used without Transformer Engine or Apex, so on
    every CPU) refuse sequence parallelism, which leaves SP, and MoE with TP > 1 (megatron-core
    requires SP there), unable to run. A norm computes the same on a slice of the sequence; what SP
    needs is the replicated weights' gradients summed over the tensor-parallel group, which
    ``finalize_model_grads`` does for parameters marked ``sequence_parallel``, as megatron-core's
    Apex and Transformer Engine norms mark theirs. Build the torch norm as without SP, then mark
    its parameters."""
    if not isinstance(WrappedTorchNorm.__dict__.get("__new__"), staticmethod):
        raise patch_target_error(
            "torch norms under sequence parallelism", "WrappedTorchNorm no longer builds its norm in __new__"
        )
    original = WrappedTorchNorm.__new__
    if hasattr(original, "__wrapped__"):  # applied already (a process that ran a model before)
        return

    def new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, *args, **kwargs)
        without_sp = copy.copy(config)  # a shallow copy: no second __post_init__
        without_sp.sequence_parallel = False
        norm = original(cls, without_sp, hidden_size, *args, **kwargs)
        for parameter in norm.parameters():
            parameter.sequence_parallel = True
        return norm

    new.__wrapped__ = original  # type: ignore[attr-defined]
    WrappedTorchNorm.__new__ = staticmethod(new)


def _t5_output_layer_saved_once() -> None:
    """megatron-core's T5Model holds its untied output layer twice (``output_layer`` is
    ``lm_head.output_layer``), so its sharded state dict saves the one tensor under two keys, and
    only ``output_layer.weight`` may change its vocabulary padding on load: an untied T5 then cannot
    load at a tensor-parallel size that pads the vocabulary differently, and a checkpoint written
    without the alias (a Hugging Face import) not at all. Save it once, as ``output_layer.weight``."""
    original = getattr(T5Model, "sharded_state_dict", None)
    if original is None or "sharded_state_dict" not in T5Model.__dict__:
        raise patch_target_error("T5's output layer saved once", "T5Model.sharded_state_dict is gone")
    if hasattr(original, "__wrapped__"):  # applied already
        return

    def sharded_state_dict(self, prefix="", *args, **kwargs):
        state = original(self, prefix, *args, **kwargs)
        return {key: value for key, value in state.items() if not key.startswith(f"{prefix}lm_head.output_layer.")}

    sharded_state_dict.__wrapped__ = original  # type: ignore[attr-defined]
    T5Model.sharded_state_dict = sharded_state_dict


def _local_attention_takes_mla_head_widths() -> None:
    """megatron-core's multi-latent attention builds its core attention with ``k_channels`` (a query
    or key head's width, qk_head_dim + qk_pos_emb_head_dim) and ``v_channels`` (a value head's),
    which only Transformer Engine's attention accepts: the local ``DotProductAttention`` (every run
    without Transformer Engine, so every CPU) fails with TypeError. It computes with the head widths
    of the tensors it is given, but for its output's width (model.kv_channels × heads): take
    v_channels for that, and k_channels for the default softmax scale."""
    original = DotProductAttention.__init__
    target = getattr(original, "__wrapped__", original)  # megatron-core's, where applied already
    parameters = inspect.signature(target).parameters
    if "k_channels" in parameters or "softmax_scale" not in parameters:
        raise patch_target_error(
            "the local attention under multi-latent attention",
            "DotProductAttention.__init__ takes k_channels now, or no softmax_scale",
        )
    if target is not original:
        return

    def init(self, *args, k_channels=None, v_channels=None, softmax_scale=None, **kwargs):
        if softmax_scale is None and k_channels is not None:
            softmax_scale = 1.0 / math.sqrt(k_channels)
        original(self, *args, softmax_scale=softmax_scale, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    init.__wrapped__ = original  # type: ignore[attr-defined]
    DotProductAttention.__init__ = init


def _mla_without_q_lora_projects_queries_plainly() -> None:
    """megatron-core's multi-latent attention without q-LoRA (q_lora_rank None: the queries projected
    from the normalised hidden state, as DeepSeek-V2-Lite's q_proj) demands a fused norm+linear for
    that projection when its latents are normalised (qk_layernorm): Transformer Engine's, with a
    second norm of the hidden state that DeepSeek's models do not have (without Transformer Engine, a
    stand-in that cannot build). The local spec (every CPU) fails before that: it gives MLA a query
    norm, which megatron-core refuses as unused (ValueError). Resolve the key/value side as
    megatron-core does, and the query projection as the spec's own plain linear, with no query norm."""
    original = QKNormConfigResolver.resolve
    if not callable(getattr(QKNormConfigResolver, "_is_fused_norm_linear", None)):
        raise patch_target_error(
            "multi-latent attention without q-LoRA", "QKNormConfigResolver._is_fused_norm_linear is gone"
        )
    if hasattr(original, "__wrapped__"):  # applied already
        return

    def resolve(self):
        plain = self.submodules.linear_q_proj
        if self.has_q_lora or self.is_dsa or not self.config.qk_layernorm:
            return original(self)
        if plain is None or self._is_fused_norm_linear(plain):  # a spec that asks for the norm megatron-core adds
            return original(self)
        self.has_q_lora = True  # so megatron-core resolves the key/value side alone, as with q-LoRA
        try:
            resolved = original(self)
        finally:
            self.has_q_lora = False
        return resolved | dict(linear_q_proj=plain, linear_q_up_proj=IdentityOp, q_layernorm=IdentityOp)

    resolve.__wrapped__ = original  # type: ignore[attr-defined]
    QKNormConfigResolver.resolve = resolve


LR_BOUNDS = ("max_lr", "min_lr")


def _saved_groups_take_the_recipe_lr_bounds(current_groups: list[dict], saved_groups: list[dict]) -> None:
    """Give each saved parameter group the lr bounds of the current group it matches on every
    other identifier key (in place). Where two current groups differ in their lr bounds alone,
    the saved groups are left as they are (megatron-core's exact match decides)."""
    others = [key for key in param_group_identifier_keys if key not in LR_BOUNDS]

    def identity(group: dict) -> tuple:  # as megatron-core's: missing and None alike, NeMo's pre_ aliases
        return tuple(group.get(key, group.get(f"pre_{key}")) for key in others)

    bounds: dict[tuple, set] = {}
    for group in current_groups:
        bounds.setdefault(identity(group), set()).add(tuple(group.get(key) for key in LR_BOUNDS))
    for group in saved_groups:
        candidates = bounds.get(identity(group), set())
        if len(candidates) == 1:
            group.update(zip(LR_BOUNDS, next(iter(candidates)), strict=True))


def _resume_with_new_lr_bounds() -> None:
    """megatron-core 0.19 pairs the parameter groups of a loaded optimizer state with the current
    ones by a key that includes each group's max_lr and min_lr (``param_group_identifier_keys``):
    a resume whose optimizer.lr or optimizer.min_lr differs from the checkpoint's fails (the
    distributed optimizer: KeyError; the others: ValueError), and where it matches, the loaded
    groups would bring the checkpoint's bounds back, which the scheduler reads. A resume takes the
    recipe's optimizer and schedule (re-warming a resumed run is how continual pretraining starts),
    as Megatron-LM's --override-opt-param-scheduler means to: pair the groups on every other key,
    and keep the current (the recipe's) bounds."""
    distributed_load = getattr(DistributedOptimizer, "load_state_dict", None)
    pair_groups = getattr(MegatronOptimizer, "_filter_and_reorder_param_groups", None)
    if distributed_load is None or pair_groups is None or not set(LR_BOUNDS) <= set(param_group_identifier_keys):
        raise patch_target_error(
            "resuming with new lr bounds",
            "DistributedOptimizer.load_state_dict, MegatronOptimizer._filter_and_reorder_param_groups or the "
            "max_lr/min_lr parameter-group identifier keys are gone",
        )

    def load_state_dict(self, state_dict):
        saved_groups = state_dict.get("optimizer", {}).get("param_groups")
        if saved_groups is not None:
            _saved_groups_take_the_recipe_lr_bounds(self.optimizer.param_groups, saved_groups)
        return distributed_load(self, state_dict)

    def filter_and_reorder_param_groups(current_groups, state_dict_groups):
        _saved_groups_take_the_recipe_lr_bounds(current_groups, state_dict_groups)
        return pair_groups(current_groups, state_dict_groups)

    DistributedOptimizer.load_state_dict = load_state_dict
    MegatronOptimizer._filter_and_reorder_param_groups = staticmethod(filter_and_reorder_param_groups)


class _BiasLookup(torch.autograd.Function):
    """Rows of a relative-bias table: ``F.embedding``'s function, with the bucket indices kept on
    the context rather than saved, so that its backward may run again (see below)."""

    @staticmethod
    def forward(ctx, weight, indices):
        ctx.indices, ctx.rows = indices, weight.shape[0]
        return torch.nn.functional.embedding(indices, weight)

    @staticmethod
    def backward(ctx, grad):
        flat = grad.reshape(-1, grad.shape[-1])
        return flat.new_zeros(ctx.rows, flat.shape[1]).index_add_(0, ctx.indices.reshape(-1), flat), None


class _RecomputableBiasTable(torch.nn.Embedding):
    def forward(self, indices):
        return _BiasLookup.apply(self.weight, indices)


def _relative_bias_survives_recomputation() -> None:
    """megatron-core 0.19 recomputes layers (recompute granularity full) and attention cores
    (selective core_attn) with the attention bias taken from *outside* its checkpoint: the backward
    of each recomputed piece runs back through the bias's own graph, so T5's relative position bias
    (one per stack, read by every layer) fails the second time ("backward through the graph a
    second time"): the table lookup's saved indices are freed by the first. Look the table up by a
    function that keeps them, so its backward runs once per piece, each adding its share."""
    from megatron.core.models.common.embeddings.relative_pos_embedding import RelativePositionEmbedding

    if "_compute_bias" not in vars(RelativePositionEmbedding):  # what looks the table up, through the module
        raise patch_target_error(
            "T5's relative bias under recomputation", "RelativePositionEmbedding._compute_bias is gone"
        )
    original = RelativePositionEmbedding.__init__
    if getattr(original, "__wrapped__", None) is not None:  # applied already
        return

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self.relative_attention_bias) is not torch.nn.Embedding:
            raise patch_target_error(
                "T5's relative bias under recomputation", "RelativePositionEmbedding's table is no nn.Embedding"
            )
        self.relative_attention_bias.__class__ = _RecomputableBiasTable

    init.__wrapped__ = original  # type: ignore[attr-defined]
    RelativePositionEmbedding.__init__ = init


_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    check_megatron_line()
    _relative_bias_survives_recomputation()
    _keep_torch_adam_step_on_reshardable_load()
    _name_the_state_of_the_optimizer_it_wraps()
    _model_space_optimizer_state_without_flattened_ranges()
    _resume_with_new_lr_bounds()
    _start_checkpoint_results_queue()
    _torch_norms_accept_sequence_parallelism()
    _t5_output_layer_saved_once()
    _local_attention_takes_mla_head_widths()
    _mla_without_q_lora_projects_queries_plainly()
    _applied = True
