"""Hugging Face BERT and RoBERTa in and out of the encoder family (bigpt/hf/bert.py), against
transformers as the reference: tiny BertForMaskedLM, BertModel and RobertaForMaskedLM (every norm
and bias randomised) imported, their masked-LM logits computed by tools/logits.py's
``compute_logits`` at TP=1 from the import, and exported back bit for bit; all in this process.
tests/test_hf.py's TP=2 and PP=2 × VPP=2 jobs compute their logits too (``hf_encoders``)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from bigpt.errors import BigptError
from bigpt.hf.config import model_from_hf
from bigpt.recipe import load_recipe
from test_encoder import ENCODER_RECIPE
from test_hf import hf_tensors, recipe_of_model
from test_training_path import world_of_one

TOLERANCE = 1e-4
SHAPE = dict(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    layer_norm_eps=1e-12,
)
MODELS = {  # name -> (class, config); RoBERTa: positions from pad_token_id + 1 = 2, one token type
    "bert": (BertForMaskedLM, BertConfig(**SHAPE, max_position_embeddings=40)),
    "bert_bare": (BertModel, BertConfig(**SHAPE, max_position_embeddings=40)),
    "roberta": (
        RobertaForMaskedLM,
        RobertaConfig(**SHAPE, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1),
    ),
}
SEQ = 24


def save(name: str, directory: Path) -> Path:
    cls, config = MODELS[name]
    torch.manual_seed(len(name))
    model = cls(config)
    with torch.no_grad():  # transformers starts norms at 1 and 0, biases at 0: make them count
        for parameter_name, parameter in model.named_parameters():
            if "LayerNorm" in parameter_name or "layer_norm" in parameter_name or parameter_name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, **{f"w{i}": i for i in range(5, 300)}}
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(directory / "tokenizer.json"))
    (directory / "vocab.txt").write_text("".join(f"{piece}\n" for piece in vocab))  # BertTokenizer's (slow) file
    return directory


def encoder_recipe(path: Path, model: dict, init: str, weights: Path) -> Path:
    """The tiny encoder recipe with ``model`` (the [model] of an import), starting from ``weights``."""
    return recipe_of_model(path, model, init, weights, base=ENCODER_RECIPE, seq_length=SEQ)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (source dir, imported checkpoint, exported dir, bigpt's logits, transformers' logits,
    what the import said)."""
    import contextlib
    import io

    from bigpt.hf.convert import export_hf, import_hf
    from bigpt.layout import Layout
    from bigpt.logits import compute_logits
    from bigpt.runtime.distributed import process_group_of_one

    root = tmp_path_factory.mktemp("hf_encoder")
    # token ids from 2: never RoBERTa's pad id 1 (its positions count real tokens only)
    tokens = torch.randint(2, SHAPE["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(0))
    found = {}
    for name in MODELS:
        source = save(name, root / name)
        imported, exported = root / f"{name}_imported", root / f"{name}_exported"
        said = io.StringIO()
        with process_group_of_one(), contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            model = import_hf(source, imported)
            export_hf(imported, exported)
        recipe = load_recipe(
            encoder_recipe(root / f"{name}.toml", model, "from_checkpoint", imported),
            [f"run_dir={root / name / 'run'}"],
        )
        with world_of_one():
            ours = compute_logits(recipe, Layout.from_recipe(recipe, 1), tokens)
        reference = AutoModelForMaskedLM.from_pretrained(exported if name == "bert_bare" else source).eval()
        with torch.no_grad():
            theirs = reference(input_ids=tokens).logits
        found[name] = (source, imported, exported, ours, theirs, said.getvalue())
    return found


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_masked_lm_logits_of_an_import_match_transformers(converted, name):
    *_, ours, theirs, _ = converted[name]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_roberta_positions_are_counted_from_the_pad_id():
    """Without the rotation by pad_token_id + 1 rows the logits differ: the comparison above sees it."""
    from bigpt.hf.bert import rules

    config = MODELS["roberta"][1].to_dict()
    model = model_from_hf(config, "config.json")
    (positions,) = [rule for rule in rules(model, config) if rule.key == "embedding.position_embeddings.weight"]
    table = torch.arange(42.0).unsqueeze(1)
    assert positions.join([table])[:2, 0].tolist() == [2.0, 3.0]  # the first token's row is 2
    assert torch.equal(positions.split(positions.join([table]))[0], table)


@pytest.mark.parametrize("name", MODELS)
def test_export_of_an_import_reproduces_every_tensor(converted, name):
    source, _, exported, *_ = converted[name]
    cls = MODELS[name][0]
    original, written = hf_tensors(source), hf_tensors(exported)
    masked_lm = BertForMaskedLM if cls is BertModel else cls
    reloaded, info = masked_lm.from_pretrained(exported, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert json.loads((exported / "config.json").read_text())["architectures"] == [masked_lm.__name__]
    for tokenizer_file in ("tokenizer.json", "vocab.txt"):
        assert (exported / tokenizer_file).read_bytes() == (source / tokenizer_file).read_bytes()
    if cls is BertModel:  # the encoder's tensors come back under BertForMaskedLM's names; the pooler is left out
        original = {f"bert.{k}": v for k, v in original.items() if not k.startswith("pooler.")}
        written = {k: v for k, v in written.items() if not k.startswith("cls.")}
    assert sorted(written) == sorted(original)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key


def test_a_bare_bert_model_gets_a_fresh_head_and_is_told_so(converted):
    """BertModel has no masked-LM head: the import makes one as transformers initialises it, and
    says so; the logits of the export (with that head) are bigpt's."""
    source, _, exported, ours, theirs, said = converted["bert_bare"]
    assert "is a BertModel (no masked-LM head): the head" in said and "starts fresh" in said
    assert "left out 2 tensors that masked-LM training does not use (pooler.dense.bias, pooler.dense.weight)" in said
    head = hf_tensors(exported)
    assert torch.equal(head["cls.predictions.bias"], torch.zeros(SHAPE["vocab_size"]))
    assert torch.equal(head["cls.predictions.transform.LayerNorm.weight"], torch.ones(SHAPE["hidden_size"]))
    assert 0.01 < float(head["cls.predictions.transform.dense.weight"].std()) < 0.03  # initializer_range 0.02
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_an_encoder_of_another_shape_or_task_is_refused():
    config = MODELS["bert"][1].to_dict()
    with pytest.raises(BigptError, match="architectures \\['BertForSequenceClassification'\\] is not supported"):
        model_from_hf(dict(config, architectures=["BertForSequenceClassification"]), "config.json")
    with pytest.raises(BigptError, match="position_embedding_type = 'relative_key'"):
        model_from_hf(dict(config, position_embedding_type="relative_key"), "config.json")
    with pytest.raises(BigptError, match="hidden_act = 'gelu_new'"):
        model_from_hf(dict(config, hidden_act="gelu_new"), "config.json")


def test_a_pre_layernorm_encoder_has_no_hugging_face_form():
    from bigpt.hf.config import hf_from_model

    recipe = load_recipe(ENCODER_RECIPE, ['model.encoder.norm_position="pre"'])
    with pytest.raises(BigptError, match="model.encoder.norm_position = 'pre' has no Hugging Face BERT"):
        hf_from_model(recipe.model, "float32", None)
    assert hf_from_model(load_recipe(ENCODER_RECIPE).model, "float32", None)["architectures"] == ["BertForMaskedLM"]


def test_the_imported_model_table_leaves_roberta_its_usable_positions(converted):
    """model.toml's seq_length: RoBERTa's 42-row table gives 40 positions (two are never a token's)."""
    import tomllib

    for name, positions in (("roberta", 40), ("bert", 40)):
        table = tomllib.loads((converted[name][1] / "model.toml").read_text())["model"]
        assert (table["seq_length"], table["max_position_embeddings"]) == (positions, 40 if name == "bert" else 42)


def hf_encoders(root: Path) -> dict:
    """The tiny BertForMaskedLM and RobertaForMaskedLM as tests/test_hf.py's ``models`` entries
    (directory, tokens file, transformers' logits, recipe starting from init.from_hf): its
    TP=2 and PP=2 × VPP=2 jobs compute their logits alongside the decoders'."""
    tokens = torch.randint(2, SHAPE["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(0))
    np.save(root / "encoder_tokens.npy", tokens.numpy())
    found = {}
    for name in ("bert", "roberta"):
        source = save(name, root / name)
        with torch.no_grad():
            theirs = AutoModelForMaskedLM.from_pretrained(source).eval()(input_ids=tokens).logits.numpy()
        model = model_from_hf(json.loads((source / "config.json").read_text()), source)
        recipe = encoder_recipe(root / f"{name}.toml", model, "from_hf", source)
        found[name] = (source, root / "encoder_tokens.npy", theirs, recipe)
    return found


def test_a_released_bert_checkpoints_extras_and_old_names_are_read(converted, tmp_path):
    """bert-base-uncased's file as released: LayerNorm gamma/beta, the pooler and next-sentence
    head, the tied decoder's copies and a position_ids buffer. The extras are left out (the unused
    modules named), the old names read as transformers reads them."""
    import shutil

    from safetensors.torch import save_file

    from bigpt.hf.files import inspect_hf

    source = converted["bert"][0]
    released = tmp_path / "released"
    shutil.copytree(source, released)
    original = hf_tensors(source)
    hidden = SHAPE["hidden_size"]
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in original.items()
    }
    extras = {
        "bert.pooler.dense.weight": torch.zeros(hidden, hidden),
        "bert.pooler.dense.bias": torch.zeros(hidden),
        "cls.seq_relationship.weight": torch.zeros(2, hidden),
        "cls.seq_relationship.bias": torch.zeros(2),
        "cls.predictions.decoder.weight": original["bert.embeddings.word_embeddings.weight"].clone(),
        "cls.predictions.decoder.bias": original["cls.predictions.bias"].clone(),
        "bert.embeddings.position_ids": torch.arange(40).unsqueeze(0),
    }
    save_file(renamed | extras, released / "model.safetensors")
    model, weights = inspect_hf(released)
    assert weights.left_out == sorted(name for name in extras if "pooler" in name or "seq_relationship" in name)
    assert sorted(weights.files) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(weights.get(name), tensor), name


def test_the_continual_recipe_describes_bert_base_uncased():
    """init.from_hf with bert-base-uncased's config.json (transformers' BertConfig defaults) would
    accept the encoder walkthrough's BASE."""
    from bigpt.hf.config import check_recipe_matches

    released = dict(BertConfig().to_dict(), architectures=["BertForMaskedLM"])
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes/continual/bert_base_biomedical.toml")
    check_recipe_matches(recipe.model, model_from_hf(released, "config.json"), "config.json")


def write_sentences(path: Path, words: list[str], documents: int, rng) -> None:
    """JSONL documents of 3 to 6 sentences of random ``words``."""
    lines = []
    for _ in range(documents):
        sentences = [" ".join(rng.choice(words, size=rng.integers(4, 10))) + "." for _ in range(rng.integers(3, 7))]
        lines.append(json.dumps({"text": " ".join(sentences)}) + "\n")
    path.write_text("".join(lines))


@pytest.mark.slow
def test_the_encoder_walkthrough_runs(tmp_path):
    """The encoder walkthrough (docs/huggingface.md), command for command, on a tiny
    BertForMaskedLM with a WordPiece tokenizer as transformers saves BERT's: domain and general
    text tokenized a sentence per sequence, a recipe of one's own on the family's continual one
    (from the released weights, a re-warmed learning rate, a validation set of each), dry run,
    training, export. transformers loads the export as a BertForMaskedLM, whose logits are no
    longer the released model's: it trained, and its domain loss fell."""
    from transformers import AutoTokenizer, BertTokenizerFast

    from multirank import scalars
    from test_hf import run_walkthrough  # test_hf imports this module

    hf = save("bert", tmp_path / "released")
    words = [f"w{i}" for i in range(6, SHAPE["vocab_size"])]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]) + "\n")
    (hf / "tokenizer.json").unlink()  # save()'s stand-in: BERT's own, as save_pretrained writes it
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(hf)
    rng = np.random.default_rng(0)
    write_sentences(tmp_path / "my_domain.jsonl", words[:60], 160, rng)  # a domain of few words
    write_sentences(tmp_path / "general.jsonl", words, 80, rng)
    model = model_from_hf(json.loads((hf / "config.json").read_text()), hf)
    base = encoder_recipe(tmp_path / "base.toml", model, "from_hf", hf)  # stands for BASE
    base.write_text(base.read_text() + "\n[train]\ntrain_iters = 12\n\n[eval]\ninterval = 4\niters = 2\n")
    result = run_walkthrough("encoder walkthrough", tmp_path, None, HF=hf, BASE=base, NPROC=1)

    assert "masked samples hold" in result.stdout  # the dry run: the share of each dataset's tokens
    assert "starting from the weights in" in result.stdout and "step 12/12" in result.stdout
    run = tmp_path / "runs" / "my-encoder"
    lr = scalars(run, "train/lr")
    assert lr[0] < lr[1] == pytest.approx(1e-3)  # BASE's warmup from 0 to its optimizer.lr, then decay
    domain, general = scalars(run, "valid/domain/loss"), scalars(run, "valid/general/loss")
    assert len(domain) == len(general) == 3 and domain != general  # each set its own data, each evaluation
    assert domain[-1] < domain[0]

    out = tmp_path / "hf" / "my-encoder"
    exported, loading = BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not any(loading[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    text = json.loads((tmp_path / "my_domain.jsonl").read_text().splitlines()[0])["text"].split(".")[0] + "."
    tokens = AutoTokenizer.from_pretrained(out)(text, return_tensors="pt")  # [CLS] a sentence [SEP]
    assert tokens["input_ids"].equal(AutoTokenizer.from_pretrained(hf)(text, return_tensors="pt")["input_ids"])
    released = BertForMaskedLM.from_pretrained(hf).eval()
    with torch.no_grad():
        before, after = released(**tokens).logits, exported.eval()(**tokens).logits
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-3
