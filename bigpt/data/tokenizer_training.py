"""Train a SentencePiece BPE tokenizer on text or JSONL files.

The defaults suit mixed prose and code: byte fallback (no unknown tokens, any UTF-8 round-trips),
digits split one by one, whitespace kept as written (indentation matters in code), no Unicode
normalisation, and ids unk=0, bos=1, eos=2 with eos as the end-of-document token.
"""

import os
from collections.abc import Iterator
from pathlib import Path

from bigpt.data.encode import JSONL_SUFFIXES, document_text
from bigpt.errors import BigptError
from bigpt.paths import not_a_file

MAX_SENTENCES = 2_000_000
"""Lines sampled for training; enough for a good vocabulary, bounded in memory and time."""


def train_tokenizer(inputs, vocab_size: int, out_prefix, *, text_field: str = "text", verbose: bool = False) -> Path:
    """Write ``out_prefix.model`` (and ``.vocab``) trained on ``inputs``; return the model path."""
    import sentencepiece

    paths = [Path(path) for path in inputs]
    for path in paths:
        if why := not_a_file(path):
            raise BigptError(f"input {path} {why}")
    counter = _LineCounter()
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    partial_prefix = out_prefix.with_name(out_prefix.name + ".partial")
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=counter.count(_training_lines(paths, text_field)),
            model_prefix=str(partial_prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            character_coverage=0.9995,
            max_sentence_length=16384,
            input_sentence_size=MAX_SENTENCES,
            shuffle_input_sentence=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as err:
        _remove(partial_prefix)
        if not counter.lines:
            raise BigptError(f"inputs {', '.join(map(str, paths))} hold no text to train on") from None
        raise BigptError(
            f"SentencePiece could not train a {vocab_size}-token vocabulary on "
            f"{counter.lines:,} lines ({err}); change --vocab-size as that says, or "
            "give more text"
        ) from None
    for suffix in (".model", ".vocab"):
        os.replace(f"{partial_prefix}{suffix}", f"{out_prefix}{suffix}")
    return Path(f"{out_prefix}.model")


class _LineCounter:
    def __init__(self):
        self.lines = 0

    def count(self, lines: Iterator[str]) -> Iterator[str]:
        for line in lines:
            self.lines += 1
            yield line


def _training_lines(paths: list[Path], text_field: str) -> Iterator[str]:
    """SentencePiece learns from lines, so documents are cut at their newlines."""
    for path in paths:
        jsonl = path.suffix in JSONL_SUFFIXES
        with open(path, "rb") as stream:
            for raw in stream:
                try:
                    text = document_text(raw, jsonl=jsonl, text_field=text_field)
                except ValueError:
                    continue  # preprocessing reports bad lines; training just needs text
                yield from (line for line in text.split("\n") if line.strip())


def _remove(prefix: Path) -> None:
    for suffix in (".model", ".vocab"):
        if os.path.exists(f"{prefix}{suffix}"):
            os.remove(f"{prefix}{suffix}")
