"""Hugging Face T5 and mT5 in and out of the encoder-decoder family (bigpt/hf/t5.py), against
transformers as the reference: tiny T5 v1.0 (ReLU, tied, output scaled; a 3-layer encoder under a
2-layer decoder), T5 v1.1 (gated GELU, untied, d_kv × heads ≠ d_model) and mT5, every norm and
relative position bias random, imported; their decoder logits computed by tools/logits.py's
``compute_logits`` at TP=1 from the import, and exported back bit for bit; all in this process.
tests/test_hf.py's TP=2 job computes their logits too (``hf_t5s``)."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

from bigpt.errors import BigptError
from bigpt.hf.config import model_from_hf
from bigpt.recipe import load_recipe
from test_hf import hf_tensors, recipe_of_model
from test_span_corruption import _sentencepiece
from test_training_path import world_of_one

TOLERANCE = 1e-4
T5_RECIPE = Path(__file__).resolve().parent / "recipes" / "mock_t5.toml"
SHAPE = dict(
    vocab_size=300,
    d_model=32,
    d_ff=64,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)
MODELS = {  # name -> (class, config, untied: the weights hold an lm_head of their own)
    "t5_v1_0": (T5ForConditionalGeneration, T5Config(**SHAPE, d_kv=8, num_layers=3, num_decoder_layers=2), False),
    "t5_v1_1": (
        T5ForConditionalGeneration,
        T5Config(**SHAPE, d_kv=12, num_layers=2, feed_forward_proj="gated-gelu"),
        True,
    ),
    "mt5": (MT5ForConditionalGeneration, MT5Config(**SHAPE, d_kv=8, num_layers=2), True),
}
TOKENIZERS = {"t5_v1_0": "tokenizer.json", "t5_v1_1": "tokenizer.json", "mt5": "spiece.model"}
SEQ, DECODER_SEQ = 24, 16  # longer than the exact buckets: the logarithmic ones are used too


def save(name: str, directory: Path) -> Path:
    """A random model ``name`` as save_pretrained writes it, its norms random too; an untied one as
    the released T5 v1.1 and mT5 files are (an lm_head of its own, tie_word_embeddings false: older
    transformers' spelling, which transformers 5 reads as unscaled). Its tokenizer: a tokenizer.json,
    or mT5's only one, a SentencePiece spiece.model."""
    cls, config, untied = MODELS[name]
    torch.manual_seed(len(name))
    model = cls(config)
    with torch.no_grad():  # transformers starts norms at 1
        for parameter_name, parameter in model.named_parameters():
            if "layer_norm" in parameter_name:
                parameter.normal_(1.0, 0.1)
    model.save_pretrained(directory)
    if untied:  # transformers 5 always ties on creation: give the head weights of its own
        tensors = load_file(directory / "model.safetensors")
        tensors["lm_head.weight"] = torch.randn(SHAPE["vocab_size"], SHAPE["d_model"])
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        edit_config(directory, tie_word_embeddings=False, scale_decoder_outputs=None)
    if name == "mt5":
        shutil.copyfile(
            _sentencepiece(directory.parent / f"{name}_spiece", vocab_size=50), directory / TOKENIZERS[name]
        )
        return directory
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 300)}}
    Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(directory / TOKENIZERS[name]))
    return directory


def edit_config(directory: Path, **changes) -> None:
    """Change config.json's keys (None: remove the key)."""
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder tokens [2, SEQ] and decoder tokens [2, DECODER_SEQ] (the decoder start token first)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, SEQ), generator=generator)
    decoder = torch.randint(0, SHAPE["vocab_size"], (2, DECODER_SEQ), generator=generator)
    decoder[:, 0] = 0
    return tokens, decoder


def reference_logits(directory: Path, tokens: torch.Tensor, decoder: torch.Tensor, **config) -> torch.Tensor:
    cls = MODELS["mt5" if "mt5" in directory.name else "t5_v1_0"][0]
    model = cls.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32, **config).eval()
    with torch.no_grad():
        return model(input_ids=tokens, decoder_input_ids=decoder).logits


def t5_recipe(path: Path, model: dict, init: str, weights: Path) -> Path:
    """The tiny T5 recipe with ``model`` (the [model] of an import), starting from ``weights``."""
    return recipe_of_model(path, model, init, weights, base=T5_RECIPE, seq_length=SEQ)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (source dir, imported checkpoint, exported dir, bigpt's logits, transformers' logits,
    what the import said)."""
    from bigpt.hf.convert import export_hf, import_hf
    from bigpt.layout import Layout
    from bigpt.logits import compute_logits
    from bigpt.runtime.distributed import process_group_of_one

    root = tmp_path_factory.mktemp("hf_t5")
    tokens, decoder = inputs()
    found = {}
    for name in MODELS:
        source = save(name, root / name)
        imported, exported = root / f"{name}_imported", root / f"{name}_exported"
        said = io.StringIO()
        with process_group_of_one(), contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            model = import_hf(source, imported)
            export_hf(imported, exported)
        recipe = load_recipe(
            t5_recipe(root / f"{name}.toml", model, "from_checkpoint", imported), [f"run_dir={root / name / 'run'}"]
        )
        with world_of_one():
            ours = compute_logits(recipe, Layout.from_recipe(recipe, 1), tokens, decoder)
        found[name] = (source, imported, exported, ours, reference_logits(source, tokens, decoder), said.getvalue())
    return found


@pytest.mark.parametrize("name", MODELS)
def test_decoder_logits_of_an_import_match_transformers(converted, name):
    *_, ours, theirs, _ = converted[name]
    assert ours.shape == theirs.shape == (2, DECODER_SEQ, SHAPE["vocab_size"])
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_the_output_scaling_and_the_tying_are_read_as_transformers_reads_them(converted):
    """T5 v1.0's output is scaled by d_model**-0.5 (without it the logits differ: the comparison
    above sees it); v1.1's and mT5's are not, and their output layers are their own."""
    source, *_, theirs, _ = converted["t5_v1_0"]
    unscaled = reference_logits(source, *inputs(), scale_decoder_outputs=False)
    assert (unscaled - theirs).abs().max() > 100 * TOLERANCE
    configs = {name: json.loads((converted[name][0] / "config.json").read_text()) for name in MODELS}
    models = {name: model_from_hf(config, "config.json") for name, config in configs.items()}
    assert [models[name]["tie_embeddings"] for name in MODELS] == [True, False, False]
    assert models["t5_v1_1"]["kv_channels"] * models["t5_v1_1"]["num_attention_heads"] != SHAPE["d_model"]
    assert models["t5_v1_0"]["encoder_decoder"]["encoder_layers"] == 3 and models["t5_v1_0"]["num_layers"] == 2
    # transformers 5 writes tie_word_embeddings = true into every T5 config, with the scaling flag beside it
    spelled_by_5 = dict(configs["t5_v1_1"], tie_word_embeddings=True, scale_decoder_outputs=False)
    assert model_from_hf(spelled_by_5, "config.json") == models["t5_v1_1"]


@pytest.mark.parametrize("name", MODELS)
def test_export_of_an_import_reproduces_every_tensor(converted, name):
    source, _, exported, *_ = converted[name]
    cls = MODELS[name][0]
    original, written = hf_tensors(source), hf_tensors(exported)
    assert sorted(written) == sorted(original)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    reloaded, info = cls.from_pretrained(exported, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [cls.__name__]
    assert getattr(reloaded.config, "scale_decoder_outputs", False) == (name == "t5_v1_0")  # mT5 has no such flag
    assert torch.equal(reloaded.lm_head.weight, original.get("lm_head.weight", original["shared.weight"]))
    tokenizer = TOKENIZERS[name]
    assert (exported / tokenizer).read_bytes() == (source / tokenizer).read_bytes()
    assert f"tokenizer: {tokenizer} from " in (exported / "README.md").read_text()


def test_the_imported_model_table_proposes_t5s_input_length(converted):
    import tomllib

    table = tomllib.loads((converted["t5_v1_1"][1] / "model.toml").read_text())["model"]
    assert table["seq_length"] == 512 and "max_position_embeddings" not in table
    assert table["encoder_decoder"] == {
        "encoder_layers": 2,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 20,
    }


def test_an_untied_t5_saves_its_output_layer_once(converted, tmp_path):
    """megatron-core's T5Model saves its untied output layer under two keys, only one of which may
    change its vocabulary padding (bigpt.runtime.megatron_fixes): saved once, under
    output_layer.weight, which the import writes and whose padding megatron-core adapts."""
    from megatron.core.models.T5.t5_model import T5Model

    from bigpt.layout import Layout
    from bigpt.model import build_model_chunks
    from bigpt.runtime.seeding import seed_everything

    recipe = load_recipe(converted["t5_v1_1"][0].parent / "t5_v1_1.toml", [f"run_dir={tmp_path}"])
    with world_of_one():
        seed_everything(0)
        (chunk,), _ = build_model_chunks(recipe, Layout.from_recipe(recipe, 1))
        fixed = chunk.sharded_state_dict()
        unfixed = T5Model.sharded_state_dict.__wrapped__(chunk)
    assert [key for key in fixed if key.endswith("output_layer.weight")] == ["output_layer.weight"]
    assert fixed["output_layer.weight"].allow_shape_mismatch
    alias = unfixed["lm_head.output_layer.weight"]
    assert alias.key == "lm_head.output_layer.weight" and not alias.allow_shape_mismatch


def test_a_released_checkpoints_copies_and_unused_tensors_are_read(converted, tmp_path):
    """Files as older transformers saved them: the stacks' embed_tokens copies, the tied head's
    copy and the cross-attention's relative bias nobody uses. The copies are dropped, the bias left
    out and named; copies that differ are refused."""
    from bigpt.hf.convert import _import_notes
    from bigpt.hf.files import inspect_hf, read_config

    source = converted["t5_v1_0"][0]
    released = tmp_path / "released"
    shutil.copytree(source, released)
    original = hf_tensors(source)
    unused = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    copies = {name: original["shared.weight"].clone() for name in ("encoder.embed_tokens.weight", "lm_head.weight")}
    save_file(original | copies | {unused: torch.zeros(8, 4)}, released / "model.safetensors")
    model, weights = inspect_hf(released)
    assert model["tie_embeddings"] and weights.left_out == [unused]
    assert sorted(weights.files) == sorted(original)
    assert "left out 1 tensors that T5's cross-attention does not use (transformers ignores them too)" in " ".join(
        _import_notes(read_config(released), weights, released)
    )
    copies["encoder.embed_tokens.weight"][0, 0] += 1
    save_file(original | copies, released / "model.safetensors")
    with pytest.raises(BigptError, match="encoder.embed_tokens.weight differs from shared.weight"):
        inspect_hf(released)


def test_a_scaling_that_disagrees_with_the_tying_is_refused(converted, tmp_path):
    """bigpt scales the output exactly when tied, as every released T5: the other two mixtures,
    which transformers 5 can express, are refused by name before the import writes anything."""
    from bigpt.hf.files import inspect_hf

    for name, scaled, message in (
        ("t5_v1_1", True, "scales the decoder's output .* but lm_head.weight differs from shared.weight"),
        ("t5_v1_0", False, "leaves the decoder's output unscaled .* but the weights hold no lm_head.weight"),
    ):
        directory = tmp_path / name
        shutil.copytree(converted[name][0], directory)
        edit_config(directory, tie_word_embeddings=True, scale_decoder_outputs=scaled)
        with pytest.raises(BigptError, match=message):
            inspect_hf(directory)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="umt5"), "model_type 'umt5' is not supported: UMT5 learns a relative position bias in every"),
        (dict(model_type="longt5"), "model_type 'longt5' is not supported: LongT5's local and transient-global"),
        (dict(model_type="switch_transformers"), "'switch_transformers' is not supported: Switch Transformers' Mix"),
        (dict(architectures=["T5EncoderModel"]), r"architectures \['T5EncoderModel'\] is not supported"),
        (  # as a hand-written config.json states it (save_pretrained writes dense_act_fn and is_gated_act too)
            dict(feed_forward_proj="gated-silu", dense_act_fn=None, is_gated_act=None),
            "feed_forward_proj = 'gated-silu' is not supported",
        ),
        (  # transformers builds the MLP its saved dense_act_fn names, whatever feed_forward_proj says
            dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu", is_gated_act=True),
            r"feed_forward_proj = 'gated-gelu' \(dense_act_fn = 'gelu', is_gated_act = true\) is not supported",
        ),
    ],
)
def test_t5_variants_bigpt_cannot_compute_are_refused_by_name(changes, message):
    config = {key: value for key, value in dict(MODELS["t5_v1_0"][1].to_dict(), **changes).items() if value is not None}
    with pytest.raises(BigptError, match=message):
        model_from_hf(config, "config.json")


def test_an_encoder_decoder_without_a_t5_form_is_refused_on_export():
    from bigpt.hf.config import hf_from_model

    recipe = load_recipe(T5_RECIPE, ['model.activation="gelu"'])
    with pytest.raises(BigptError, match="model.activation = 'gelu' has no Hugging Face T5 form"):
        hf_from_model(recipe.model, "float32", None)
    config = hf_from_model(load_recipe(T5_RECIPE).model, "float32", None)
    assert (config["architectures"], config["num_layers"], config["num_decoder_layers"], config["d_kv"]) == (
        ["T5ForConditionalGeneration"],
        3,
        2,
        24,
    )
    assert config["tie_word_embeddings"] and config["scale_decoder_outputs"]


def test_decoder_tokens_are_for_an_encoder_decoder_and_one_row_per_input(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from logits import read_decoder_tokens  # tools/logits.py

    from multirank import MOCK_RECIPE

    tokens, decoder = inputs()
    np.save(tmp_path / "decoder.npy", decoder.numpy())
    np.save(tmp_path / "one_row.npy", decoder[:1].numpy())
    t5 = load_recipe(T5_RECIPE)
    assert np.array_equal(read_decoder_tokens(str(tmp_path / "decoder.npy"), t5, tokens.numpy()), decoder.numpy())
    assert read_decoder_tokens(None, t5, tokens.numpy()) is None
    with pytest.raises(BigptError, match="--decoder-tokens = .* has 1 rows and --tokens 2"):
        read_decoder_tokens(str(tmp_path / "one_row.npy"), t5, tokens.numpy())
    with pytest.raises(BigptError, match="model.family = 'decoder' has no decoder that reads other tokens"):
        read_decoder_tokens(str(tmp_path / "decoder.npy"), load_recipe(MOCK_RECIPE), tokens.numpy())


def hf_t5s(root: Path) -> dict:
    """The tiny T5 v1.0 and v1.1 as tests/test_hf.py's ``models`` entries (directory, tokens file,
    transformers' logits, recipe starting from init.from_hf, decoder tokens file): its TP=2 job
    computes their logits alongside the decoders'."""
    tokens, decoder = inputs()
    np.save(root / "t5_tokens.npy", tokens.numpy())
    np.save(root / "t5_decoder_tokens.npy", decoder.numpy())
    found = {}
    for name in ("t5_v1_0", "t5_v1_1"):
        source = save(name, root / name)
        model = model_from_hf(json.loads((source / "config.json").read_text()), source)
        recipe = t5_recipe(root / f"{name}.toml", model, "from_hf", source)
        theirs = reference_logits(source, tokens, decoder).numpy()
        found[name] = (source, root / "t5_tokens.npy", theirs, recipe, root / "t5_decoder_tokens.npy")
    return found
