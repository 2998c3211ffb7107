"""What a model family is: the parts of bigpt that differ between kinds of model."""

from collections.abc import Callable
from dataclasses import dataclass

from megatron.core.transformer import MegatronModule, TransformerConfig

from bigpt.layout import Layout
from bigpt.recipe import Recipe


@dataclass(frozen=True)
class ModelFamily:
    name: str
    """Its ``model.family`` value."""
    model_class: type[MegatronModule]
    """megatron-core's model class of one pipeline chunk."""
    config_fields: Callable[[Recipe, Layout, bool], dict]
    """(recipe, layout, use_te) → the ``TransformerConfig`` fields of this family's layers, on top
    of the ones every family shares (``bigpt.model.transformer_config``)."""
    layer_spec: Callable[[Recipe, TransformerConfig, bool, int | None], object]
    """(recipe, config, use_te, vp_stage) → the layer (or block) spec of one chunk."""
    build_chunk: Callable[[Recipe, Layout, TransformerConfig, object, int | None], MegatronModule]
    """(recipe, layout, config, spec, vp_stage) → the chunk this rank holds of virtual stage vp_stage."""
    forward_step: Callable
    """megatron-core's ``forward_step_func``: (data_iterator, model) → (output, loss function); the
    loss function returns (loss sum, token count, {"lm loss": [sum, count]})."""
    logits: Callable
    """(chunk, tokens [1, seq] on its device) → what the chunk passes on without labels: hidden
    states, or on the last stage its [1, seq, vocab / tp] logits (tools/logits.py). An
    encoder-decoder's takes ``decoder_tokens`` [1, decoder seq] too, and gives their logits."""
    build_datasets: Callable
    """(recipe, *, world_rank, train_samples, valid_samples) → (train, valid) datasets whose samples
    the forward step reads."""
    hf_model_types: tuple[str, ...]
    """The Hugging Face ``model_type`` values it imports and exports: bigpt/hf's rows (``Family``)
    that name it; none: an import or export is refused, saying so."""
