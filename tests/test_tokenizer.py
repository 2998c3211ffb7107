"""load_tokenizer (SentencePiece and Hugging Face tokenizer.json) and tools/train_tokenizer.py."""

import importlib.util
import json
from pathlib import Path

import pytest

from bigpt.data import load_tokenizer
from bigpt.errors import EXIT_USER_ERROR, BigptError
from test_data_support import TEST_VOCAB_SIZE, corpus_texts, make_tokenizer, write_jsonl

TOOLS = Path(__file__).resolve().parent.parent / "tools"
TRICKY = "def f(x):\n    return x + 12345  # naïve café, 漢字 and \t tabs  "


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sentencepiece_path(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("sp"))


def hf_tokenizer_json(path: Path, specials: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus_texts(50), trainer)
    tokenizer.save(str(path))
    return path


def test_sentencepiece_round_trips_code_and_unicode(sentencepiece_path):
    tokenizer = load_tokenizer(sentencepiece_path)
    assert tokenizer.vocab_size == TEST_VOCAB_SIZE
    assert tokenizer.eod == 2
    ids = tokenizer.encode(TRICKY)
    assert tokenizer.eod not in ids and max(ids) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == TRICKY


def test_a_hugging_face_tokenizer_json_ends_documents_with_its_end_of_text_token(tmp_path):
    path = hf_tokenizer_json(tmp_path / "tokenizer.json", ["<|endoftext|>"])
    tokenizer = load_tokenizer(path)
    assert tokenizer.eod == 0
    assert tokenizer.vocab_size == 400
    assert tokenizer.decode(tokenizer.encode(TRICKY)) == TRICKY


def test_tokenizer_config_json_names_the_end_of_text_token(tmp_path):
    path = hf_tokenizer_json(tmp_path / "tokenizer.json", ["<pad>", "</s>", "<stop>"])
    assert load_tokenizer(path).eod == 1  # "</s>" is a known name ...
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<stop>"}))
    assert load_tokenizer(path).eod == 2  # ... but the config has the last word


def test_a_tokenizer_json_without_an_end_of_text_token_is_refused(tmp_path):
    path = hf_tokenizer_json(tmp_path / "tokenizer.json", ["<pad>"])
    with pytest.raises(BigptError, match="has none of the end-of-text tokens"):
        load_tokenizer(path)


def test_a_bert_tokenizer_ends_documents_with_its_separator(tmp_path):
    """bert-base-uncased's tokenizer.json has no end-of-text token and its tokenizer_config.json
    names none (transformers writes cls, sep, mask and pad tokens): [SEP] ends a document."""
    path = hf_tokenizer_json(tmp_path / "tokenizer.json", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"sep_token": "[SEP]", "do_lower_case": True}))
    assert load_tokenizer(path).eod == 3


def test_missing_and_unreadable_tokenizers_are_named(tmp_path):
    with pytest.raises(
        BigptError,
        match=r"tokenizer file .*absent\.model does not exist; "
        r"check data\.tokenizer",
    ):
        load_tokenizer(tmp_path / "absent.model")
    (tmp_path / "junk.model").write_bytes(b"\x00junk")
    with pytest.raises(BigptError, match="is not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")


def test_train_tokenizer_cli_writes_a_model_from_jsonl(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_texts(100), field="body")
    code = load_tool("train_tokenizer").main(
        ["--input", str(corpus), "--vocab-size", "400", "--field", "body", "--output-prefix", str(tmp_path / "tok")]
    )
    assert code == 0
    assert load_tokenizer(tmp_path / "tok.model").vocab_size == 400
    assert "wrote" in capsys.readouterr().out


def test_train_tokenizer_cli_adds_the_tokens_masked_objectives_need(tmp_path):
    """--mask-tokens: <pad> and <mask> (what the encoder family's error for a tokenizer without
    them points to); --sentinels: T5's; never produced from text; without them the tokenizer has
    none."""
    from bigpt.data.masked import masked_vocabulary

    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_texts(100))
    tool = load_tool("train_tokenizer")
    for name, flags in (("masked", ["--mask-tokens", "--sentinels", "3"]), ("plain", [])):
        prefix = str(tmp_path / name)
        assert tool.main(["--input", str(corpus), "--vocab-size", "400", "--output-prefix", prefix, *flags]) == 0
    masked = load_tokenizer(tmp_path / "masked.model")
    vocabulary = masked_vocabulary(masked, "masked.model", whole_word=True)
    assert (vocabulary.cls, vocabulary.sep, vocabulary.pad, vocabulary.mask) == (1, 2, 3, 4)
    assert masked.vocab_size == 400 and masked.eod == 2
    assert masked.pieces()[5:8] == ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]  # T5's sentinels
    assert not set(range(3, 8)) & set(masked.encode("a <pad> and a <mask> [MASK] <extra_id_0>"))
    with pytest.raises(BigptError, match=r"has no mask \(\[MASK\] or <mask>\), pad"):
        masked_vocabulary(load_tokenizer(tmp_path / "plain.model"), "plain.model")


def test_train_tokenizer_cli_fails_cleanly_when_the_vocabulary_cannot_be_reached(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ["just a few words"])
    code = load_tool("train_tokenizer").main(
        ["--input", str(corpus), "--vocab-size", "4096", "--output-prefix", str(tmp_path / "tok")]
    )
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("bigpt: error: SentencePiece could not train a 4096-token vocabulary")
    assert "Traceback" not in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.jsonl"]
