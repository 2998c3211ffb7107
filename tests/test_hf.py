"""Hugging Face models in and out, checked against transformers as the independent reference.

Small random models of every family and several shapes (Llama: GQA ratios 2 and 4 and MHA, tied
and untied embeddings, llama3, YaRN and linear RoPE scaling, an explicit head_dim, a vocabulary that needs
padding, sharded safetensors; Qwen2 with q/k/v biases; Qwen3 with per-head q/k norms; Mistral
with a sliding window shorter than the tokens) are built with transformers' own config classes,
every norm weight and bias randomised, and saved with ``save_pretrained``. bigpt imports them
(``init.from_hf`` inside a job, or ``tools/convert_hf.py import``), computes logits with
``tools/logits.py`` at TP=1, TP=2 and PP=2 × VPP=2 (all models of a layout in one job), and must
match transformers' fp32 eager logits; exporting an import gives back every tensor bit for bit.
The continual-pretraining walkthrough (docs/huggingface.md) is run as written. Bad inputs are refused with
errors that name the file or tensor.
"""

import collections
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from bigpt.checkpoint import store
from bigpt.errors import BigptError
from bigpt.hf.config import FAMILIES, check_recipe_matches, hf_from_model, model_from_hf
from bigpt.hf.files import inspect_hf
from bigpt.recipe import ModelConfig, load_recipe, table_to_toml
from multirank import MOCK_RECIPE, REPO, run_bigpt, scalars

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
LLAMA3_SCALING = dict(
    rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
SHAPES = {
    # 2 query heads per key/value head; vocabulary 1100 is padded differently at TP=1 and TP=2.
    "gqa2_untied": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1100,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    # GQA ratio 4, head_dim × heads != hidden, tied embeddings, Llama-3.2-style RoPE scaling.
    "gqa4_tied_llama3": dict(
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=1000,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
        max_position_embeddings=16384,
    ),
    "mha_untied": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        tie_word_embeddings=False,
        rope_theta=20000.0,
    ),
    # Qwen2.5-style: q/k/v biases, tied embeddings (as Qwen2.5 up to 3B), rope_theta 1e6.
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1100,
        tie_word_embeddings=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    # Qwen3: per-head q/k RMSNorm, head_dim × heads != hidden (as Qwen3-0.6B).
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1000,
        tie_word_embeddings=False,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    # Mistral-7B-v0.1-style sliding window, shorter than the 16 tokens compared.
    "mistral_window": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        sliding_window=5,
        tie_word_embeddings=False,
        rope_theta=1e4,
    ),
    # RoPE scalings of released long-context models, with an original context shorter than the
    # 16 tokens compared so that each part of each formula changes the logits (test_the_rope_scaling_matters).
    # Llama 3.1-style with other frequency factors and original length than megatron-core's defaults.
    "llama3_freq_factors": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=10000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=2.0,
            high_freq_factor=16.0,
            original_max_position_embeddings=64,
        ),
        max_position_embeddings=512,
    ),
    # Qwen2.5/Qwen3 long-context spelling: factor and original length only.
    "qwen3_yarn": dict(
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        rope_theta=1e6,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8),
        max_position_embeddings=32,
    ),
    # DeepSeek-V3's spelling ("type", betas, mscale and mscale_all_dim), on a Llama.
    "llama_yarn_mscale": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        rope_theta=10000.0,
        rope_scaling=dict(
            type="yarn",
            factor=8.0,
            original_max_position_embeddings=8,
            beta_fast=16,
            beta_slow=2,
            mscale=0.8,
            mscale_all_dim=0.5,
        ),
        max_position_embeddings=64,
    ),
    "qwen2_linear": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=10000.0,
        rope_scaling=dict(rope_type="linear", factor=4.0),
    ),
}
ROPE_SHAPES = ("llama3_freq_factors", "qwen3_yarn", "llama_yarn_mscale", "qwen2_linear")
FAMILY_SHAPES = ("qwen2", "qwen3", "mistral_window")  # 4 layers each, for PP=2 × VPP=2
LOGITS_OF_MODELS = Path(__file__).resolve().parent / "logits_of_models.py"
FAMILY_ARCHITECTURES = {family.model_type: family.architecture for family in FAMILIES.values()}
SHARDED = "gqa4_tied_llama3"  # saved as several safetensors shards + index
CONVERT = REPO / "tools" / "convert_hf.py"


def save_model(directory: Path, seed: int, shape: dict, **save) -> Path:
    """A random model of ``shape`` (a Llama unless it names another model_type), saved; norm
    weights and biases are randomised too (transformers starts them at one and zero), DeepSeek's
    router bias (a buffer) among them."""
    torch.manual_seed(seed)
    shape = dict(shape)
    config = AutoConfig.for_model(shape.pop("model_type", "llama"), **shape, initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
            elif "norm" in name:
                parameter.normal_(1.0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    model.save_pretrained(directory, **save)
    return directory


def reference_logits(directory: Path, tokens: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def add_tokenizer(directory: Path, size: int) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"</s>": 0, **{f"w{i}": i for i in range(1, size)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="w1"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


class PickleTrap:
    """Unpickling this creates a file: proof that nobody unpickled it."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return open, (str(self.sentinel), "w")


def recipe_for(directory: Path, out: Path, name: str, init: str = "from_hf", weights: Path | None = None) -> Path:
    """The tiny mock recipe with the model of the HF ``directory``, starting from it (init.from_hf)
    or from ``weights`` (init.from_checkpoint)."""
    model = model_from_hf(json.loads((directory / "config.json").read_text()), directory)
    return recipe_of_model(out, model, init, weights or directory, name=name)


def recipe_of_model(
    out: Path, model: dict, init: str, weights: Path, *, base: Path = MOCK_RECIPE, seq_length: int = 64, name=None
) -> Path:
    """The tiny ``base`` recipe with ``model`` (a [model] table, an import's), starting from
    ``weights`` (init.<init>), written to ``out``."""
    out.write_text(
        f'base = "{base}"\nname = "{name or out.stem}"\n\n'
        + table_to_toml("model", dict(model, seq_length=seq_length))
        + f'\n\n[init]\n{init} = "{weights}"\n'
    )
    return out


def logits_of_models(recipes: dict[str, Path], models, root: Path, *overrides: str, nproc: int) -> dict[str, float]:
    """Max |bigpt - transformers| of each named model, its recipe run by tools/logits.py at the
    layout ``overrides`` give (run_dir: root/name), all models in one torchrun job."""
    jobs = []
    for name, recipe in recipes.items():
        (root / name).mkdir(parents=True)
        decoder_tokens = models[name][4:]  # an encoder-decoder's entry names its decoder tokens
        jobs.append(",".join(map(str, (recipe, models[name][1], root / name / "logits.npy", *decoder_tokens))))
    run_bigpt(*jobs, "--", *overrides, nproc=nproc, script=LOGITS_OF_MODELS)
    found = {name: float(np.abs(np.load(root / name / "logits.npy") - models[name][2]).max()) for name in recipes}
    print(found)
    return found


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(CONVERT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF directory, tokens file, transformers' logits, bigpt recipe with init.from_hf)."""
    root = tmp_path_factory.mktemp("hf")
    found = {}
    for seed, (name, shape) in enumerate(SHAPES.items()):
        directory = save_model(root / name, seed, shape, **({"max_shard_size": "100KB"} if name == SHARDED else {}))
        tokens = np.random.default_rng(seed).integers(0, shape["vocab_size"], size=(2, 16))
        np.save(root / f"{name}_tokens.npy", tokens)
        found[name] = (
            directory,
            root / f"{name}_tokens.npy",
            reference_logits(directory, tokens),
            recipe_for(directory, root / f"{name}.toml", name),
        )
    assert (root / SHARDED / "model.safetensors.index.json").is_file()
    add_tokenizer(root / "mha_untied", 300)
    with open(root / "gqa2_untied" / "pytorch_model.bin", "wb") as f:  # next to the safetensors
        pickle.dump(PickleTrap(root / "unpickled"), f)
    return found


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """BERT and RoBERTa (tests/test_hf_encoder.py), as ``models``' entries, for the layout jobs."""
    from test_hf_encoder import hf_encoders

    return hf_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="module")
def t5s(tmp_path_factory):
    """T5 v1.0 and v1.1 (tests/test_hf_t5.py), as ``models``' entries with their decoder tokens."""
    from test_hf_t5 import hf_t5s

    return hf_t5s(tmp_path_factory.mktemp("t5s"))


@pytest.fixture(scope="module")
def tp1(models, tmp_path_factory):
    """name -> (max |bigpt - transformers| at TP=1 with init.from_hf, the run directory holding the import)."""
    root = tmp_path_factory.mktemp("tp1")
    differences = logits_of_models({name: recipe for name, (*_, recipe) in models.items()}, models, root, nproc=1)
    return {name: (difference, root / name) for name, difference in differences.items()}


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers_at_tp1(tp1, name):
    assert tp1[name][0] <= TOLERANCE


def test_the_sliding_window_matters(models):
    """Full attention on the same weights gives other logits: the window is really compared."""
    directory, tokens, reference, _ = models["mistral_window"]
    model = AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32, sliding_window=None
    )
    with torch.no_grad():
        full = model(torch.from_numpy(np.load(tokens))).logits.numpy()
    assert np.abs(full - reference).max() > 100 * TOLERANCE


@pytest.mark.parametrize(
    "name, instead",
    [  # megatron-core's fixed llama3 parameters; YaRN without its attention factor; no scaling
        ("llama3_freq_factors", dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
        ("llama_yarn_mscale", dict(attention_factor=1.0)),
        ("qwen3_yarn", dict(rope_type="default")),
        ("qwen2_linear", dict(rope_type="default")),
    ],
)
def test_the_rope_scaling_matters(models, name, instead):
    """Each scaling's parameters change the logits compared: none of them is compared idly."""
    directory, tokens, reference, _ = models[name]
    config = AutoConfig.from_pretrained(directory)
    config.rope_parameters = {**config.rope_parameters, **instead}
    model = AutoModelForCausalLM.from_pretrained(
        directory, config=config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        other = model(torch.from_numpy(np.load(tokens))).logits.numpy()
    assert np.abs(other - reference).max() > 100 * TOLERANCE


def test_no_pickle_is_loaded(models, tp1):
    directory = models["gqa2_untied"][0]
    assert (directory / "pytorch_model.bin").is_file() and not (directory.parent / "unpickled").exists()


@pytest.mark.parametrize("name", ["gqa2_untied", SHARDED, *FAMILY_SHAPES])  # mha_untied: exported after training below
def test_export_of_an_import_reproduces_every_tensor(models, tp1, tmp_path, name):
    directory, tokens, reference, _ = models[name]
    imported = tp1[name][1] / "init_from_hf"
    out = tmp_path / "exported"
    if name in FAMILY_SHAPES:  # in this process: the tool itself is run for the others and by the walkthrough
        from bigpt.hf.convert import export_hf
        from bigpt.runtime.distributed import process_group_of_one

        with process_group_of_one():
            said = export_hf(imported, out)
    else:
        result = convert("export", str(imported), str(out), *(["--max-shard-gb", "0.0001"] if name == SHARDED else []))
        said = result.stderr
        assert "tokenizer:" not in result.stdout
    # these sources have no tokenizer: the export says so, never "tokenizer ... from"
    assert "WARNING: no tokenizer was exported" in said
    assert "WARNING: no tokenizer was exported" in (out / "README.md").read_text()
    original, exported = hf_tensors(directory), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    # transformers reads back the index, the tied config, the RoPE scaling and each family's config
    assert (out / "model.safetensors.index.json").is_file() == (name == SHARDED)
    assert (
        json.loads((out / "config.json").read_text())["architectures"]
        == json.loads((directory / "config.json").read_text())["architectures"]
    )
    np.testing.assert_array_equal(reference_logits(out, np.load(tokens)), reference)
    if name != SHARDED:  # an export replaces only what an export wrote: never a download, not even the one imported
        before = {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
        refused = convert("export", str(imported), str(directory), check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert (
            f"{directory} exists (a directory with other files) and is not a directory an earlier export "
            "wrote" in refused.stderr
        )
        assert {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()} == before
        convert("export", str(imported), str(out))  # its own earlier export is replaced
        assert sorted(hf_tensors(out)) == sorted(original)


def test_tensor_parallel_2_with_another_vocab_padding(models, encoders, t5s, tmp_path):
    """init.from_hf converted by both ranks; vocab 1100 is padded to 1280 at TP=2 (1152 at TP=1);
    each family's biases and q/k norms are split (or replicated) over the ranks, and each RoPE
    scaling holds on every rank; the encoders' masked-LM logits (vocab 300: 512 at TP=2) too, and
    T5's decoder logits (its relative position bias split over the ranks by head)."""
    names = ["gqa2_untied", *FAMILY_SHAPES, *ROPE_SHAPES]
    others = encoders | t5s
    recipes = {name: models[name][3] for name in names} | {name: other[3] for name, other in others.items()}
    differences = logits_of_models(recipes, models | others, tmp_path, "parallel.tensor=2", nproc=2)
    assert max(differences.values()) <= TOLERANCE, differences


def test_pipeline_parallel_2_interleaved_from_an_imported_checkpoint(models, encoders, tmp_path):
    """tools/convert_hf.py import, then init.from_checkpoint at PP=2 × VPP=2, one layer per chunk
    (tied embeddings: the last stage's output layer loads the embedding); the families and the
    encoders start from init.from_hf at the same layout."""
    directory = models[SHARDED][0]
    imported = tmp_path / "imported"
    convert("import", str(directory), str(imported))
    assert "[model]" in (imported / "model.toml").read_text()
    recipes = {
        SHARDED: recipe_for(directory, tmp_path / "pp2.toml", SHARDED, "from_checkpoint", imported),
        **{name: models[name][3] for name in FAMILY_SHAPES},
        **{name: encoder[3] for name, encoder in encoders.items()},
    }
    differences = logits_of_models(
        recipes, models | encoders, tmp_path, "parallel.pipeline=2", "parallel.virtual_pipeline=2", nproc=2
    )
    assert max(differences.values()) <= TOLERANCE, differences


def readme_walkthrough(marker: str = "walkthrough") -> tuple[str, set[str]]:
    """A walkthrough block (docs/huggingface.md, after ``<!-- marker -->``) without the settings
    lines it starts with, and the names they set."""
    block = (REPO / "docs" / "huggingface.md").read_text().split(f"<!-- {marker} -->\n```sh\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines(keepends=True)
    count = next(i for i, line in enumerate(lines) if not re.match(r"[A-Z]+=", line))
    return "".join(lines[count:]), {line.split("=", 1)[0] for line in lines[:count]}


def run_walkthrough(marker: str, root: Path, words: int | None, **settings) -> subprocess.CompletedProcess:
    """Run the docs/huggingface.md block after ``<!-- marker -->`` in ``root`` (standing for the
    repository root) with its settings lines replaced by ``settings``, on my_domain.jsonl and
    general.jsonl of random words w1 … w{words - 1} (add_tokenizer's vocabulary; None: the
    caller wrote them)."""
    if words is not None:
        rows = np.random.default_rng(0).integers(1, words, size=(300, 24))
        for file, part in (("my_domain.jsonl", rows[:200]), ("general.jsonl", rows[200:])):
            (root / file).write_text(
                "".join(json.dumps({"text": " ".join(f"w{i}" for i in row)}) + "\n" for row in part)
            )
    for folder in ("tools", "launchers"):
        (root / folder).symlink_to(REPO / folder)
    script, names = readme_walkthrough(marker)
    assert names == set(settings)
    env = dict(
        os.environ,
        **{name: str(value) for name, value in settings.items()},
        OMP_NUM_THREADS="1",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def test_the_readme_walkthrough_runs(models, tmp_path):
    """The continual-pretraining walkthrough (docs/huggingface.md), command for command, on a tiny
    Qwen2 at TP=2: tokenize domain and replay text with the model's tokenizer, a recipe of one's
    own on the family's, dry run, train from step 0 with a re-warmed learning rate, export the
    newest checkpoint as the same family with the tokenizer, which transformers loads. (Each
    family's import, layouts and export are the parity and round-trip tests above; this one
    proves the commands, the same for every family.)"""
    name = "qwen2"
    directory, tokens, reference, _ = models[name]
    hf = tmp_path / "released"
    shutil.copytree(directory, hf)
    add_tokenizer(hf, SHAPES[name]["vocab_size"] - 7)
    base = recipe_for(hf, tmp_path / "base.toml", name)  # stands for recipes/continual/<family>.toml
    nproc = 2
    base.write_text(base.read_text() + f"\n[parallel]\ntensor = {nproc}\n")
    result = run_walkthrough("walkthrough", tmp_path, SHAPES[name]["vocab_size"] - 7, HF=hf, BASE=base, NPROC=nproc)
    assert "starting from the weights in" in result.stdout and "step 1/6" in result.stdout
    lr = scalars(tmp_path / "runs" / "my-continual", "train/lr")
    assert lr[0] < lr[1] == pytest.approx(3e-3)  # warmup from 0 to optimizer.lr again, then decay
    out = tmp_path / "hf" / "my-continual"
    assert (
        json.loads((out / "config.json").read_text())["architectures"]
        == json.loads((hf / "config.json").read_text())["architectures"]
    )
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert f"tokenizer: tokenizer.json, tokenizer_config.json from {hf}" in (out / "README.md").read_text()
    trained = reference_logits(out, np.load(tokens))
    assert np.isfinite(trained).all() and np.abs(trained - reference).max() > 1e-3


def test_the_vocabulary_and_context_walkthrough_runs(tmp_path):
    """The walkthrough of a domain run that reaches further (docs/huggingface.md), command for
    command, on a tiny Llama with a tokenizer.json trained at 64 tokens: tokens learned from the
    domain text, data tokenized with them, the import grown and trained at 256 tokens with YaRN
    factor 4, exported. transformers loads the export, tokenizes text without the new tokens as
    the released tokenizer did and domain text in fewer tokens, and computes bigpt's logits of
    the trained checkpoint at the longer length (the YaRN config and the grown rows exported)."""
    from transformers import AutoTokenizer

    import bigpt.logits
    from bigpt.data.tokenizer import load_tokenizer
    from bigpt.data.vocab_extension import read_extension
    from bigpt.layout import Layout
    from bigpt.runtime import megatron_fixes
    from bigpt.runtime.distributed import model_parallel_of_one
    from test_vocab_extension import make_corpus

    (tmp_path / "corpus").mkdir()
    corpus = make_corpus(tmp_path / "corpus")
    released = load_tokenizer(corpus["json"])
    hf = save_model(tmp_path / "released", 0, dict(SMALL, vocab_size=released.vocab_size, max_position_embeddings=64))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(corpus["json"].with_name(name), hf / name)
    base = recipe_for(hf, tmp_path / "base.toml", "tiny")  # stands for recipes/continual/<family>.toml
    base.write_text(base.read_text() + "\n[train]\ntrain_iters = 3\n")
    for file, text in (("my_domain.jsonl", corpus["domain"]), ("general.jsonl", corpus["general"])):
        lines = text.read_text().splitlines()[:300]
        (tmp_path / file).write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    settings = {"HF": hf, "BASE": base, "NPROC": 1, "CONTEXT": 64}
    result = run_walkthrough("walkthrough: vocabulary and context", tmp_path, None, **settings)

    extension = read_extension(tmp_path / "data" / "mine" / "tokenizer.json.extension.json")
    grown = extension.vocab_size
    assert grown > released.vocab_size and "% fewer" in result.stdout
    assert f"vocabulary grown {released.vocab_size} -> {grown} rows" in result.stdout  # the dry run
    assert "model.rope_scaling 'none' -> 'yarn'" in result.stdout
    assert "context          256 tokens, rope_scaling 'yarn' × 4 over 64" in result.stdout
    assert "step 3/3" in result.stdout

    out = tmp_path / "hf" / "my-reach"
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == grown and config["max_position_embeddings"] == 256
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "data" / "mine" / "tokenizer.json").read_bytes()
    assert "tokenizer: tokenizer.json extended by init.extend_vocab" in (out / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out)
    general, domain = corpus["general"].read_text()[:4000], corpus["domain"].read_text()[:4000]
    plain = tokenizer(general, add_special_tokens=False)["input_ids"]
    assert plain == released.encode(general)  # no new token in it: the very ids of the released tokenizer
    assert len(tokenizer(domain, add_special_tokens=False)["input_ids"]) < len(released.encode(domain))

    tokens = np.array([plain[:256], tokenizer(domain, add_special_tokens=False)["input_ids"][:256]])
    assert tokens[0].max() < released.vocab_size <= tokens[1].max()
    trained = sorted((tmp_path / "runs" / "my-reach" / "checkpoints").glob("iter_*"))[-1]
    recipe = load_recipe(recipe_for(out, tmp_path / "trained.toml", "trained", "from_checkpoint", trained))
    recipe = load_recipe(recipe.source, ["model.seq_length=256", f"run_dir={tmp_path / 'logits'}"])
    megatron_fixes.apply()
    with model_parallel_of_one():
        ours = bigpt.logits.compute_logits(recipe, Layout.from_recipe(recipe, 1), torch.from_numpy(tokens)).numpy()
    theirs = reference_logits(out, tokens)
    assert theirs.shape == (2, 256, grown) and np.abs(ours[..., :grown] - theirs).max() <= TOLERANCE
    config = AutoConfig.from_pretrained(out)  # the exported YaRN is what makes them equal
    config.rope_parameters = {**config.rope_parameters, "rope_type": "default"}
    model = AutoModelForCausalLM.from_pretrained(out, config=config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(model(torch.from_numpy(tokens)).logits.numpy() - theirs).max() > 100 * TOLERANCE


# --- bad input: every refusal names what is wrong ----------------------------------------------

SMALL = SHAPES["mha_untied"]


@pytest.fixture
def small(tmp_path):
    return save_model(tmp_path / "small", 0, SMALL)


def refused(directory) -> str:
    with pytest.raises(BigptError) as error:
        inspect_hf(directory)
    return str(error.value)


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_unknown_architecture_is_refused(small):
    edit_config(small, architectures=["PhimoeForCausalLM"], model_type="phimoe")
    assert "PhimoeForCausalLM" in refused(small) and "other architectures are not" in refused(small)


def test_biases_and_other_rope_scaling_are_refused(small):
    edit_config(small, attention_bias=True)
    assert "attention_bias" in refused(small)
    edit_config(
        small,
        attention_bias=False,
        rope_parameters=None,  # the spelling of released checkpoints
        rope_scaling={"type": "dynamic", "factor": 2.0},
    )
    assert "rope_scaling.rope_type = 'dynamic' is not supported (dynamic NTK scaling" in refused(small)
    edit_config(small, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})  # transformers 5
    assert "rope_parameters.rope_type = 'longrope' is not supported (LongRoPE" in refused(small)
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    edit_config(small, rope_parameters={**yarn, "attention_factor": 1.0})
    assert "rope_parameters.attention_factor = 1.0 differs from 1.138" in refused(small)
    edit_config(small, rope_parameters={**yarn, "truncate": False})
    assert "rope_parameters.truncate = False" in refused(small)
    edit_config(small, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4})
    assert "lacks ['low_freq_factor', 'high_freq_factor']" in refused(small)
    edit_config(small, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    assert "partial_rotary_factor = 0.5" in refused(small)


def test_rope_scaling_keys_round_trip_and_are_compared():
    """Each scaling's keys come back from an export as they went in; a checkpoint recorded with
    other values of a key its scaling reads is refused, one of a key it does not read is not."""
    for shape in ROPE_SHAPES:
        config = dict(SHAPES[shape], architectures=None)
        model = model_from_hf(dict(config, model_type=config.get("model_type", "llama")), "config.json")
        recipe = ModelConfig(**model, seq_length=64)
        assert model_from_hf(hf_from_model(recipe, "float32", None), "exported") == model, shape
    yarn = ModelConfig(**model_from_hf(dict(SHAPES["qwen3_yarn"]), "config.json"), seq_length=64)
    saved = vars(ModelConfig(**{**vars(yarn), "rope_beta_fast": 8.0, "rope_low_freq_factor": 3.0}))
    with pytest.raises(BigptError, match=r"model.rope_beta_fast = 32.0 \(the checkpoint has 8.0\)") as error:
        check_recipe_matches(yarn, saved, "ckpt", key="init.from_checkpoint")
    assert "rope_low_freq_factor" not in str(error.value)  # llama3's: YaRN does not read it
    linear = vars(ModelConfig(**{**vars(yarn), "rope_scaling": "linear"}))  # the same factor, another scaling
    with pytest.raises(BigptError, match=r"model.rope_scaling = 'yarn' \(the checkpoint has 'linear'\)"):
        check_recipe_matches(yarn, linear, "ckpt")
    assert check_recipe_matches(yarn, saved, "ckpt", allowed=["rope_beta_fast"]) == ["model.rope_beta_fast 8.0 -> 32.0"]


@pytest.mark.parametrize(
    "model_type, changes, message",
    [
        ("qwen2", dict(use_sliding_window=True, max_window_layers=1), "use_sliding_window = true"),
        ("qwen3", dict(attention_bias=True), "attention_bias = true"),
        ("mistral", dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
    ],
)
def test_what_a_family_cannot_compute_exactly_is_refused(model_type, changes, message):
    config = dict(SMALL, model_type=model_type, architectures=[FAMILY_ARCHITECTURES[model_type]], **changes)
    with pytest.raises(BigptError, match=message):
        model_from_hf(config, "config.json")


def test_mistral_without_a_window_is_mistral_in_and_out():
    """Mistral-7B-v0.3 has no sliding window: the same [model] as a Llama, exported back as Mistral
    (sliding_window null) because its source config says so; with a window it must be Mistral."""
    source = dict(SMALL, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    model = model_from_hf(source, "config.json")
    assert "attention_window" not in model and "rope_scaling_factor" not in model  # no stray keys
    recipe = ModelConfig(**model, seq_length=64)
    assert hf_from_model(recipe, "float32", source)["sliding_window"] is None
    assert hf_from_model(recipe, "float32", None)["architectures"] == ["LlamaForCausalLM"]
    windowed = ModelConfig(**model, seq_length=64, attention_window=16)
    llama = dict(SMALL, model_type="llama", architectures=["LlamaForCausalLM"])
    assert hf_from_model(windowed, "float32", llama)["sliding_window"] == 16
    with pytest.raises(BigptError, match="model.add_qkv_bias = True, model.qk_layernorm = True fits none"):
        hf_from_model(ModelConfig(**model, seq_length=64, add_qkv_bias=True, qk_layernorm=True), "float32", llama)


RELEASED = {  # the architecture keys of the released config.json files
    "qwen2_5_7b_math.toml": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=131072,
        max_window_layers=28,
        max_position_embeddings=131072,
    ),
    "qwen3_8b_legal.toml": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        attention_bias=False,
        tie_word_embeddings=False,
        use_sliding_window=False,
        max_position_embeddings=40960,
    ),
    "mistral_7b_medical.toml": dict(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
}


@pytest.mark.parametrize("recipe", RELEASED)
def test_family_recipes_describe_the_released_models(recipe):
    """init.from_hf with the released config.json would accept each continual recipe's [model]."""
    loaded = load_recipe(REPO / "recipes" / "continual" / recipe)
    check_recipe_matches(loaded.model, model_from_hf(RELEASED[recipe], "config.json"), "config.json")


def test_a_window_shorter_than_the_sequence_is_refused_with_context_parallelism(tmp_path):
    from bigpt.layout import Layout

    recipe = load_recipe(MOCK_RECIPE, ["model.attention_window=32", "parallel.context=2"])
    with pytest.raises(BigptError, match="model.attention_window=32 .* parallel.context=2"):
        Layout.from_recipe(recipe, 2)
    Layout.from_recipe(load_recipe(MOCK_RECIPE, ["model.attention_window=64", "parallel.context=2"]), 2)


def test_missing_tensor_is_named(small):
    tensors = load_file(small / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, small / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight is missing" in refused(small)


def test_unmappable_tensor_is_named(small):
    tensors = load_file(small / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, small / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in refused(small)


def test_shape_contradicting_config_is_named(small):
    edit_config(small, intermediate_size=128)
    message = refused(small)
    assert "model.layers.0.mlp.gate_proj.weight in model.safetensors has shape (96, 64)" in message
    assert "(128, 64)" in message


def test_index_naming_a_missing_shard_is_named(tmp_path):
    directory = save_model(tmp_path / "sharded", 0, SMALL, max_shard_size="100KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    shards[-1].unlink()
    message = refused(directory)
    assert shards[-1].name in message and "model.safetensors.index.json" in message


def test_pickle_only_directory_is_refused(small, tmp_path):
    (small / "model.safetensors").unlink()
    with open(small / "pytorch_model.bin", "wb") as f:
        pickle.dump(PickleTrap(tmp_path / "unpickled"), f)
    assert "pytorch_model.bin" in refused(small) and "safetensors" in refused(small)
    assert not (tmp_path / "unpickled").exists()


def test_tokenizer_larger_than_the_vocabulary_is_named_with_advice_that_works(small):
    size = SMALL["vocab_size"] + 10
    add_tokenizer(small, size)
    assert f"tokenizer.json has {size} tokens" in refused(small) and "resize_token_embeddings" in refused(small)
    model = AutoModelForCausalLM.from_pretrained(small)  # the advice, followed
    model.resize_token_embeddings(size)
    model.save_pretrained(small)
    assert inspect_hf(small)[0]["vocab_size"] == size


def test_recipe_that_does_not_match_the_hf_model_is_refused(small, tmp_path):
    recipe = load_recipe(
        recipe_for(small, tmp_path / "r.toml", "r"), ["model.hidden_size=128", "model.tie_embeddings=true"]
    )
    with pytest.raises(BigptError) as error:
        check_recipe_matches(recipe.model, model_from_hf(json.loads((small / "config.json").read_text()), small), small)
    assert "model.hidden_size = 128 (the checkpoint has 64)" in str(error.value)
    assert "model.tie_embeddings = True" in str(error.value)


def test_dry_run_checks_the_initial_weights_on_paper(small, tmp_path):
    """--dry-run reads configs and tensor headers, never weights: init.from_hf and init.from_checkpoint
    are checked against [model] before a job starts; a checkpoint may change non-shape keys (RoPE base
    for a longer context) when checkpoint.allow_model_changes says so, never shapes."""
    from bigpt.dryrun import describe
    from bigpt.hf.convert import import_hf
    from bigpt.layout import Layout
    from bigpt.runtime.distributed import process_group_of_one

    def report(recipe: Path, *overrides: str) -> str:
        loaded = load_recipe(recipe, [f"run_dir={tmp_path / 'run'}", *overrides])
        return describe(loaded, Layout.from_recipe(loaded, 1))

    from_hf = recipe_for(small, tmp_path / "hf.toml", "hf")
    assert f"initial weights  weights of {small.resolve()} (Hugging Face" in report(from_hf)
    with pytest.raises(BigptError, match=r"init.from_hf = .* model.num_layers = 3 \(the checkpoint has 2\)"):
        report(from_hf, "model.num_layers=3")
    with process_group_of_one():
        import_hf(small, tmp_path / "imported")
    assert "rope_scaling" not in (tmp_path / "imported" / "model.toml").read_text()  # no stray keys
    from_checkpoint = recipe_for(small, tmp_path / "ckpt.toml", "ckpt", "from_checkpoint", tmp_path / "imported")
    with pytest.raises(BigptError, match=r"model.rope_base = 1000000.0 \(the checkpoint has 20000.0\)"):
        report(from_checkpoint, "model.rope_base=1e6")  # other logits: only when asked for
    assert (
        f"initial weights  weights of {tmp_path / 'imported'}, changed by checkpoint.allow_model_changes: "
        "model.rope_base 20000.0 -> 1000000.0"
    ) in report(from_checkpoint, "model.rope_base=1e6", 'checkpoint.allow_model_changes=["rope_base"]')
    with pytest.raises(BigptError, match=r"init.from_checkpoint = .* model.ffn_hidden_size = 128"):
        report(from_checkpoint, "model.ffn_hidden_size=128")
    assert "initial weights  random" in report(MOCK_RECIPE)


def test_import_reads_each_tensor_when_it_is_written(small, tmp_path, monkeypatch):
    """import never holds the model: each checkpoint tensor is read (and joined) from the Hugging
    Face files only once the ones before it are written, one file each, so at most the three
    inputs of one join (q, k, v) are read between two files (bench/hf_import_memory.py measures
    the memory this bounds). Holding the state dict until one save would read all 21 first."""
    from bigpt.hf.convert import import_hf
    from bigpt.hf.files import SafetensorsWeights
    from bigpt.runtime.distributed import process_group_of_one

    get, files_when_read = SafetensorsWeights.get, []

    def watched(self, name):
        files_when_read.append(len(list(tmp_path.rglob("*.distcp"))))
        return get(self, name)

    monkeypatch.setattr(SafetensorsWeights, "get", watched)
    with process_group_of_one():
        import_hf(small, tmp_path / "imported")
    assert len(files_when_read) == len(hf_tensors(small)) == 21  # each read once
    assert max(collections.Counter(files_when_read).values()) <= 3, files_when_read


def test_tool_reports_errors_without_a_traceback(tmp_path):
    result = convert("import", str(tmp_path / "nowhere"), str(tmp_path / "out"), check=False)
    assert result.returncode == 2
    assert "config.json does not exist" in result.stderr and "Traceback" not in result.stderr
    assert "export" in convert("--help").stdout


def test_damaged_files_are_named(small):
    (small / "model.safetensors").write_bytes(b"not safetensors")
    assert "model.safetensors is not a readable safetensors file" in refused(small)


def test_conversion_never_replaces_a_foreign_directory(small, tmp_path):
    from bigpt.hf.convert import import_hf

    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(BigptError, match="refusing to replace it.* pass --overwrite to replace it on purpose"):
        import_hf(small, keep)  # refused before any process group is needed
    assert (keep / "notes.txt").read_text() == "mine"
    trained = tmp_path / "run" / "checkpoints" / "iter_0000030"  # a training checkpoint is no import's to replace
    trained.mkdir(parents=True)
    (trained / "metadata.json").write_text("{}")
    (trained / store.MARKER).write_text(json.dumps({"iteration": 30, "files": store.manifest(trained)}))
    with pytest.raises(BigptError, match="is not a checkpoint an earlier import wrote; refusing to replace it"):
        import_hf(small, trained)
    assert store.is_complete(trained)


def test_init_from_something_that_is_not_a_checkpoint_is_refused(small, tmp_path):
    from bigpt.train.initial import initial_weights

    recipe = load_recipe(recipe_for(small, tmp_path / "r.toml", "r", "from_checkpoint", tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BigptError, match="init.from_checkpoint = .* is not a complete bigpt checkpoint"):
        initial_weights(recipe)


def test_a_continual_run_grows_the_vocabulary(tmp_path):
    """init.extend_vocab: a tiny Llama with a SentencePiece tokenizer, extended by
    tools/extend_vocab.py from domain text. --dry-run reports the growth and the tokens saved; the
    run's model has the new rows (the padded vocabulary recomputed) and, on text without new
    tokens, transformers' logits of the original model; its export is a model transformers loads
    whose old rows are the original ones bit for bit, whose new rows are the mean of their
    pieces' rows, with the extended tokenizer."""
    import bigpt.logits
    from bigpt.data.vocab_extension import read_extension
    from bigpt.dryrun import describe
    from bigpt.hf.convert import export_hf
    from bigpt.layout import Layout
    from bigpt.runtime import megatron_fixes
    from bigpt.runtime.distributed import model_parallel_of_one, process_group_of_one
    from test_vocab_extension import extend, make_corpus

    corpus = make_corpus(tmp_path)
    directory = save_model(tmp_path / "llama", 0, dict(SMALL, vocab_size=300))
    shutil.copyfile(corpus["sp"], directory / "tokenizer.model")
    extended = tmp_path / "ext" / "tokenizer.model"
    extend("--tokenizer", directory / "tokenizer.model", "--learn", 6, "--text", corpus["domain"], "--out", extended)
    extension = read_extension(f"{extended}.extension.json")
    grown = extension.vocab_size
    recipe_file = recipe_for(directory, tmp_path / "grow.toml", "grow")
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"model.vocab_size={grown}",
        "model.make_vocab_size_divisible_by=8",  # 300 rows pad to 304, the grown ones to 312
        f'init.extend_vocab="{extended}.extension.json"',
    ]
    recipe = load_recipe(recipe_file, overrides)
    layout = Layout.from_recipe(recipe, 1)
    said = describe(recipe, layout)
    assert f"vocabulary grown 300 -> {grown} rows ({len(extension.tokens)} new tokens" in said and "% fewer" in said
    with pytest.raises(BigptError, match=f"set model.vocab_size = {grown}"):
        describe(load_recipe(recipe_file, [*overrides, "model.vocab_size=300"]), layout)

    tokens = np.random.default_rng(0).integers(0, 300, size=(2, 16))  # old tokens only
    reference = reference_logits(directory, tokens)
    megatron_fixes.apply()
    with model_parallel_of_one():
        logits = bigpt.logits.compute_logits(recipe, layout, torch.from_numpy(tokens)).numpy()
    assert logits.shape == (2, 16, grown)
    assert np.abs(logits[..., :300] - reference).max() <= TOLERANCE

    out = tmp_path / "exported"
    with process_group_of_one():
        export_hf(tmp_path / "run" / "init_from_hf", out)
    original, exported = hf_tensors(directory), hf_tensors(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert exported[name].shape[0] == grown and torch.equal(exported[name][:300], original[name])
        for token in extension.tokens:
            torch.testing.assert_close(exported[name][token.id], original[name][token.pieces].mean(dim=0))
    assert (out / "tokenizer.model").read_bytes() == extended.read_bytes()
    np.testing.assert_allclose(reference_logits(out, tokens)[..., :300], reference, atol=1e-5, rtol=0)
