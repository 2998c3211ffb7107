"""DeepSeek-V3 on paper (recipes/deepseek_v3.toml): multi-latent attention's and its MoE's
parameters, active parameters, FLOPs and activation memory, against the model card, the released
checkpoint and counts by hand; and the report's layout on 2048 GPUs fits the planner's memory."""

import dataclasses
import math
from pathlib import Path

import pytest

from bigpt.flops import GPUS, flops_per_token, num_parameters
from bigpt.layout import Layout
from bigpt.memory import layer_activations, peak_memory, stage_memory
from bigpt.plan import GIB
from bigpt.recipe import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "deepseek_v3.toml"
HIDDEN, HEADS, LAYERS, VOCAB = 7168, 128, 61, 129280
Q_LORA, KV_LORA, QK, ROPE, V = 1536, 512, 128, 64, 128
# one layer's multi-latent attention: q down and up, the kv latent with the shared rotary key, k and v up, output
MLA = HIDDEN * Q_LORA + Q_LORA * HEADS * (QK + ROPE) + HIDDEN * (KV_LORA + ROPE) + KV_LORA * HEADS * (QK + V)
MLA += HEADS * V * HIDDEN
EXPERT = 3 * HIDDEN * 2048  # SwiGLU, moe_intermediate_size 2048 (the shared expert too)
DENSE_MLP = 3 * HIDDEN * 18432
ROUTER = 256 * HIDDEN


@pytest.fixture(scope="module")
def deepseek():
    return load_recipe(RECIPE)


def test_deepseek_v3_counts_as_its_model_card_and_its_checkpoint(deepseek):
    """The card's 671B is the model bigpt trains, without the multi-token-prediction (MTP) module;
    the released checkpoint's 685B (Hugging Face counts the stored tensors) adds that module (one
    more MoE layer; the projection of the embedding and hidden state, 2h × h; three norms; its own
    copies of the embedding and output layer) and a float32 scale per 128 × 128 block of each FP8
    weight. Both within the rounding of the card. 37B active: 37.55B counting the embedding and
    output layer, as the other MoE cards are counted (tests/test_moe.py), within 2% as they are."""
    model = deepseek.model
    total = num_parameters(model)
    norms = 2 * HIDDEN + Q_LORA + KV_LORA  # a layer's two norms and its two latents'
    dense_layers, moe_layers = 3 * (MLA + norms + DENSE_MLP), 58 * (MLA + norms + 257 * EXPERT + ROUTER)
    assert total == dense_layers + moe_layers + 2 * VOCAB * HIDDEN + HIDDEN == 671_026_404_352
    assert total == pytest.approx(671e9, abs=0.5e9)

    one_more_layer = num_parameters(dataclasses.replace(model, num_layers=LAYERS + 1)) - total
    assert one_more_layer == MLA + norms + 257 * EXPERT + ROUTER  # layer 62 is an MoE layer
    mtp = one_more_layer + 2 * HIDDEN * HIDDEN + 3 * HIDDEN + 2 * VOCAB * HIDDEN

    def blocks(rows: int, columns: int) -> int:
        return math.ceil(rows / 128) * math.ceil(columns / 128)

    attention_scales = (
        blocks(Q_LORA, HIDDEN)
        + blocks(HEADS * (QK + ROPE), Q_LORA)
        + blocks(KV_LORA + ROPE, HIDDEN)
        + blocks(HEADS * (QK + V), KV_LORA)
        + blocks(HIDDEN, HEADS * V)
    )
    scales = 62 * attention_scales + 3 * 3 * blocks(18432, HIDDEN) + 59 * 257 * 3 * blocks(2048, HIDDEN)
    assert total + mtp == pytest.approx(684.49e9, abs=0.01e9)  # 684B: the scales make it 685B
    assert total + mtp + scales == pytest.approx(685e9, abs=0.5e9)

    active = num_parameters(model, active=True)
    assert active == total - 58 * 248 * EXPERT == 37_552_282_624  # 8 routed + 1 shared of 257 a layer
    assert active == pytest.approx(37e9, rel=2e-2)


def test_deepseek_v3_flops_count_mla_and_the_experts_a_token_passes(deepseek):
    """By hand: every layer's MLA matrices and its attention core (scores over qk_head_dim +
    qk_pos_emb_head_dim = 192 a head, values of v_head_dim = 128, at s/2 keys under the causal
    mask), the dense MLPs of the first 3 layers, then the router, the shared and 8 routed experts."""
    matmuls = LAYERS * MLA + 3 * DENSE_MLP + 58 * (ROUTER + 9 * EXPERT) + VOCAB * HIDDEN
    core = LAYERS * 2 * (4096 / 2) * HEADS * (QK + ROPE + V)
    assert flops_per_token(deepseek.model) == pytest.approx(3 * (2 * matmuls + core), rel=1e-12)


def test_mla_keeps_its_latents_and_every_heads_key_and_value(deepseek):
    """One layer's activations at the recipe's layout (TP 1, no sequence parallelism, the MLP and
    MoE recomputed, so they keep their input alone): the two norms' inputs and the one linear
    input the recompute leaves, each latent twice (its norm's input, its up-projection's), and
    the per-head Q, K, V and attention output, in bf16 for a 4096-token micro-batch."""
    layout = Layout.from_recipe(deepseek, 2048)
    assert (layout.tp, layout.pp, layout.ep, layout.dp) == (1, 16, 64, 128)
    per_token = 3 * HIDDEN + 2 * (Q_LORA + KV_LORA) + 2 * HEADS * (QK + ROPE) + 2 * HEADS * V
    assert layer_activations(deepseek, layout) == 2 * 4096 * per_token


def test_the_reports_layout_fits_on_2048_gpus_with_the_mlp_and_moe_recomputed(deepseek):
    """PP 16 × EP 64 × DP 128 (the DeepSeek-V3 report's, on 2048 H800s of 80 GB) fits in the planner's
    memory with 10% kept free once the MLP and MoE layers are recomputed; without it the second stage
    holds 15 micro-batches of 4 layers' activations and does not."""
    usable = 0.9 * GPUS["h100-80gb"].memory_gib * GIB
    peak = peak_memory(deepseek, Layout.from_recipe(deepseek, 2048))
    assert peak.total <= usable and peak.stage == 1 and peak.in_flight == 15
    unrecomputed = dataclasses.replace(deepseek, recompute=dataclasses.replace(deepseek.recompute, granularity="none"))
    assert peak_memory(unrecomputed, Layout.from_recipe(unrecomputed, 2048)).total > usable


def test_transformer_engines_mla_keeps_its_down_projections_whole_on_every_tensor_parallel_rank(deepseek):
    """megatron-core's Transformer Engine spec builds them as TELinear with parallel_mode
    "duplicated" (transformer/multi_latent_attention.py); its local spec splits them as the rest."""
    per_gpu = {}
    for engine in ("auto", "off"):
        recipe = dataclasses.replace(
            deepseek,
            parallel=dataclasses.replace(deepseek.parallel, tensor=2, sequence_parallel=True),
            precision=dataclasses.replace(deepseek.precision, transformer_engine=engine),
        )
        per_gpu[engine] = stage_memory(recipe, Layout.from_recipe(recipe, 2048))[1].parameters
    down = HIDDEN * (Q_LORA + KV_LORA + ROPE)
    assert per_gpu["auto"] - per_gpu["off"] == 4 * down // 2  # 4 layers' down-projections, half of each


RELEASED = {  # deepseek-ai/DeepSeek-V3's config.json
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_the_recipe_describes_the_released_model(deepseek):
    """init.from_hf with the released config.json would accept the recipe's [model], and an export
    of it writes DeepSeek-V3 (without the quantization_config: an export is never FP8)."""
    from bigpt.hf.config import check_recipe_matches, hf_from_model, model_from_hf

    check_recipe_matches(deepseek.model, model_from_hf(RELEASED, "config.json"), "config.json")
    exported = hf_from_model(deepseek.model, "bfloat16", RELEASED)
    assert exported["architectures"] == RELEASED["architectures"] and "quantization_config" not in exported


@pytest.mark.slow
def test_the_recipe_passes_the_dry_run_on_2048_gpus(tmp_path):
    """What `launchers/run.py recipes/deepseek_v3.toml --dry-run --world-size 2048` checks (on
    megatron-core's mock data, whose index for 10,000 steps this machine can hold), in this process."""
    from bigpt.dryrun import describe

    recipe = load_recipe(RECIPE, [f"run_dir={tmp_path}"])
    plan = describe(recipe, Layout.from_recipe(recipe, 2048))
    assert "2048 = TP 1 × PP 16 × CP 1 × DP 128; experts over EP 64 × expert TP 1" in plan
    assert "the busiest GPU holds 62.4 GiB (49.2 GiB activations)" in plan
