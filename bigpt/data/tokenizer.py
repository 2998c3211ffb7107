"""Tokenizers bigpt reads: a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``.

Both expose the same small surface (``vocab_size``, ``eod``, ``encode``, ``decode``) and
``unique_identifiers``, which megatron-core hashes into its dataset-index cache names. This
module imports no torch or megatron so that preprocessing workers start fast.
"""

import json
from pathlib import Path

from bigpt.errors import BigptError
from bigpt.paths import not_a_file

# Names Hugging Face tokenizers use for their end-of-text token, tried in order when the
# tokenizer.json has no tokenizer_config.json beside it that names one. BERT's WordPiece has
# none and its tokenizer_config.json names no eos_token: its [SEP] ends a segment.
_HF_END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")


class Tokenizer:
    """What the data pipeline needs from a tokenizer; ``eod`` is appended to every document."""

    vocab_size: int
    eod: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def pieces(self) -> list[str]:
        """Every id's piece (token string), by id."""
        raise NotImplementedError

    @property
    def unique_identifiers(self) -> dict:
        # Only what changes the token stream: moving the file keeps the dataset-index cache valid.
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise BigptError(
                f"tokenizer {path} is not a readable SentencePiece model ({err}); "
                "train one with tools/train_tokenizer.py"
            ) from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise BigptError(
                f"tokenizer {path} has no end-of-sentence piece (eos_id is -1), so "
                "documents cannot be separated; train it with an eos piece "
                "(tools/train_tokenizer.py does)"
            )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise BigptError(f"tokenizer {path} is not a readable Hugging Face tokenizer.json ({err})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._end_of_text_id(path)

    def _end_of_text_id(self, path: Path) -> int:
        names = list(_HF_END_OF_TEXT_NAMES)
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos:
                names.insert(0, eos)
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise BigptError(
            f"tokenizer {path} has none of the end-of-text tokens {names}; put a "
            "tokenizer_config.json with an eos_token beside it"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def pieces(self) -> list[str]:
        by_id = {i: piece for piece, i in self._tok.get_vocab(with_added_tokens=True).items()}
        return [by_id.get(i, "") for i in range(self.vocab_size)]


def load_tokenizer(path) -> Tokenizer:
    """Load ``path``: a ``*.json`` file is a Hugging Face tokenizer, anything else SentencePiece."""
    path = Path(path)
    if why := not_a_file(path):
        raise BigptError(
            f"tokenizer file {path} {why}; check data.tokenizer, or make the "
            "demo one with `python tools/prepare_demo.py`"
        )
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)
