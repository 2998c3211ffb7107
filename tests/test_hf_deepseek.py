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

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bigpt.errors import BigptError
from bigpt.hf.config import hf_from_model, model_from_hf
from bigpt.recipe import ModelConfig, load_recipe
from test_hf import TOLERANCE, hf_tensors, recipe_for, reference_logits, save_model
from test_moe import MOE_RECIPE

MODEL = dict(
    model_type="deepseek_v3",
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_hidden_layers=4,
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
    from test_hf_moe import differences_at_ep1  # here: test_hf_moe imports this module's models

    return differences_at_ep1(deepseek_models, tmp_path_factory.mktemp("ep1"))


def test_the_models_are_what_they_claim(deepseek_models):
    """Every tensor random (transformers starts the router bias at zero), and each model's features present."""
    for directory, *_ in deepseek_models.values():
        for key, tensor in hf_tensors(directory).items():
            assert tensor.std() > 0.01, key
    lora = hf_tensors(deepseek_models["deepseek_v3"][0])
    assert "model.layers.0.mlp.gate_proj.weight" in lora and "model.layers.1.self_attn.q_a_layernorm.weight" in lora
    assert lora["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (64, 64)  # two experts' widths
    plain = hf_tensors(deepseek_models["no_q_lora"][0])
    assert "model.layers.0.self_attn.q_proj.weight" in plain and "model.layers.0.mlp.gate.weight" in plain


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers_at_ep1(ep1, name):
    assert ep1[name][0] <= TOLERANCE


@pytest.mark.slow  # the fast subset's time
def test_the_router_bias_decides_experts_in_these_models(deepseek_models):
    """Without e_score_correction_bias transformers' logits change: the parity above shows bigpt
    chooses experts with it, as megatron-core's expert bias."""
    directory, tokens, reference, _ = deepseek_models["deepseek_v3"]
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    with torch.no_grad():
        unbiased = model(torch.from_numpy(np.load(tokens))).logits.numpy()
    assert np.abs(unbiased - reference).max() > 100 * TOLERANCE


@pytest.mark.parametrize(
    "name",
    ["deepseek_v3", pytest.param("no_q_lora", marks=pytest.mark.slow)],  # the fast subset's time
)
def test_export_of_an_import_reproduces_every_tensor(deepseek_models, ep1, tmp_path, name):
    from bigpt.hf.convert import export_hf
    from bigpt.runtime.distributed import process_group_of_one

    directory, tokens, reference, _ = deepseek_models[name]
    out = tmp_path / "exported"
    with process_group_of_one():
        export_hf(ep1[name][1], out)
    original, exported = hf_tensors(directory), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    model, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weight
    np.testing.assert_array_equal(reference_logits(out, np.load(tokens)), reference)
    assert model_from_hf(json.loads((out / "config.json").read_text()), out) == model_from_hf(
        json.loads((directory / "config.json").read_text()), directory
    )


def test_multi_token_prediction_layers_are_left_out_saying_so(deepseek_models, tmp_path):
    """A released DeepSeek-V3 has num_nextn_predict_layers layers past num_hidden_layers
    (model.layers.61.* of 61): transformers does not build them, nor does bigpt (megatron-core's
    MTP is not wired in); the import leaves them out and its note says so."""
    from bigpt.hf.convert import _import_notes
    from bigpt.hf.files import inspect_hf

    source = deepseek_models["no_q_lora"][0]
    directory = tmp_path / "with_mtp"
    directory.mkdir()
    config = json.loads((source / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=1)))
    tensors = load_file(source / "model.safetensors")
    layers = config["num_hidden_layers"]
    mtp = {
        name.replace("layers.0.", f"layers.{layers}."): t.clone() for name, t in tensors.items() if "layers.0." in name
    }
    mtp[f"model.layers.{layers}.enorm.weight"] = torch.ones(64)
    save_file(tensors | mtp, directory / "model.safetensors")
    model, weights = inspect_hf(directory)
    assert weights.left_out == sorted(mtp) and model == model_from_hf(config, source)
    (note,) = _import_notes(config, weights, directory)
    assert f"left out {len(mtp)} tensors of DeepSeek's 1 multi-token-prediction layers (layers 4 on)" in note
    (directory / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=0)))
    with pytest.raises(BigptError, match=f"tensor model.layers.{layers}.* has no place"):
        inspect_hf(directory)


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(rope_interleave=False), "rope_interleave = false is not supported"),
        (dict(num_experts_per_tok=3, topk_group=1), "megatron-core by their num_experts_per_tok // topk_group = 3"),
        (dict(norm_topk_prob=False), "norm_topk_prob = false with a sigmoid router"),
        (dict(scoring_func="softmax"), "scoring_func = 'softmax' is not DeepSeek-V3's 'sigmoid'"),
        (dict(first_k_dense_replace=4), "first_k_dense_replace = 4 leaves no MoE layer"),
        (dict(n_group=None), r"the keys \['n_group'\] are missing"),
        (dict(kv_lora_rank=None), r"the keys \['kv_lora_rank'\] are missing"),
    ],
)
def test_what_megatron_core_cannot_compute_of_deepseek_v3_is_refused(changes, words):
    config = dict(SHAPES["deepseek_v3"], architectures=["DeepseekV3ForCausalLM"], **changes)
    with pytest.raises(BigptError, match=words):
        model_from_hf(config, "config.json")


def test_deepseek_v3_exports_what_it_imports_and_refuses_what_it_cannot_express(deepseek_models):
    config = json.loads((deepseek_models["deepseek_v3"][0] / "config.json").read_text())
    table = model_from_hf(config, "config.json")
    exported = hf_from_model(ModelConfig(**table, seq_length=64), "float32", None)
    assert exported["architectures"] == ["DeepseekV3ForCausalLM"]
    assert model_from_hf(exported, "config.json") == model_from_hf(config, "config.json")
    for change, words in [
        (dict(router_topk=2), r"router_topk // group_topk = 1 \(DeepSeek-V3 ranks groups by their 2 best\)"),
        (dict(expert_bias=False), "model.moe.expert_bias = False"),
        (dict(layer_pattern=[0, 1, 0, 1]), "dense layers after MoE ones"),
    ]:
        changed = ModelConfig(**table | {"moe": table["moe"] | change}, seq_length=64)
        with pytest.raises(BigptError, match=f"{words}.* fits none of the Hugging Face families"):
            hf_from_model(changed, "float32", None)


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
