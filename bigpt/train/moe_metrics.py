"""Mixture-of-Experts metrics: the routers' balancing losses through megatron-core's MoE metrics
tracker, and the tokens each expert receives, counted from the routers' choices.

Per step, into the metrics every backend reads (TensorBoard's train/*, the console line):
- ``moe_<balancing>`` (e.g. ``moe_load_balancing_loss``) and ``moe_z_loss``: megatron-core's
  values, averaged over micro-batches and MoE layers, before their coefficients;
- ``moe_load_imbalance``: the busiest expert's tokens over the mean expert's, in the most
  imbalanced MoE layer (1.0: perfectly balanced).
At each logging step, an expert that received no token over the whole interval is named in a
warning: a dead expert wastes its parameters and usually means the balancing is off.
"""

import torch
import torch.distributed as dist
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.router import TopKRouter

from bigpt.recipe import ModelConfig
from bigpt.runtime import console
from bigpt.runtime.device import device
from bigpt.train.trainer import Callback, logging_step

BALANCING_METRICS = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}
"""megatron-core's tracker name of each moe.load_balancing loss (Megatron-LM's training.py)."""


class _Scalars:
    """A TensorBoard-writer stand-in that keeps what megatron-core's tracker reports."""

    def __init__(self):
        self.values: dict[str, float] = {}

    def add_scalar(self, name: str, value, step: int) -> None:
        self.values[name] = float(value)


class MoEMetrics(Callback):
    """Adds the MoE metrics to each step's metrics (before the backends read them)."""

    priority = 90

    def __init__(self, model: ModelConfig):
        self.names = (
            [BALANCING_METRICS[model.moe.load_balancing]] if model.moe.load_balancing in BALANCING_METRICS else []
        )
        if model.moe.z_loss_coeff:
            self.names.append("z_loss")
        self.line_fields = {f"moe_{name}": name.replace("_", " ") for name in self.names}
        self.line_fields["moe_load_imbalance"] = "load imbalance"
        """The metrics the console line shows, with their labels."""
        self.step_counts = torch.zeros(0)  # tokens per (layer, expert), this step, this rank
        self.interval_counts = torch.zeros(0)  # the same, summed over ranks and the interval
        self.interval_start = 1
        self.hooks: list = []

    def on_start(self, trainer):
        model = trainer.recipe.model
        self.step_counts = torch.zeros(model.num_layers, model.moe.num_experts or 0, dtype=torch.float64)
        self.interval_counts = torch.zeros_like(self.step_counts)
        self.interval_start = trainer.state.iteration + 1
        for chunk in trainer.model:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.hooks.append(module.register_forward_hook(self._count))

    def _count(self, router, inputs, outputs) -> None:
        if router.training:  # evaluation's tokens are not training's load
            _, routing_map = outputs
            self.step_counts[router.layer_number - 1] += routing_map.sum(dim=0).to("cpu", torch.float64)

    def on_step(self, trainer, metrics):
        model = trainer.recipe.model
        scalars = _Scalars()
        get_moe_metrics_tracker().report(
            loss_scale=1 / get_num_microbatches(),
            iteration=trainer.state.iteration,
            writer=scalars,
            force_initialize=True,  # a pipeline stage without MoE layers joins the reduction
            track_names=self.names,
            num_layers=model.num_layers,
            moe_layer_freq=model.moe.layers(model.num_layers),
        )
        metrics.update({f"moe_{name}": value for name, value in scalars.values.items()})
        counts = self.step_counts.to(device(), copy=True)  # a copy on the CPU too: the counts restart below
        dist.all_reduce(counts)  # every rank routes its own tokens; a stage's layers are its own
        counts = counts.cpu()
        self.step_counts.zero_()
        moe_rows = counts[torch.tensor(model.moe.layers(model.num_layers), dtype=torch.bool)]
        metrics["moe_load_imbalance"] = float((moe_rows.max(dim=1).values / moe_rows.mean(dim=1).clamp(min=1e-9)).max())
        self.interval_counts += counts
        step = trainer.state.iteration
        if logging_step(trainer.recipe, step):
            self._warn_about_idle_experts(model, step)
            self.interval_counts.zero_()
            self.interval_start = step + 1

    def _warn_about_idle_experts(self, model, step: int) -> None:
        idle = [
            (layer + 1, expert)
            for layer, is_moe in enumerate(model.moe.layers(model.num_layers))
            if is_moe
            for expert in (self.interval_counts[layer] == 0).nonzero().flatten().tolist()
        ]
        if idle and console.speaks():
            named = ", ".join(f"layer {layer} expert {expert}" for layer, expert in idle[:8])
            more = f" and {len(idle) - 8} more" if len(idle) > 8 else ""
            console.warn(
                f"steps {self.interval_start}-{step}: no token reached {named}{more}; an idle expert trains "
                "nothing (a balancing loss, model.moe.aux_loss_coeff or model.moe.expert_bias, spreads the load)"
            )

    def close(self, trainer):
        for hook in self.hooks:
            hook.remove()
