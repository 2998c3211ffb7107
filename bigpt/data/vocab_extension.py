"""A domain's own vocabulary: new tokens added to a tokenizer so that text without them
tokenizes exactly as before, and the record a continual run grows the model's embedding and
output layers from (``init.extend_vocab``).

SentencePiece models get the tokens as user-defined pieces, Hugging Face ``tokenizer.json`` files
as added tokens: both are matched in the text before the model's own segmentation, so they change
nothing where they do not occur. Each new token's row starts as the mean of the rows of the
pieces the old tokenizer split it into. No torch here (tools start fast).
"""

import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bigpt.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from bigpt.errors import BigptError
from bigpt.paths import not_a_file

SP_SPACE = "\u2581"  # SentencePiece's visible space


@dataclass
class NewToken:
    text: str
    """As it appears in text (a leading space included)."""
    id: int
    pieces: list[int]
    """The ids the old tokenizer split ``text`` into."""


@dataclass
class VocabExtension:
    """What tools/extend_vocab.py wrote, saved as JSON beside the extended tokenizer."""

    tokenizer: str
    """The extended tokenizer file, relative to the JSON file."""
    base_tokenizer: str
    base_vocab_size: int
    """The old tokenizer's vocabulary."""
    vocab_size: int
    """The extended tokenizer's vocabulary."""
    tokens: list[NewToken]
    domain_text: dict = field(default_factory=dict)
    """On the domain text given: {"files": [...], "tokens_before": n, "tokens_after": m}."""

    def model_vocab_size(self, base_model_vocab: int) -> int:
        """The model's vocabulary once grown: the old model's rows (a released model may have more
        rows than its tokenizer has tokens) and a row for every new id."""
        return max(base_model_vocab, self.vocab_size)

    def saving(self) -> str:
        """A line on the tokens the domain text saves."""
        text = self.domain_text
        if not text:
            return "no domain text was measured (tools/extend_vocab.py --text)"
        before, after = text["tokens_before"], text["tokens_after"]
        return (
            f"domain text {', '.join(text['files'])}: {before:,} tokens -> {after:,} "
            f"({100 * (before - after) / max(before, 1):.1f}% fewer)"
        )


def read_extension(path) -> VocabExtension:
    path = Path(path)
    if why := not_a_file(path):
        raise BigptError(f"init.extend_vocab = {path} {why}; name the .json tools/extend_vocab.py wrote")
    try:
        raw = json.loads(path.read_text())
        raw["tokens"] = [NewToken(**token) for token in raw["tokens"]]
        return VocabExtension(**raw)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BigptError(
            f"init.extend_vocab = {path} is not a vocabulary extension tools/extend_vocab.py wrote ({err})"
        ) from None


def extension_tokenizer(path) -> Path:
    """The extended tokenizer file the extension at ``path`` names."""
    return Path(path).parent / read_extension(path).tokenizer


def _pieces(tokenizer: Tokenizer, text: str) -> list[int]:
    """The old tokenizer's split of a new token's text. SentencePiece marks the start of the text
    with a space of its own (its dummy prefix), which a token's leading space stands for."""
    if isinstance(tokenizer, SentencePieceTokenizer) and text.startswith(" "):
        text = text[1:]
    return tokenizer.encode(text)


def _known(tokenizer: Tokenizer, text: str) -> bool:
    """Whether ``text`` is one token already, or the name of one (which cannot be added twice)."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        if tokenizer._sp.piece_to_id(text.replace(" ", SP_SPACE)) != tokenizer._sp.unk_id():
            return True
    elif isinstance(tokenizer, HuggingFaceTokenizer) and tokenizer._tok.token_to_id(text) is not None:
        return True
    return len(_pieces(tokenizer, text)) < 2


def extend_tokenizer(base_path, tokens: list[str], out_path) -> VocabExtension:
    """Write ``base_path``'s tokenizer with ``tokens`` added to ``out_path`` (same kind), and the
    extension record to ``out_path`` + ".extension.json"; returns the record."""
    base_path, out_path = Path(base_path), Path(out_path)
    base = load_tokenizer(base_path)
    if (base_path.suffix == ".json") != (out_path.suffix == ".json"):
        raise BigptError(f"--out {out_path} must be of the kind of --tokenizer {base_path} (tokenizer.json or .model)")
    new = [text for text in dict.fromkeys(tokens) if text and not _known(base, text)]  # in order, once
    if not new:
        raise BigptError(
            "none of the tokens given is new: each is already one token of the tokenizer (or empty); "
            "give words the tokenizer splits into several pieces"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(base, SentencePieceTokenizer):
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(base_path.read_bytes())
        for text in new:
            piece = proto.pieces.add()
            piece.piece, piece.score = text.replace(" ", SP_SPACE), 0.0
            piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        out_path.write_bytes(proto.SerializeToString())
    else:
        import tokenizers

        extended = tokenizers.Tokenizer.from_file(str(base_path))
        extended.add_tokens([tokenizers.AddedToken(text, normalized=False) for text in new])
        extended.save(str(out_path))
        config = base_path.with_name("tokenizer_config.json")
        if config.is_file() and out_path.parent.resolve() != base_path.parent.resolve():
            shutil.copyfile(config, out_path.with_name("tokenizer_config.json"))  # its eos_token
    grown = load_tokenizer(out_path)
    added = [NewToken(text, _pieces(grown, text)[-1], _pieces(base, text)) for text in new]
    for token in added:
        if _pieces(grown, token.text) != [token.id] or token.id < base.vocab_size:
            raise BigptError(f"token {token.text!r} did not become one new token of {out_path}; report this please")
    return VocabExtension(
        tokenizer=out_path.name,
        base_tokenizer=str(base_path.resolve()),
        base_vocab_size=base.vocab_size,
        vocab_size=grown.vocab_size,
        tokens=added,
    )


def write_extension(extension: VocabExtension, out_path) -> Path:
    path = Path(f"{out_path}.extension.json")
    path.write_text(json.dumps(asdict(extension), indent=1, ensure_ascii=False))
    return path


def read_documents(paths, text_field: str = "text") -> list[str]:
    """The documents of text files (one a line) or JSONL files (``text_field``); bad lines skipped."""
    from bigpt.data.encode import JSONL_SUFFIXES, document_text

    documents = []
    for path in map(Path, paths):
        with open(path, "rb") as stream:
            for raw in stream:
                try:
                    documents.append(document_text(raw, jsonl=path.suffix in JSONL_SUFFIXES, text_field=text_field))
                except ValueError:
                    continue
    return documents


def count_tokens(tokenizer: Tokenizer, documents: list[str]) -> int:
    return sum(len(tokenizer.encode(text)) for text in documents)


def learn_tokens(base: Tokenizer, text_files: list[Path], count: int, *, text_field: str = "text") -> list[str]:
    """Up to ``count`` frequent words of the domain text (with their leading space) that the
    tokenizer splits into several pieces: the word pieces bigpt's tokenizer trainer learns on that
    text, in the order it learns them (the most frequent merges first), that are whole words
    there. A part of a word (" th" of " the") would be matched inside every word it starts, and
    split those differently than before."""
    from bigpt.data.tokenizer_training import train_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        scratch_model = Path(scratch) / "domain"
        try:
            model = train_tokenizer(text_files, count * 8 + 300, scratch_model, text_field=text_field)
        except BigptError as err:
            # A domain text smaller than the vocabulary asked for: SentencePiece names the most
            # pieces it holds; learn from those (up to N new tokens, as --learn promises).
            most = re.search(r"value <= (\d+)", str(err))
            if not most:
                raise
            try:
                model = train_tokenizer(text_files, int(most.group(1)), scratch_model, text_field=text_field)
            except BigptError:
                raise BigptError(
                    f"--text {', '.join(map(str, text_files))} is too small to learn new tokens from (SentencePiece "
                    f"finds at most {most.group(1)} pieces there, bytes and characters included); give more "
                    "domain text, or list the tokens with --tokens"
                ) from None
        domain = load_tokenizer(model)
        assert isinstance(domain, SentencePieceTokenizer)
        sp = domain._sp
        candidates = [
            sp.id_to_piece(i).replace(SP_SPACE, " ")
            for i in range(sp.get_piece_size())
            if sp.is_unknown(i) is False and not sp.is_control(i) and not sp.is_byte(i)
        ]
    words = {word for document in read_documents(text_files, text_field) for word in document.split()}
    found = [
        text
        for text in candidates
        if text.startswith(" ") and len(text) > 2 and text[1:] in words and not _known(base, text)
    ]
    return found[:count]
