"""Train a SentencePiece BPE tokenizer on text or JSONL files.

The defaults suit mixed prose and code: byte fallback (no unknown tokens, any UTF-8 round-trips),
digits split one by one, whitespace kept as written (indentation matters in code), no Unicode
normalisation, and ids unk=0, bos=1, eos=2 with eos as the end-of-document token. With
``mask_tokens``, <pad> (3) and <mask> (4) too: with <s> and </s> as [CLS] and [SEP], what a masked-LM
encoder's samples are framed and masked with (bigpt/data/masked.py); with ``sentinels``, <pad> and
T5's <extra_id_0>, <extra_id_1>, ... after them, which span corruption puts in place of the spans
it drops. None of them is ever produced from text.
"""

import io
import os
from collections.abc import Iterator
from pathlib import Path

from bigpt.data.encode import JSONL_SUFFIXES, document_text
from bigpt.errors import BigptError
from bigpt.paths import not_a_file, replacing_atomically

MAX_SENTENCES = 2_000_000
"""Lines sampled for training; enough for a good vocabulary, bounded in memory and time."""


def train_tokenizer(
    inputs,
    vocab_size: int,
    out_prefix,
    *,
    text_field: str = "text",
    verbose: bool = False,
    key: str = "--output-prefix",
    mask_tokens: bool = False,
    sentinels: int = 0,
) -> Path:
    """Write ``out_prefix.model`` (and ``.vocab``; ``key`` names them to the user) trained on
    ``inputs``; return the model path."""
    import sentencepiece

    paths = [Path(path) for path in inputs]
    for path in paths:
        if why := not_a_file(path):
            raise BigptError(f"input {path} {why}")
    counter = _LineCounter()
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    # Trained into memory and written by bigpt: SentencePiece's own files, on a full disk, are cut
    # short without an error (and the tool said "wrote" and exited 0).
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=counter.count(_training_lines(paths, text_field)),
            model_writer=model,
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
            pad_id=3 if mask_tokens or sentinels else -1,
            control_symbols=["<mask>"] * mask_tokens + [f"<extra_id_{n}>" for n in range(sentinels)],
            num_threads=os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as err:
        if counter.stopped_by:  # Ctrl-C or an error while reading, which SentencePiece reports as its own
            raise counter.stopped_by from None
        if not counter.lines:
            raise BigptError(f"inputs {', '.join(map(str, paths))} hold no text to train on") from None
        raise BigptError(
            f"SentencePiece could not train a {vocab_size}-token vocabulary on "
            f"{counter.lines:,} lines ({err}); change --vocab-size as that says, or "
            "give more text"
        ) from None
    # The .vocab as SentencePiece writes it: each piece and its score.
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{pieces.id_to_piece(i)}\t{pieces.get_score(i):g}\n" for i in range(pieces.get_piece_size()))
    with (  # both written before either is renamed: a failure leaves the old pair whole
        replacing_atomically(f"{out_prefix}.model", key) as model_file,
        replacing_atomically(f"{out_prefix}.vocab", key) as vocab_file,
    ):
        model_file.write_bytes(model.getvalue())
        vocab_file.write_text(vocab, encoding="utf-8")
    return Path(f"{out_prefix}.model")


class _LineCounter:
    def __init__(self):
        self.lines = 0
        self.stopped_by: BaseException | None = None

    def count(self, lines: Iterator[str]) -> Iterator[str]:
        try:
            for line in lines:
                self.lines += 1
                yield line
        except BaseException as err:
            self.stopped_by = err
            raise


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
