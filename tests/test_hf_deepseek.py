"""DeepSeek-V3's architecture: multi-latent attention ([model.mla]) and its router ([model.moe]),
in and out of Hugging Face.

Tiny random DeepSeek-V3 models are built with transformers (norms, router and its
e_score_correction_bias randomised): one with q-LoRA, YaRN, group-limited routing, a scaling
factor, two shared experts and a dense first layer; one without q-LoRA (as DeepSeek-V2-Lite),
plain RoPE and no group limit. fp32 logits must match transformers' within 1e-4 at EP=1 (in this
process) and at PP=2 × EP=2 (the MoE families' torchrun job). The router runs in fp32
(model.moe.router_fp32, as transformers' DeepSeek router does), so near-tied top-k choices fall
the same way. An export of an import gives back every tensor bit for bit, and transformers loads
it as the same class with no missing or unexpected weight.

On paper: what megatron-core's MLA cannot compute, or would silently ignore, is refused with the
reason.
"""

import re

import numpy as np
import pytest

from bigpt.errors import BigptError
from bigpt.recipe import load_recipe
from test_hf import TOLERANCE, recipe_for, reference_logits, save_model
from test_hf_moe import logits_in_process
from test_moe import MOE_RECIPE

MODEL = dict(
    model_type="deepseek_v3",
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_hidden_layers=3,
    intermediate_size=96,
    moe_intermediate_size=32,
    vocab_size=300,
    rms_norm_eps=1e-6,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=24,
    tie_word_embeddings=False,
)
SHAPES = {
    # q-LoRA, YaRN (DeepSeek-V3's mscale = mscale_all_dim), 8 experts in 4 groups, 2 groups chosen,
    # top-4 (2 per chosen group, as DeepSeek-V3's 8 of 4 groups), scaled by 2.5, 2 shared experts,
    # a dense first layer
    "deepseek_v3": dict(
        MODEL,
        q_lora_rank=24,
        n_routed_experts=8,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=2,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        max_position_embeddings=256,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=64,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    ),
    # no q-LoRA (DeepSeek-V2-Lite's queries), plain RoPE, 6 experts with no group limit, one shared
    # expert, every layer MoE
    "no_q_lora": dict(
        MODEL,
        q_lora_rank=None,
        n_routed_experts=6,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        n_shared_experts=1,
        first_k_dense_replace=0,
        norm_topk_prob=True,
        rope_theta=50000.0,
    ),
}


@pytest.fixture(scope="module")
def deepseek_models(tmp_path_factory):
    """name -> (HF directory, tokens file, transformers' logits, bigpt recipe with init.from_hf)."""
    root = tmp_path_factory.mktemp("hf_deepseek")
    found = {}
    for seed, (name, shape) in enumerate(SHAPES.items()):
        directory = save_model(root / name, 20 + seed, shape)
        tokens = np.random.default_rng(seed).integers(0, shape["vocab_size"], size=(2, 16))
        np.save(root / f"{name}_tokens.npy", tokens)
        found[name] = (
            directory,
            root / f"{name}_tokens.npy",
            reference_logits(directory, tokens),
            recipe_for(directory, root / f"{name}.toml", name),
        )
    return found


@pytest.fixture(scope="module")
def ep1(deepseek_models, tmp_path_factory):
    """name -> (max |bigpt - transformers| at EP=1 with init.from_hf, the import it made), in this process."""
    root = tmp_path_factory.mktemp("ep1")
    found = {}
    for name, (_, tokens, reference, recipe_file) in deepseek_models.items():
        logits = logits_in_process(recipe_file, root / name, tokens)
        found[name] = (float(np.abs(logits - reference).max()), root / name / "init_from_hf")
    print({name: difference for name, (difference, _) in found.items()})
    return found


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers_at_ep1(ep1, name):
    assert ep1[name][0] <= TOLERANCE


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
