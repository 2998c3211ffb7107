"""Model families: each kind of model bigpt trains is one ``ModelFamily``, chosen by ``model.family``.

A family bundles what differs between kinds of model: the megatron-core model class, the
``TransformerConfig`` fields and layer spec of its layers, how a chunk is built, the forward step
and loss the pipeline schedule runs, its datasets, and which Hugging Face model types it imports
and exports. What they share stays where it is and asks the family: ``bigpt.model`` (precision,
fusions, parallel degrees of the config; Transformer Engine), the trainer and evaluation (the
schedule), checkpoints (whatever the chunk's sharded state dict holds), the counts
(``bigpt.flops``, ``bigpt.memory``: they read the model's family). Its recipe keys are a table of
[model] (``[model.moe]``) with their checks in ``bigpt.recipe.checks``, since a recipe is checked on
paper before anything is built.

Adding a family: a module here with its ``ModelFamily``,
its name added to ``model.family``'s choices (``bigpt/recipe/tables.py``) and to ``FAMILIES``
below, its keys as a [model.<family>] table if it has any, and tests of the same kind as
tests/test_moe.py (checks on paper, parity with one rank, resume). docs/architecture.md says more.
"""

from bigpt.families.decoder import DECODER
from bigpt.families.encoder import ENCODER
from bigpt.families.encoder_decoder import ENCODER_DECODER
from bigpt.families.moe_decoder import MOE_DECODER
from bigpt.families.spec import ModelFamily
from bigpt.recipe import ModelConfig

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (DECODER, MOE_DECODER, ENCODER, ENCODER_DECODER)}
"""Every family, by its model.family name."""


def family_of(model: ModelConfig) -> ModelFamily:
    return FAMILIES[model.family]


__all__ = ["FAMILIES", "ModelFamily", "family_of"]
