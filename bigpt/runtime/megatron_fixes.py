"""Fixes for megatron-core bugs bigpt hits, each pinned to the versions it was seen in.

Applied on every machine (GPU or not) by ``apply()``; each fix is a no-op where the bug cannot
trigger.
"""

import multiprocessing
from multiprocessing.managers import SyncManager

import torch

import megatron.core
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from bigpt.train.preemption import start_helper_process

FIXED_IN_VERSIONS = ("0.16.1",)


def _keep_torch_adam_step_on_reshardable_load() -> None:
    """megatron-core 0.16.1 with torch's AdamW (no Transformer Engine / Apex) restores each
    parameter's 'step' from the param groups (``load_state_dict``), then loads the rest of the
    state per parameter, which goes wrong three ways: the fully_reshardable load copies *every*
    key of the live state, 'step' included, which the checkpoint lacks (KeyError: 'step'); the
    dp_reshardable load overwrites the restored step with a 0 it never saved, and copies into the
    parameters with gradients enabled (a RuntimeError). And every parameter gets the *same*
    'step' tensor, which AdamW increments once per parameter per step, corrupting the bias
    correction after a resume. Keep the restored step, one copy per parameter; load the rest
    under no_grad."""
    original = DistributedOptimizer._set_main_param_and_optimizer_states

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


def _start_checkpoint_results_queue() -> None:
    """megatron-core 0.16.1's checkpoint writer collects write results through a Manager process
    it spawns at the first save. Two problems with it:

    - It sits in the rank's process group, and torchrun forwards SIGTERM/SIGUSR1 to the whole
      group: the preemption signal that should make bigpt save kills it, and the save then fails
      with BrokenPipeError. It is started ignoring those signals, and ends with its rank.
    - Spawned, it is a fresh interpreter that imports torch to unpickle the first results it is
      sent: 4-5 s added to the first save of every process. It is forked instead, and now, while
      the process is small (``apply`` runs before CUDA and the communicators start): a fork
      made later would keep a copy of every page the training process changes afterwards."""
    manager = SyncManager(ctx=multiprocessing.get_context("fork"))
    manager.start(initializer=start_helper_process)
    queue = manager.Queue()  # the proxy keeps the manager alive
    filesystem_async._get_write_results_queue = lambda: queue


_applied = False


def apply() -> None:
    global _applied
    if _applied or megatron.core.__version__ not in FIXED_IN_VERSIONS:
        return
    _keep_torch_adam_step_on_reshardable_load()
    _start_checkpoint_results_queue()
    _applied = True
