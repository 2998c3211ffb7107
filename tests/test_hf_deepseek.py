"""DeepSeek-V3's architecture: multi-latent attention ([model.mla]) and its router ([model.moe]).

On paper: what megatron-core's MLA cannot compute, or would silently ignore, is refused with the
reason.
"""

import re

import pytest

from bigpt.errors import BigptError
from bigpt.recipe import load_recipe
from test_moe import MOE_RECIPE

MLA = [
    "model.mla.kv_lora_rank=32",
    "model.mla.qk_head_dim=16",
    "model.mla.qk_pos_emb_head_dim=8",
    "model.mla.v_head_dim=16",
]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.mla.q_lora_rank=24"], "model.mla.q_lora_rank set without model.mla.kv_lora_rank"),
        ([*MLA, "model.num_query_groups=2"], "model.num_query_groups=2 with multi-latent attention"),
        ([*MLA, "model.kv_channels=32"], "model.kv_channels=32 with multi-latent attention"),
        ([*MLA, "model.qk_layernorm=true"], "normalises its query and key/value latents"),
        ([*MLA, "model.add_qkv_bias=true"], "projections have no biases"),
        ([*MLA, "model.position_embedding='learned'"], "rotates the qk_pos_emb_head_dim part"),
        ([*MLA, "model.rope_scaling='llama3'"], "unscaled or with YaRN only"),
        ([*MLA, "model.mla.qk_pos_emb_head_dim=7"], "qk_pos_emb_head_dim=7 (odd)"),
    ],
)
def test_what_mla_cannot_compute_is_refused_on_paper(overrides, words):
    with pytest.raises(BigptError, match=re.escape(words)):
        load_recipe(MOE_RECIPE, ["model.num_query_groups=4", *overrides])
