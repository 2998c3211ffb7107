"""Hugging Face Mixture-of-Experts models in and out: Mixtral, Qwen2-MoE and Qwen3-MoE.

Tiny random models of each family (routers, norms and biases randomised; Mixtral with a sliding
window; Qwen2-MoE with its gated shared expert, unnormalised top-k and a dense first layer;
Qwen3-MoE with per-head q/k norms, a head_dim that is not hidden / heads, and decoder_sparse_step
2) are built with transformers and imported by bigpt: fp32 logits must match transformers' within
1e-4 at EP=1 (in this process) and PP=2 × EP=2 (one torchrun job); the router runs in fp32, so
near-tied top-k choices fall the same way. An export of an import gives back every tensor bit
for bit, and transformers loads it as the same class with no missing or unexpected weight. MoE
families megatron-core cannot compute identically are refused by name.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bigpt.errors import BigptError
from bigpt.hf.config import check_recipe_matches, hf_from_model, model_from_hf
from bigpt.hf.files import inspect_hf
from bigpt.recipe import ModelConfig, load_recipe, table_to_toml
from multirank import MOCK_RECIPE, REPO, scalars
from test_hf import (
    TOLERANCE,
    add_tokenizer,
    hf_tensors,
    logits_of_models,
    recipe_for,
    reference_logits,
    run_walkthrough,
    save_model,
)
from test_hf_deepseek import deepseek_models  # noqa: F401 (a fixture: DeepSeek-V3 joins the multi-rank job)
from test_moe import MOE_RECIPE

ATTENTION = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4, rms_norm_eps=1e-6)
SHAPES = {
    # every layer MoE, softmax → top-2 → renormalised; Mistral's sliding window, shorter than the tokens
    "mixtral": dict(
        ATTENTION,
        model_type="mixtral",
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=300,
        sliding_window=6,
        rope_theta=1e6,
    ),
    # q/k/v biases, a gated shared expert, top-2 of a softmax over 6 experts not renormalised, a dense first layer
    "qwen2_moe": dict(
        ATTENTION,
        model_type="qwen2_moe",
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[0],
        vocab_size=300,
        tie_word_embeddings=False,
    ),
    # per-head q/k norms, head_dim × heads != hidden, MoE in every second layer, renormalised top-3 of 8
    "qwen3_moe": dict(
        ATTENTION,
        model_type="qwen3_moe",
        head_dim=32,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        vocab_size=300,
        tie_word_embeddings=False,
    ),
}
# The dense model upcycled: a Qwen3 (per-head q/k norms) whose MLP becomes 4 experts, 2 per token.
DENSE = dict(
    ATTENTION, model_type="qwen3", head_dim=32, intermediate_size=64, vocab_size=300, tie_word_embeddings=False
)
UPCYCLED = {"num_experts": 4, "router_topk": 2}
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """name -> (HF directory, tokens file, transformers' logits, bigpt recipe with init.from_hf)."""
    root = tmp_path_factory.mktemp("hf_moe")
    found = {}
    for seed, (name, shape) in enumerate(SHAPES.items()):
        directory = save_model(root / name, seed, shape)
        tokens = np.random.default_rng(seed).integers(0, shape["vocab_size"], size=(2, 16))
        np.save(root / f"{name}_tokens.npy", tokens)
        found[name] = (
            directory,
            root / f"{name}_tokens.npy",
            reference_logits(directory, tokens),
            recipe_for(directory, root / f"{name}.toml", name),
        )
    return found


def upcycle_recipe(dense: Path, out: Path, **moe) -> Path:
    """A recipe of the MoE form of the Hugging Face model ``dense``, upcycled from it."""
    model = model_from_hf(json.loads((dense / "config.json").read_text()), dense)
    table = dict(model, family="moe_decoder", seq_length=64, moe=UPCYCLED | moe)
    out.write_text(
        f'base = "{MOCK_RECIPE}"\nname = "upcycled"\n\n'
        + table_to_toml("model", table)
        + f'\n\n[init]\nfrom_hf = "{dense}"\nupcycle = true\n'
    )
    return out


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    """(dense HF directory, tokens file, transformers' logits of the dense model, upcycling recipe)."""
    root = tmp_path_factory.mktemp("upcycle")
    dense = save_model(root / "dense", 7, DENSE)
    tokens = np.random.default_rng(7).integers(0, DENSE["vocab_size"], size=(2, 16))
    np.save(root / "tokens.npy", tokens)
    return dense, root / "tokens.npy", reference_logits(dense, tokens), upcycle_recipe(dense, root / "upcycle.toml")


def logits_in_process(recipe_file: Path, run_dir: Path, tokens: Path, *overrides: str) -> np.ndarray:
    """tools/logits.py's logits of ``recipe_file`` (with its [init] weights) at one rank, in this process."""
    from bigpt.layout import Layout
    from bigpt.logits import compute_logits
    from bigpt.runtime.distributed import model_parallel_of_one

    recipe = load_recipe(recipe_file, [f"run_dir={run_dir}", *overrides])
    with model_parallel_of_one():
        return compute_logits(recipe, Layout.from_recipe(recipe, 1), torch.from_numpy(np.load(tokens)).long()).numpy()


def differences_at_ep1(models, root: Path) -> dict[str, tuple[float, Path]]:
    """name -> (max |bigpt - transformers| at EP=1 with init.from_hf, the import it made), in this process."""
    found = {}
    for name, (_, tokens, reference, recipe_file) in models.items():
        logits = logits_in_process(recipe_file, root / name, tokens)
        found[name] = (float(np.abs(logits - reference).max()), root / name / "init_from_hf")
    print({name: difference for name, (difference, _) in found.items()})
    return found


@pytest.fixture(scope="module")
def ep1(moe_models, tmp_path_factory):
    return differences_at_ep1(moe_models, tmp_path_factory.mktemp("ep1"))


def test_the_models_are_what_they_claim(moe_models):
    """Every tensor random (transformers starts some at zero or one), and each family's features present."""
    for directory, *_ in moe_models.values():
        for key, tensor in hf_tensors(directory).items():
            assert tensor.std() > 0.01, key
    qwen2 = hf_tensors(moe_models["qwen2_moe"][0])
    assert "model.layers.0.mlp.gate_proj.weight" in qwen2 and "model.layers.1.mlp.shared_expert_gate.weight" in qwen2
    qwen3 = hf_tensors(moe_models["qwen3_moe"][0])
    assert "model.layers.0.mlp.gate_proj.weight" in qwen3 and "model.layers.1.mlp.experts.7.up_proj.weight" in qwen3


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers_at_ep1(ep1, name):
    assert ep1[name][0] <= TOLERANCE


@pytest.mark.parametrize("name", SHAPES)
def test_export_of_an_import_reproduces_every_tensor(moe_models, ep1, tmp_path, name):
    from bigpt.hf.convert import export_hf
    from bigpt.runtime.distributed import process_group_of_one

    directory, tokens, reference, _ = moe_models[name]
    out = tmp_path / "exported"
    with process_group_of_one():
        export_hf(ep1[name][1], out)
    original, exported = hf_tensors(directory), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    model, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == ARCHITECTURES[name]
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weight
    np.testing.assert_array_equal(reference_logits(out, np.load(tokens)), reference)
    assert model_from_hf(json.loads((out / "config.json").read_text()), out) == model_from_hf(
        json.loads((directory / "config.json").read_text()), directory
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.pipeline=2", "parallel.expert=2"],
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"],
    ],
    ids=["pp2_ep2", "tp2_ep2"],
)
def test_logits_match_transformers_at_four_ranks(moe_models, upcycled, deepseek_models, tmp_path, layout):  # noqa: F811
    """Two pipeline stages of two layers, or attention split over two tensor-parallel ranks; each
    stage's experts split over two ranks (EP2). The import is written by all four ranks, and each
    rank upcycles its own experts from the dense model. One job a layout for all, DeepSeek-V3's
    models too (tests/test_hf_deepseek.py): each start costs seconds."""
    models = dict(moe_models, upcycled=upcycled, **deepseek_models)
    recipes = {name: recipe for name, (*_, recipe) in models.items()}
    differences = logits_of_models(recipes, models, tmp_path, *layout, nproc=4)
    assert max(differences.values()) <= TOLERANCE, differences


@pytest.mark.slow
def test_the_moe_walkthrough_runs(moe_models, tmp_path):
    """The Mixture-of-Experts walkthrough (docs/huggingface.md), command for command, on the tiny
    Qwen3-MoE at EP=2 on two processes: tokenize domain and replay text, a recipe of one's own with
    the expert-parallel layout the planner shows, dry run, train from the released weights (each
    rank importing its experts) with a re-warmed learning rate, export as Qwen3-MoE, which
    transformers loads with no missing or unexpected weight."""
    directory, tokens, reference, _ = moe_models["qwen3_moe"]
    hf = tmp_path / "released"
    shutil.copytree(directory, hf)
    words = SHAPES["qwen3_moe"]["vocab_size"] - 7
    add_tokenizer(hf, words)
    base = recipe_for(hf, tmp_path / "base.toml", "qwen3_moe")  # stands for recipes/qwen3_30b_a3b.toml
    result = run_walkthrough("moe walkthrough", tmp_path, words, HF=hf, BASE=base, NPROC=2, EP=2)
    plan = result.stdout.split("Plan for my_moe.toml on 2 ", 1)[1]
    assert "TP 1 × PP 1 × CP 1 × DP 2, EP 2 × expert TP 1" in plan and "← recipe" in plan
    assert "all-to-all" in plan and "alltoall dispatcher at EP 2" in plan
    assert "starting from the weights in" in result.stdout and "step 1/6" in result.stdout
    assert (tmp_path / "runs" / "my-moe" / "init_from_hf" / "model.toml").is_file()
    lr = scalars(tmp_path / "runs" / "my-moe", "train/lr")
    assert lr[0] < lr[1] == pytest.approx(3e-5)  # warmup from 0 to the recipe's lower peak, then decay
    out = tmp_path / "hf" / "my-moe"
    model, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and not any(loading.values()), loading
    assert sorted(hf_tensors(out)) == sorted(hf_tensors(hf))
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    trained = reference_logits(out, np.load(tokens))
    assert np.isfinite(trained).all() and np.abs(trained - reference).max() > 1e-3


def test_the_moe_walkthroughs_layout_is_the_planners_first_choice():
    """What the walkthrough's settings say (docs/huggingface.md): on NPROC GPUs, BASE with no
    pipeline and each layer's experts over EP GPUs is the layout tools/plan.py ranks first."""
    from bigpt.plan import make_plan

    block = (REPO / "docs" / "huggingface.md").read_text().split("<!-- moe walkthrough -->", 1)[1]
    settings = dict(re.findall(r"^([A-Z]+)=(\S+)", block.split("```", 2)[1], re.MULTILINE))
    assert "pipeline = 1\nexpert = $EP\n" in block
    recipe = load_recipe(REPO / settings["BASE"], ["parallel.pipeline=1", f"parallel.expert={settings['EP']}"])
    plan = make_plan(recipe, int(settings["NPROC"]), "h100-80gb", mfu=0.4, headroom=0.1, gpus_per_node=8)
    assert plan.recipe_layout_problem is None and plan.options[0] == plan.chosen


def test_dry_run_checks_moe_and_upcycled_initial_weights_on_paper(moe_models, upcycled, tmp_path):
    """--dry-run reads config.json and tensor headers: an MoE model against the recipe's
    [model.moe], and a dense model to upcycle against the recipe's dense form."""
    from bigpt.dryrun import describe
    from bigpt.layout import Layout

    def report(recipe: Path, *overrides: str) -> str:
        loaded = load_recipe(recipe, [f"run_dir={tmp_path / 'run'}", *overrides])
        return describe(loaded, Layout.from_recipe(loaded, 1))

    directory, *_, recipe = moe_models["qwen3_moe"]
    assert f"initial weights  weights of {directory.resolve()} (Hugging Face" in report(recipe)
    with pytest.raises(BigptError, match=r"model.moe.router_topk = 2 \(the checkpoint has 3\)"):
        report(recipe, "model.moe.router_topk=2")
    dense, *_, upcycling = upcycled
    assert f"initial weights  weights of {dense.resolve()} (Hugging Face" in report(upcycling)
    with pytest.raises(BigptError, match=r"model.ffn_hidden_size = 32 \(the checkpoint has 64\)"):
        report(upcycling, "model.ffn_hidden_size=32")


def test_the_import_reads_one_expert_at_a_time(moe_models, tmp_path, monkeypatch):
    """Each expert's tensors are read from the Hugging Face files only when their slice of the
    expert-stacked tensor is written (as test_hf.py shows for the dense tensors): never more than
    the three inputs of one join (q, k, v) between two files."""
    import collections

    from bigpt.hf.convert import import_hf
    from bigpt.hf.files import SafetensorsWeights
    from bigpt.runtime.distributed import process_group_of_one

    get, files_when_read = SafetensorsWeights.get, []

    def watched(self, name):
        files_when_read.append(len(list(tmp_path.rglob("*.distcp"))))
        return get(self, name)

    monkeypatch.setattr(SafetensorsWeights, "get", watched)
    directory = moe_models["qwen3_moe"][0]
    with process_group_of_one():
        import_hf(directory, tmp_path / "imported")
    assert len(files_when_read) == len(hf_tensors(directory))  # each read once
    assert max(collections.Counter(files_when_read).values()) <= 3, files_when_read


# --- dense → MoE upcycling ---------------------------------------------------------------------


def test_an_upcycled_model_computes_what_the_dense_model_computes(upcycled, tmp_path):
    """Every expert a copy of the dense MLP and the top-k probabilities renormalised: each token's
    experts sum to the dense MLP, so the logits (and the first step's loss) are the dense model's.
    Without renormalising, megatron-core scales the copies to keep the activations' size on average,
    not per token: other logits, which shows the comparison reaches the experts."""
    dense, tokens, reference, recipe = upcycled
    assert np.abs(logits_in_process(recipe, tmp_path / "a", tokens) - reference).max() <= TOLERANCE
    unnormalised = upcycle_recipe(dense, tmp_path / "unnormalised.toml", normalize_topk=False)
    assert np.abs(logits_in_process(unnormalised, tmp_path / "b", tokens) - reference).max() > 100 * TOLERANCE


@pytest.mark.parametrize(
    "overrides, words",
    [
        ([], "neither init.from_hf nor init.from_checkpoint is set"),
        (["model.moe.first_dense_layers=1", "init.from_checkpoint='c'"], "some layers are dense"),
        (["model.moe.shared_expert_ffn_hidden_size=32", "init.from_checkpoint='c'"], "a shared expert has no dense"),
        (["model.moe.ffn_hidden_size=48", "init.from_checkpoint='c'"], "does not split model.ffn_hidden_size=160"),
        (["model.moe.ffn_hidden_size=32", "init.from_checkpoint='c'"], "into a number of slices that divides"),
    ],
)
def test_what_cannot_upcycle_is_refused_on_paper(overrides, words):
    with pytest.raises(BigptError, match=words):
        load_recipe(MOE_RECIPE, ["init.upcycle=true", *overrides])
    with pytest.raises(BigptError, match="init.upcycle = true but model.family='decoder'"):
        load_recipe(MOCK_RECIPE, ["init.upcycle=true", "init.from_checkpoint='c'"])


# --- what cannot be computed identically is refused by name ------------------------------------


def hf_config(model_type: str, **changes) -> dict:
    config = AutoConfig.for_model(model_type, **changes).to_dict()
    return json.loads(json.dumps(config))  # as config.json holds it


@pytest.mark.parametrize(
    "model_type, changes, words",
    [
        ("olmoe", {}, "q_norm/k_norm as wide as all heads"),
        ("deepseek_v2", dict(topk_method="group_limited_greedy"), "'group_limited_greedy' ranks expert groups"),
        ("gpt_oss", {}, "GPT-OSS has biases on its experts and router"),
    ],
)
def test_moe_families_megatron_core_cannot_compute_are_refused_by_name(model_type, changes, words):
    with pytest.raises(BigptError, match=f"model_type '{model_type}' is not supported: .*{words}"):
        model_from_hf(hf_config(model_type, **changes), "config.json")


def test_a_qwen_moe_without_moe_layers_is_refused():
    config = hf_config("qwen3_moe", num_hidden_layers=2, mlp_only_layers=[0, 1])
    with pytest.raises(BigptError, match=r"mlp_only_layers = \[0, 1\] leave no MoE layer"):
        model_from_hf(config, "config.json")


def test_what_no_moe_family_expresses_is_refused_on_export():
    model = model_from_hf(dict(SHAPES["mixtral"], architectures=["MixtralForCausalLM"]), "config.json")
    for change, words in [
        (dict(router_score_function="sigmoid"), "model.moe.router_score_function = 'sigmoid'"),
        (dict(num_groups=2, group_topk=1), "model.moe.num_groups = 2"),
    ]:
        recipe = ModelConfig(**model | {"moe": model["moe"] | change}, seq_length=64)
        with pytest.raises(BigptError, match=f"{words}.* fits none of the Hugging Face families"):
            hf_from_model(recipe, "float32", None)


def test_inspect_names_a_missing_expert(moe_models, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "mixtral"
    directory.mkdir()
    source = moe_models["mixtral"][0]
    (directory / "config.json").write_bytes((source / "config.json").read_bytes())
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(BigptError, match=r"block_sparse_moe.experts.3.w2.weight is missing"):
        inspect_hf(directory)


def test_the_import_writes_an_moe_recipe_table(moe_models):
    model = model_from_hf(json.loads((moe_models["qwen2_moe"][0] / "config.json").read_text()), Path("config.json"))
    assert model["family"] == "moe_decoder"
    assert model["moe"] == dict(
        num_experts=6,
        router_topk=2,
        normalize_topk=False,
        ffn_hidden_size=32,
        shared_expert_ffn_hidden_size=48,
        shared_expert_gate=True,
        layer_pattern=[0, 1, 1, 1],
    )
    assert model_from_hf(dict(SHAPES["qwen3_moe"]), "config.json")["moe"]["layer_pattern"] == [0, 1, 0, 1]


RELEASED = {  # the architecture keys of the released config.json files
    "mixtral_8x7b.toml": dict(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    "qwen2_moe_a2_7b.toml": dict(  # Qwen1.5-MoE-A2.7B
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=60,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=21,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
    ),
    "qwen3_30b_a3b.toml": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        head_dim=128,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        attention_bias=False,
        use_sliding_window=False,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
}


@pytest.mark.parametrize("recipe", RELEASED)
def test_moe_recipes_describe_the_released_models(recipe):
    """init.from_hf with the released config.json would accept each MoE recipe's [model], and an
    export of the recipe's model writes that family."""
    loaded = load_recipe(REPO / "recipes" / recipe)
    check_recipe_matches(loaded.model, model_from_hf(RELEASED[recipe], "config.json"), "config.json")
    assert hf_from_model(loaded.model, "bfloat16", None)["architectures"] == RELEASED[recipe]["architectures"]
