"""Hugging Face Llama in and out, checked against transformers as the independent reference.

Small random Llama models of several shapes (GQA ratios 2 and 4 and MHA, tied and untied
embeddings, Llama-3.1 RoPE scaling, an explicit head_dim, a vocabulary that needs padding,
sharded safetensors) are saved with ``save_pretrained``. bigpt imports them (``init.from_hf``
inside a job, or ``tools/convert_hf.py import``), computes logits with ``tools/logits.py`` at
TP=1, TP=2 and PP=2, and must match transformers' fp32 eager logits; exporting an import gives
back every tensor bit for bit. Bad inputs are refused with errors that name the file or tensor.
"""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from bigpt.checkpoint import store
from bigpt.errors import BigptError
from bigpt.hf.config import check_recipe_matches, model_from_hf
from bigpt.hf.files import inspect_hf
from bigpt.recipe import load_recipe, table_to_toml
from multirank import MOCK_RECIPE, REPO, run_bigpt, scalars

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
LLAMA3_SCALING = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
SHAPES = {
    # 2 query heads per key/value head; vocabulary 1100 is padded differently at TP=1 and TP=2.
    "gqa2_untied": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1100, tie_word_embeddings=False, rms_norm_eps=1e-5),
    # GQA ratio 4, head_dim × heads != hidden, tied embeddings, Llama-3.2-style RoPE scaling.
    "gqa4_tied_llama3": dict(hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=16, vocab_size=1000, tie_word_embeddings=True,
                             rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, max_position_embeddings=16384),
    "mha_untied": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False, rope_theta=20000.0),
}
SHARDED = "gqa4_tied_llama3"  # saved as several safetensors shards + index
LOGITS = REPO / "tools" / "logits.py"
CONVERT = REPO / "tools" / "convert_hf.py"


def save_llama(directory: Path, seed: int, shape: dict, **save) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**shape, initializer_range=0.1)).save_pretrained(directory, **save)
    return directory


def reference_logits(directory: Path, tokens: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def add_tokenizer(directory: Path, size: int) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"</s>": 0, **{f"w{i}": i for i in range(1, size)}}
    Tokenizer(WordLevel(vocab, unk_token="w1")).save(str(directory / "tokenizer.json"))
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
    out.write_text(f'base = "{MOCK_RECIPE}"\nname = "{name}"\n\n' + table_to_toml("model", dict(model, seq_length=64))
                   + f'\n\n[init]\n{init} = "{weights or directory}"\n')
    return out


def bigpt_logits(recipe: Path, tokens: Path, out: Path, *overrides: str, nproc: int = 1) -> np.ndarray:
    args = [f"run_dir={out.parent}", "--tokens", str(tokens), "--out", str(out), *overrides]
    if nproc > 1:
        run_bigpt(recipe, *args, nproc=nproc, script=LOGITS)
    else:  # a plain process is a world of one: no torchrun process to start
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        result = subprocess.run([sys.executable, str(LOGITS), str(recipe), *args], capture_output=True, text=True,
                                timeout=300, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(port)))
        assert result.returncode == 0, result.stderr[-4000:]
    return np.load(out)


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(CONVERT), *args], capture_output=True, text=True, timeout=300,
                            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
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
        directory = save_llama(root / name, seed, shape, **({"max_shard_size": "100KB"} if name == SHARDED else {}))
        tokens = np.random.default_rng(seed).integers(0, shape["vocab_size"], size=(2, 16))
        np.save(root / f"{name}_tokens.npy", tokens)
        found[name] = (directory, root / f"{name}_tokens.npy", reference_logits(directory, tokens),
                       recipe_for(directory, root / f"{name}.toml", name))
    assert (root / SHARDED / "model.safetensors.index.json").is_file()
    add_tokenizer(root / "mha_untied", 300)
    with open(root / "gqa2_untied" / "pytorch_model.bin", "wb") as f:  # next to the safetensors
        pickle.dump(PickleTrap(root / "unpickled"), f)
    return found


@pytest.fixture(scope="module")
def tp1(models, tmp_path_factory):
    """name -> (bigpt's logits at TP=1 with init.from_hf, the run directory holding the import)."""
    root = tmp_path_factory.mktemp("tp1")
    results = {}
    for name, (_, tokens, _, recipe) in models.items():
        run_dir = root / name
        run_dir.mkdir()
        results[name] = bigpt_logits(recipe, tokens, run_dir / "logits.npy"), run_dir
    return results


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers_at_tp1(models, tp1, name):
    reference = models[name][2]
    ours, _ = tp1[name]
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= TOLERANCE


def test_no_pickle_is_loaded(models, tp1):
    directory = models["gqa2_untied"][0]
    assert (directory / "pytorch_model.bin").is_file() and not (directory.parent / "unpickled").exists()


@pytest.mark.parametrize("name", ["gqa2_untied", SHARDED])  # mha_untied is exported after training below
def test_export_of_an_import_reproduces_every_tensor(models, tp1, tmp_path, name):
    directory, tokens, reference, _ = models[name]
    imported = tp1[name][1] / "init_from_hf"
    out = tmp_path / "exported"
    convert("export", str(imported), str(out), *(["--max-shard-gb", "0.0001"] if name == SHARDED else []))
    original, exported = hf_tensors(directory), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    if name == SHARDED:  # transformers reads the index, the tied config and the RoPE scaling back
        assert (out / "model.safetensors.index.json").is_file()
        np.testing.assert_array_equal(reference_logits(out, np.load(tokens)), reference)
    else:  # an export replaces only what an export wrote: never a download, not even the one imported
        before = {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
        refused = convert("export", str(imported), str(directory), check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"{directory} exists (a directory with other files) and is not a directory an earlier export " \
               "wrote" in refused.stderr
        assert {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()} == before
        convert("export", str(imported), str(out))  # its own earlier export is replaced
        assert sorted(hf_tensors(out)) == sorted(original)


def test_tensor_parallel_2_with_another_vocab_padding(models, tmp_path):
    """init.from_hf converted by both ranks; vocab 1100 is padded to 1280 at TP=2 (1152 at TP=1)."""
    _, tokens, reference, recipe = models["gqa2_untied"]
    ours = bigpt_logits(recipe, tokens, tmp_path / "logits.npy", "parallel.tensor=2", nproc=2)
    assert np.abs(ours - reference).max() <= TOLERANCE


def test_pipeline_parallel_2_interleaved_from_an_imported_checkpoint(models, tmp_path):
    """tools/convert_hf.py import, then init.from_checkpoint at PP=2 × VPP=2, one layer per chunk
    (tied embeddings: the last stage's output layer loads the embedding)."""
    directory, tokens, reference, _ = models[SHARDED]
    imported = tmp_path / "imported"
    convert("import", str(directory), str(imported))
    assert "[model]" in (imported / "model.toml").read_text()
    recipe = recipe_for(directory, tmp_path / "pp2.toml", "pp2", "from_checkpoint", imported)
    ours = bigpt_logits(recipe, tokens, tmp_path / "logits.npy", "parallel.pipeline=2", "parallel.virtual_pipeline=2",
                        nproc=2)
    assert np.abs(ours - reference).max() <= TOLERANCE


def test_continual_training_from_hf_then_export(models, tmp_path):
    """Train from HF weights at TP=2 (weights only: step 0, learning-rate warmup again), export
    the last checkpoint and load it with transformers, tokenizer included."""
    directory, tokens, reference, recipe = models["mha_untied"]
    run_dir = tmp_path / "run"
    result = run_bigpt(recipe, f"run_dir={run_dir}", "parallel.tensor=2", "train.train_iters=3",
                       "schedule.warmup_iters=2", nproc=2)
    assert "starting from the weights in" in result.stdout and "step 1/3" in result.stdout
    lr = scalars(run_dir, "train/lr")
    assert lr[0] < lr[1] == pytest.approx(3e-3)  # warmup from 0 to optimizer.lr, then decay
    out = tmp_path / "exported"
    convert("export", str(run_dir / "checkpoints" / "iter_0000003"), str(out))
    assert (out / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()
    trained = reference_logits(out, np.load(tokens))
    assert np.isfinite(trained).all() and np.abs(trained - reference).max() > 1e-3


# --- bad input: every refusal names what is wrong ----------------------------------------------

SMALL = SHAPES["mha_untied"]


@pytest.fixture
def small(tmp_path):
    return save_llama(tmp_path / "small", 0, SMALL)


def refused(directory) -> str:
    with pytest.raises(BigptError) as error:
        inspect_hf(directory)
    return str(error.value)


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_unknown_architecture_is_refused(small):
    edit_config(small, architectures=["MixtralForCausalLM"], model_type="mixtral")
    assert "MixtralForCausalLM" in refused(small) and "mixture-of-experts" in refused(small)


def test_biases_and_other_rope_scaling_are_refused(small):
    edit_config(small, attention_bias=True)
    assert "attention_bias" in refused(small)
    edit_config(small, attention_bias=False, rope_parameters={**LLAMA3_SCALING, "low_freq_factor": 2.0, "rope_theta": 1e4})
    assert "rope_scaling.low_freq_factor" in refused(small)
    edit_config(small, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    assert "'yarn'" in refused(small)


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
    directory = save_llama(tmp_path / "sharded", 0, SMALL, max_shard_size="100KB")
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


def test_tokenizer_larger_than_the_vocabulary_is_named(small):
    add_tokenizer(small, SMALL["vocab_size"] + 10)
    assert f"tokenizer.json has {SMALL['vocab_size'] + 10} tokens" in refused(small)


def test_recipe_that_does_not_match_the_hf_model_is_refused(small, tmp_path):
    recipe = load_recipe(recipe_for(small, tmp_path / "r.toml", "r"), ["model.hidden_size=128", "model.tie_embeddings=true"])
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
    from_checkpoint = recipe_for(small, tmp_path / "ckpt.toml", "ckpt", "from_checkpoint", tmp_path / "imported")
    with pytest.raises(BigptError, match=r"model.rope_base = 1000000.0 \(the checkpoint has 20000.0\)"):
        report(from_checkpoint, "model.rope_base=1e6")  # other logits: only when asked for
    assert (f"initial weights  weights of {tmp_path / 'imported'}, changed by checkpoint.allow_model_changes: "
            "model.rope_base 20000.0 -> 1000000.0") in report(from_checkpoint, "model.rope_base=1e6",
                                                               'checkpoint.allow_model_changes=["rope_base"]')
    with pytest.raises(BigptError, match=r"init.from_checkpoint = .* model.ffn_hidden_size = 128"):
        report(from_checkpoint, "model.ffn_hidden_size=128")
    assert "initial weights  random" in report(MOCK_RECIPE)


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
    with pytest.raises(BigptError, match="refusing to replace it"):
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
