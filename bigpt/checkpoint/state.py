"""What a checkpoint holds and how it is written and read with megatron-core dist_checkpointing.

Model tensors are keyed by their global names (layer numbers included), and the distributed
optimizer's state in model space (``checkpoint.optimizer_format``, by default each rank's own
slices with no exchange: ``bigpt.runtime.model_space``), so a checkpoint loads at any TP/PP/VPP/DP.
"""

import copy
import shlex
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.transformer.module import Float16Module, MegatronModule
from torch.distributed.checkpoint.api import CheckpointException

import bigpt
from bigpt.checkpoint import store
from bigpt.checkpoint.async_save import AsyncSaver
from bigpt.errors import BigptError
from bigpt.layout import Layout
from bigpt.paths import almost_full, names_a_full_disk
from bigpt.recipe import Recipe, recipe_to_toml
from bigpt.runtime import console
from bigpt.runtime.seeding import rng_state, set_rng_state


@dataclass
class Checkpointed:
    """What a checkpoint saves and a load restores (``counters`` in place: its ``iteration`` and
    ``consumed_samples``), handed over by the training loop that owns them."""

    model: list
    optimizer: Any
    scheduler: Any
    counters: Any
    parts: dict[str, Any]
    """Named stateful parts (the bad-step guard, callbacks that keep state): each one's
    ``state_dict()`` is saved under its name, and given back to its ``load_state_dict`` (an empty
    dict from a checkpoint saved before the part existed). A new part changes nothing here."""
    layout: Layout
    recipe: Recipe


COUNTERS = ("iteration", "consumed_samples", "consumed_tokens")
"""train_state's own entries; every other entry is a named part's state."""


class _KeptPart:
    """A part of a loaded checkpoint that nothing in this process claims (a tool that reshards a
    run's checkpoint builds no callbacks): a later save of the same ``Checkpointed`` writes it
    back as it was."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _layout_tag(training: Checkpointed) -> dict:
    layout = training.layout
    tag = {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "dp": layout.dp}
    if (layout.ep, layout.etp) != (1, 1):  # a dense model's tag stays as checkpoints before MoE wrote it
        tag.update(ep=layout.ep, etp=layout.etp)
    return tag


DP_ONLY_FORMAT = "dp_reshardable"
"""checkpoint.optimizer_format that reshards over data parallelism only."""
MODEL_PARALLEL = ("tp", "pp", "vpp", "ep", "etp")
"""Degrees whose change the dp_reshardable optimizer format cannot follow."""
EXPERT_PARALLEL = ("ep", "etp")


def layout_overrides(tag: dict) -> str:
    """The parallel.* overrides that give a layout tag's model-parallel degrees (tp, pp, vpp, cp, and
    ep and expert tp where the tag has them)."""
    names = (
        ("tp", "tensor"),
        ("pp", "pipeline"),
        ("vpp", "virtual_pipeline"),
        ("cp", "context"),
        ("ep", "expert"),
        ("etp", "expert_tensor"),
    )
    return " ".join(f"parallel.{name}={tag[key]}" for key, name in names if key in tag)


def _expert_layout_changes(marker: dict, training: Checkpointed) -> list[str]:
    """How the expert layout (EP, expert TP) differs from the checkpoint's, e.g. ["ep 2 -> 1"]."""
    saved, ours = marker.get("layout", {}), _layout_tag(training)
    return [
        f"{key} {saved.get(key, 1)} -> {ours.get(key, 1)}"
        for key in EXPERT_PARALLEL
        if saved.get(key, 1) != ours.get(key, 1)
    ]


def _group_identity(group: dict) -> tuple:
    """What megatron-core pairs a saved parameter group with a live one by."""
    return tuple(group.get(key, group.get(f"pre_{key}")) for key in param_group_identifier_keys)


def _as_live_optimizers(loaded: dict, optimizer) -> dict:
    """The loaded optimizer state in the structure of this run's optimizers. megatron-core chains a
    second distributed optimizer for the expert weights when EP × expert TP > 1, so a checkpoint
    saved at another expert layout holds one optimizer's non-tensor state (parameter groups, with
    their step and lr bounds; the state format) where this run has two, or two where it has one.
    Its tensors carry no optimizer prefix (``chained_optim_avoid_prefix``) and were loaded into
    this run's structure. Give every live optimizer all the saved parameter groups: each takes
    those that match its own (megatron-core pairs groups by their identifier keys, among them
    is_expert_parallel)."""
    live = len(getattr(optimizer, "chained_optimizers", [optimizer]))
    numbered = sorted(key for key, value in loaded.items() if isinstance(key, int) and "optimizer" in value)
    saved = [loaded[key] for key in numbered] if numbered else [loaded]
    if len(saved) == live:
        return loaded
    groups = [group for part in saved for group in part["optimizer"]["param_groups"]]
    # At EP × expert TP = 1 the experts' weights are in the dense groups (is_expert_parallel false),
    # so a run that splits them takes their step and hyperparameters from those groups.
    identities = {_group_identity(group) for group in groups}
    for group in list(groups):
        twin = {**group, "is_expert_parallel": not group.get("is_expert_parallel", False)}
        if _group_identity(twin) not in identities:
            groups.append(twin)
    common = {key: value for key, value in saved[0].items() if key not in ("optimizer", "param_state")}
    if live == 1:
        tensors = {key: value for key, value in loaded.items() if not isinstance(key, int) and key != "optimizer"}
        return {**tensors, **common, "optimizer": {"param_groups": groups}}
    return {
        index: {**loaded[index], **common, "optimizer": {"param_groups": copy.deepcopy(groups)}}
        for index in range(live)
    }


def _check_optimizer_format(path: Path, marker: dict, training: Checkpointed) -> None:
    saved, ours = marker.get("layout", {}), _layout_tag(training)
    changed = [
        f"{key} {saved.get(key, 1)} -> {ours.get(key, 1)}"
        for key in MODEL_PARALLEL
        if saved.get(key, 1) != ours.get(key, 1)
    ]
    if marker.get("optimizer_format") == DP_ONLY_FORMAT and changed:
        out = path.parent.with_name(f"{path.parent.name}_tp{ours['tp']}_pp{ours['pp']}_vpp{ours['vpp']}")
        raise BigptError(
            f'checkpoint {path} was saved with checkpoint.optimizer_format = "{DP_ONLY_FORMAT}", whose '
            f"optimizer state loads only at the TP/PP/VPP/EP it was saved with ({', '.join(changed)}); resume "
            "at that layout (any data-parallel size), or reshard it for this one, offline on CPUs: python "
            f"tools/reshard.py {shlex.quote(str(path))} {shlex.quote(str(out))} {layout_overrides(ours)}, then "
            f'resume with checkpoint.load = "{out}"; or start from its weights only with init.from_checkpoint '
            'and checkpoint.load = "none".'
        )


def _unwrap(chunk) -> MegatronModule:
    """The model family's chunk inside DDP / Float16Module: checkpoint keys must not depend on the wrappers."""
    while isinstance(chunk, DistributedDataParallel | Float16Module):
        chunk = chunk.module
    return chunk


def _gather_fresh_weights(training: Checkpointed) -> None:
    """With ``parallel.overlap_param_gather`` the optimizer step updates only each rank's shard of
    the weights, and megatron-core gathers the others at the next forward: until then a rank holds
    the previous step's. Gather them now, as Megatron-LM does before every save (``force_param_sync``),
    so that a save writes the weights of the step it is named after."""
    ddp_config = getattr(training.model[0], "ddp_config", None)
    if ddp_config is None or not ddp_config.overlap_param_gather:
        return
    training.optimizer.prepare_model_params_for_param_sync()
    for chunk in training.model:
        chunk.start_param_sync(force_sync=True)


def _model_state(model) -> dict:
    return {f"model{index}": _unwrap(chunk).sharded_state_dict() for index, chunk in enumerate(model)}


def _rng_object() -> ShardedObject:
    """Per (pipeline, tensor) rank, one copy for its data-parallel and context-parallel replicas;
    restored when TP and PP are unchanged (``_rng_fits``)."""
    pp, tp = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    return ShardedObject(
        "rng_state",
        rng_state(),
        (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


RNG_LAYOUT = ("tp", "pp")
"""The degrees that decide which RNG state a rank holds (its tensor-parallel stream, its stage's
dropout), as Megatron-LM's checkpointing decides: another DP, CP or VPP size keeps the state."""


def _rng_fits(saved_layout: dict, training: Checkpointed) -> bool:
    ours = _layout_tag(training)
    return all(saved_layout.get(key) == ours[key] for key in RNG_LAYOUT)


def _leaf_optimizers(optimizer) -> list:
    """The megatron-core optimizers that wrap a torch optimizer, through nested chains (the
    layer-wise distributed optimizer is itself a chain inside the top-level one)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    return [leaf for inner in chained for leaf in _leaf_optimizers(inner)] if chained is not None else [optimizer]


def _materialize_optimizer_state(optimizer, *, is_loading: bool) -> None:
    """torch optimizers create their state (Adam: moments and step count; Lion, Muon: momentum) at
    their first step, and megatron-core cannot describe a state that does not exist yet: to save
    (when every step so far was skipped: fp16 overflow, a bad-step guard, a preemption before the
    first) or to load. Give it the state its first step would start from, which changes nothing:
    torch's Adam step 0 and zero moments (megatron-core's own initialiser leaves out the step);
    for the others (Transformer Engine's fused Adam, which keeps its step count in the parameter
    groups; the emerging optimizers) megatron-core's initialiser (zero moments or momentum). A
    save without it would write no moments at all, and its resume would fail on their absence."""
    for inner in _leaf_optimizers(optimizer):
        state_owner = getattr(inner, "optimizer", None)
        if state_owner is None or state_owner.state:
            continue
        if isinstance(state_owner, torch.optim.Adam | torch.optim.AdamW):
            for group in state_owner.param_groups:
                for param in group["params"]:
                    moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
                    state_owner.state[param] = {
                        "step": torch.tensor(0.0),
                        **{name: torch.zeros_like(param) for name in moments},
                    }
        elif inner.init_state_fn is not None:
            inner.init_state_fn(state_owner, inner.config)
        elif is_loading and isinstance(inner, DistributedOptimizer):
            inner._init_optimizer_states_with_dummy_values()  # megatron-core's way: a zero-gradient step


def _full_state(training: Checkpointed, model_state: dict, *, is_loading: bool, optimizer_format: str) -> dict:
    _materialize_optimizer_state(training.optimizer, is_loading=is_loading)
    state = dict(model_state)
    state["optimizer"] = training.optimizer.sharded_state_dict(
        model_state,
        is_loading=is_loading,
        # With experts, megatron-core chains two optimizers: without a prefix per optimizer, their
        # tensors are named by the parameters alone, as at any other expert layout.
        metadata={"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True},
    )
    state["scheduler"] = training.scheduler.state_dict()
    counters = training.counters
    state["train_state"] = {
        "iteration": counters.iteration,
        "consumed_samples": counters.consumed_samples,
        "consumed_tokens": counters.consumed_tokens,
        **{name: part.state_dict() for name, part in training.parts.items()},
    }
    state["rng_state"] = _rng_object()
    return state


class CheckpointWriter:
    """Writes the full training state under ``root``: into ``iter_N.tmp``, which rank 0 marks
    complete and renames once every rank's files are written. With ``asynchronous`` the files
    are written by a thread per rank (``async_save``) while training goes on; at most one save is
    in flight, and ``wait`` finishes it."""

    def __init__(self, root: Path, asynchronous: bool):
        self.root = root
        self.pending = AsyncSaver() if asynchronous else None
        self._spread = None
        self.in_flight: Path | None = None
        self._finish: Callable[[], None] | None = None  # marks the save in flight complete

    def save(self, training: Checkpointed) -> None:
        self.wait()  # one save at a time: the previous one must be complete before the next starts
        final = self.root / store.checkpoint_name(training.counters.iteration)
        tmp = final.with_name(final.name + ".tmp")
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that was killed
            tmp.mkdir()
        dist.barrier()
        marker = {  # taken now: training moves on while an asynchronous save is written
            "iteration": training.counters.iteration,
            "consumed_samples": training.counters.consumed_samples,
            "consumed_tokens": training.counters.consumed_tokens,
            "seq_length": training.recipe.model.seq_length,
            "layout": _layout_tag(training),
            "vocab_size": training.recipe.model.vocab_size,  # lets another padding of the vocabulary load
            "optimizer_format": training.recipe.checkpoint.optimizer_format,
            "bigpt_version": bigpt.__version__,
        }
        self._finish = partial(
            self._mark_complete, tmp, final, marker, recipe_to_toml(training.recipe), training.recipe.checkpoint
        )
        _gather_fresh_weights(training)
        state = _full_state(
            training,
            _model_state(training.model),
            is_loading=False,
            optimizer_format=training.recipe.checkpoint.optimizer_format,
        )
        self.in_flight = final
        with self._reporting_failure():
            if self.pending is None:
                dist_checkpointing.save(state, str(tmp), sharded_strategy=self._spreading())
                dist.barrier()
                self._complete()
            else:
                self.pending.start(state, tmp, self._spreading())

    def _spreading(self) -> FullyParallelSaveStrategyWrapper:
        """megatron-core's fully parallel save: a tensor that every data-parallel rank holds (the
        weights) is written by one of them, chosen to even out what each rank writes, instead of
        all of them by the first. The choice is made at the first save and kept."""
        if self._spread is None:
            self._spread = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy(),
                parallel_state.get_data_parallel_group(with_context_parallel=True),
                do_cache_distribution=True,
            )
        return self._spread

    def poll(self) -> None:
        """Complete an asynchronous save whose files are all written (a collective: every rank calls it)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self.pending is not None and self.in_flight is not None:
            with self._reporting_failure():
                if self.pending.written(blocking):
                    self._complete()

    def _complete(self) -> None:
        assert self._finish is not None, "a save is in flight"
        self._finish()
        self._finish = self.in_flight = None

    def _mark_complete(self, tmp: Path, final: Path, marker: dict, recipe_text: str, config) -> None:
        if dist.get_rank() == 0:
            (tmp / "recipe.toml").write_text(recipe_text)
            store.finalize(tmp, final, dict(marker, files=store.manifest(tmp)))
            left = store.apply_retention(self.root, config.keep_last, config.keep_every, final)
            if left:
                console.warn(
                    f"checkpoint {final.name} saved, but retention (checkpoint.keep_last = {config.keep_last}) could "
                    f"not delete older checkpoints: {'; '.join(left)}. Delete or move them by hand (or fix their "
                    "permissions); saving goes on.",
                    here=True,  # rank 0 alone saw it
                )

    @contextmanager
    def _reporting_failure(self):
        try:
            yield
        # Raised on every rank when any rank's write fails; a RuntimeError is torch's serializer
        # failing to write ("unexpected pos ...", "file write failed").
        except (OSError, CheckpointException, RuntimeError) as err:
            cause = _cause(err, self.root)
            if cause is None:
                raise
            final = self.in_flight
            assert final is not None, "failures are reported for the save in flight"
            if dist.get_rank() == 0:
                shutil.rmtree(final.with_name(final.name + ".tmp"), ignore_errors=True)
            raise BigptError(
                f"saving checkpoint {final} failed ({cause}); nothing was replaced, the previous "
                f"checkpoint ({store.latest_in(self.root) or 'none'}) is intact. Free space in checkpoint.dir or "
                "point it elsewhere, then re-run the same command to resume."
            ) from err


def _cause(err: BaseException, root: Path) -> str | None:
    """The underlying error of a failed write, e.g. "[Errno 28] No space left on device" (None: not
    a failed write, a bug). torch's CheckpointException carries it (on the coordinator only) as the
    last line of its failure report. A full disk is named as such even when torch's serializer
    reports only its own symptom (a RuntimeError: "unexpected pos ...", "file write failed")."""
    if isinstance(err, OSError):
        return str(err.strerror or err)
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    if isinstance(err, CheckpointException):
        cause = (
            lines[-1].removeprefix("RuntimeError: Worker failure: ")
            if len(lines) > 1
            else "a write failed; rank 0 reports the cause"
        )
    else:
        cause = lines[-1]
    if names_a_full_disk(cause):
        return cause
    if almost_full(root):
        return f"No space left on device on the filesystem of {root}; the writer said: {cause}"
    return None if isinstance(err, RuntimeError) else cause


def _check_shapes(path: Path, expected: dict, *, padding_may_differ: bool = False) -> None:
    """Name every tensor whose global shape differs between the checkpoint and this model.
    ``padding_may_differ``: the checkpoint has the same vocabulary, so the embedding and output
    layer may differ in padding rows only (megatron-core loads the rows both have)."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    ours, _ = extract_sharded_tensors(expected)
    mismatched = []
    for tensor in nested_values(ours):
        theirs = saved.get(tensor.key)
        if theirs is None:
            mismatched.append(f"{tensor.key}: missing from the checkpoint, model has {tuple(tensor.global_shape)}")
        elif padding_may_differ and tensor.allow_shape_mismatch and theirs.global_shape[1:] == tensor.global_shape[1:]:
            continue
        elif tuple(theirs.global_shape) != tuple(tensor.global_shape):
            mismatched.append(
                f"{tensor.key}: checkpoint {tuple(theirs.global_shape)}, model {tuple(tensor.global_shape)}"
            )
    if mismatched:
        shown = "; ".join(sorted(set(mismatched))[:8])
        more = f" (and {len(set(mismatched)) - 8} more)" if len(set(mismatched)) > 8 else ""
        raise BigptError(
            f"checkpoint {path} does not fit the recipe's model: {shown}{more}. Load it with the model "
            'settings it was saved with (its recipe.toml), or start fresh elsewhere: checkpoint.load = "none" '
            "with a new run_dir (or checkpoint.dir)."
        )


def load_checkpoint(training: Checkpointed, path: Path) -> None:
    """Restore model, optimizer, scheduler, counters, the stateful parts and (same TP and PP only)
    RNG from ``path``."""
    marker = store.read_marker(path)
    model_state = _model_state(training.model)
    _check_shapes(path, model_state)  # before anything is touched
    _check_optimizer_format(path, marker, training)
    expert_changes = _expert_layout_changes(marker, training)
    if expert_changes and not training.recipe.parallel.distributed_optimizer:
        raise BigptError(
            f"checkpoint {path} was saved at another expert layout ({', '.join(expert_changes)}); bigpt maps the "
            "optimizer state between expert layouts with parallel.distributed_optimizer = true only; resume with "
            "it, or at the checkpoint's parallel.expert / parallel.expert_tensor"
        )
    state = _full_state(
        training, model_state, is_loading=True, optimizer_format=marker.get("optimizer_format", "fully_reshardable")
    )
    rng_fits = _rng_fits(marker.get("layout", {}), training)
    if not rng_fits:
        del state["rng_state"]
    loaded = dist_checkpointing.load(state, str(path))
    _load_model(training.model, loaded)
    training.optimizer.load_state_dict(_as_live_optimizers(loaded["optimizer"], training.optimizer))
    training.scheduler.load_state_dict(loaded["scheduler"])
    training.counters.iteration = loaded["train_state"]["iteration"]
    training.counters.consumed_samples = loaded["train_state"]["consumed_samples"]
    tokens = loaded["train_state"].get("consumed_tokens")  # none before bigpt counted tokens
    if tokens is None:
        tokens = store.saved_progress(path, training.recipe.model.seq_length)["consumed_tokens"]
    training.counters.consumed_tokens = tokens
    for name, part in training.parts.items():
        part.load_state_dict(loaded["train_state"].get(name, {}))
    for name, state in loaded["train_state"].items():
        if name not in COUNTERS and name not in training.parts:
            training.parts[name] = _KeptPart(state)
    if rng_fits:
        set_rng_state(loaded["rng_state"])


def load_weights(model, path: Path, vocab_size: int) -> None:
    """Model weights only (continual pretraining / layout changes): no optimizer, no counters.

    Only tensors are read: ``_extra_state`` (Transformer Engine's FP8 scaling history, None in
    megatron-core's local layers) is run state, which a fresh run starts afresh, and which an
    import from Hugging Face does not have. ``vocab_size`` is the model's unpadded vocabulary."""
    state = _model_state(model)
    same_vocab = store.read_marker(path).get("vocab_size") == vocab_size
    _check_shapes(path, state, padding_may_differ=same_vocab)
    tensors = {
        name: {key: value for key, value in chunk.items() if not isinstance(value, ShardedObject)}
        for name, chunk in state.items()
    }
    loaded = dist_checkpointing.load(tensors, str(path))
    for index, chunk in enumerate(model):
        own = _unwrap(chunk).state_dict()
        loaded[f"model{index}"] = {key: loaded[f"model{index}"].get(key, value) for key, value in own.items()}
    _load_model(model, loaded)


def _load_model(model, loaded: dict) -> None:
    for index, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded[f"model{index}"])
