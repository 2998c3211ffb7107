"""tools/extend_vocab.py: new tokens, from a list or learned from domain text, added to a
SentencePiece model or a Hugging Face tokenizer.json so that text without them tokenizes exactly
as before; the record a continual run grows the vocabulary from (tests/test_hf.py runs that)."""

import json
import random
import sys
from pathlib import Path

import pytest

from bigpt.data.tokenizer import load_tokenizer
from bigpt.data.tokenizer_training import train_tokenizer
from bigpt.data.vocab_extension import read_extension

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import extend_vocab  # noqa: E402  (tools/extend_vocab.py)

GENERAL = ["the", "of", "model", "train", "data", "token", "layer", "weight", "and", "with"]
DOMAIN = ["photosynthesis", "chlorophyll", "mitochondria", "ribosome", "enzymatic"]


def write_corpus(path: Path, words: list[str], lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(lines)))
    return path


def make_corpus(root: Path) -> dict[str, Path]:
    """General text, domain text, and a base tokenizer of each kind trained on the general text."""
    general = write_corpus(root / "general.txt", GENERAL, 2000, 0)
    domain = write_corpus(root / "domain.txt", GENERAL + DOMAIN * 2, 300, 1)
    sp = train_tokenizer([general], 300, root / "base")
    import tokenizers
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Metaspace
    from tokenizers.trainers import BpeTrainer

    hf = tokenizers.Tokenizer(BPE())
    hf.pre_tokenizer = Metaspace()
    hf.decoder = tokenizers.decoders.Metaspace()
    hf.train(
        [str(general)],
        BpeTrainer(
            vocab_size=120,
            special_tokens=["</s>"],
            initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"),
            show_progress=False,
        ),
    )
    (root / "hf").mkdir()
    hf.save(str(root / "hf" / "tokenizer.json"))
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return {"general": general, "domain": domain, "sp": sp, "json": root / "hf" / "tokenizer.json"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("vocab"))


def extend(*args) -> None:
    assert extend_vocab.main([str(arg) for arg in args]) == 0


@pytest.mark.parametrize("kind", ["sp", "json"])
def test_learned_tokens_save_tokens_and_change_nothing_else(corpus, tmp_path, kind, capsys):
    out = tmp_path / ("ext.model" if kind == "sp" else "tokenizer.json")
    extend("--tokenizer", corpus[kind], "--learn", 6, "--text", corpus["domain"], "--out", out)
    said = capsys.readouterr().out
    base, grown = load_tokenizer(corpus[kind]), load_tokenizer(out)
    extension = read_extension(f"{out}.extension.json")
    assert extension.base_vocab_size == base.vocab_size and grown.vocab_size == base.vocab_size + len(extension.tokens)
    assert 0 < len(extension.tokens) <= 6
    new = {token.text for token in extension.tokens}
    general = " ".join(word for word in corpus["general"].read_text().split() if f" {word}" not in new)
    assert grown.encode(general) == base.encode(general)  # no new token in it: the very same ids
    saved = extension.domain_text
    assert saved["tokens_after"] < saved["tokens_before"] and "% fewer" in said
    for token in extension.tokens:  # each new token is one id past the old ones; its pieces the old split
        assert token.id >= base.vocab_size and len(token.pieces) > 1
        assert base.decode(token.pieces).strip() == token.text.strip()
        assert token.id in grown.encode(f"the{token.text} the")


def test_tokens_from_a_list_skip_the_known_ones(corpus, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text(" chlorophyll\n the\n chlorophyll\n ribosome\n")
    out = tmp_path / "ext.model"
    extend("--tokenizer", corpus["sp"], "--tokens", words, "--out", out)
    assert [token.text for token in read_extension(f"{out}.extension.json").tokens] == [" chlorophyll", " ribosome"]
    words.write_text(" the\n")
    refused = ["--tokenizer", str(corpus["sp"]), "--out", str(tmp_path / "x.model")]
    assert extend_vocab.main([*refused, "--tokens", str(words)]) == 2
    assert "none of the tokens given is new" in capsys.readouterr().err
    assert extend_vocab.main([*refused, "--learn", "3"]) == 2
    assert "--learn needs the domain text" in capsys.readouterr().err


def test_learning_more_tokens_than_a_small_text_holds_learns_those_it_holds(corpus, tmp_path):
    """--learn N is "up to N": on domain text too small for the vocabulary N asks SentencePiece
    for, the tokens the text holds are learned (the walkthrough's --learn 2000 on a small text),
    each a whole word, so that text without them tokenizes as before."""
    out = tmp_path / "tokenizer.json"
    extend("--tokenizer", corpus["json"], "--learn", 2000, "--text", corpus["domain"], "--out", out)
    learned = {token.text for token in read_extension(f"{out}.extension.json").tokens}
    assert {" photosynthesis", " mitochondria"} <= learned
    # whole words only: a part such as " th" would be matched inside " the" and split it anew
    assert learned <= {f" {word}" for word in DOMAIN + GENERAL}
    general = corpus["general"].read_text()  # none of the domain's words (the base splits none of its own)
    assert load_tokenizer(out).encode(general) == load_tokenizer(corpus["json"]).encode(general)
