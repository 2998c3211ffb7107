"""Turn raw input lines into token arrays: the part of preprocessing that worker processes run.

Kept free of torch and megatron-core imports so workers start in a blink.
"""

import json
import re
from dataclasses import dataclass, field

import numpy

from bigpt.data.tokenizer import Tokenizer, load_tokenizer

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
"""Inputs with these suffixes hold one JSON object per line; any other file is plain text."""


@dataclass
class EncodedChunk:
    """The documents of a run of input lines, in order, and what was wrong with the rest."""

    documents: list[numpy.ndarray] = field(default_factory=list)
    sequence_lengths: list[list[int]] = field(default_factory=list)
    """Per document, the lengths of its sequences: the whole document, or its sentences."""
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    """(1-based line number, what is wrong) for lines that hold no usable document."""
    empty_lines: int = 0
    input_bytes: int = 0


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
"""Where a sentence ends: after ., ! or ? and white space, or at a line break within a document."""


class DocumentEncoder:
    """One document per line: a JSON object's ``text_field`` for JSONL, else the line itself.

    Every document gets the tokenizer's end-of-document id appended, so documents stay
    separable once megatron-core packs them into fixed-length samples. With ``sentences``, a
    document is written as one sequence per sentence, with no end-of-document id: what
    megatron-core's masked datasets (model.family = "encoder") read, sentences of one document
    packed into a sample (one sequence per document makes each document one truncated sample).
    """

    def __init__(self, tokenizer: Tokenizer, *, jsonl: bool, text_field: str, dtype, sentences: bool = False):
        self.tokenizer, self.dtype = tokenizer, dtype
        self.jsonl, self.text_field, self.sentences = jsonl, text_field, sentences

    def encode_chunk(self, first_line: int, lines: list[bytes]) -> EncodedChunk:
        chunk = EncodedChunk()
        for line_number, raw in enumerate(lines, start=first_line):
            chunk.input_bytes += len(raw)
            try:
                text = document_text(raw, jsonl=self.jsonl, text_field=self.text_field)
            except ValueError as err:
                chunk.bad_lines.append((line_number, str(err)))
                continue
            if not text:
                chunk.empty_lines += 1
                continue
            if self.sentences:
                pieces = [self.tokenizer.encode(sentence) for sentence in SENTENCE_END.split(text) if sentence.strip()]
                pieces = [ids for ids in pieces if ids]
            else:
                pieces = [self.tokenizer.encode(text) + [self.tokenizer.eod]]
            if not pieces:
                chunk.empty_lines += 1
                continue
            chunk.documents.append(numpy.array([i for ids in pieces for i in ids], dtype=self.dtype))
            chunk.sequence_lengths.append([len(ids) for ids in pieces])
        return chunk


def document_text(raw: bytes, *, jsonl: bool, text_field: str) -> str:
    """The document on one input line; ValueError says what is wrong with a bad line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    if not jsonl:
        return line.rstrip("\r\n")
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"not a JSON object with a {text_field!r} field")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"field {text_field!r} is {type(text).__name__}, not a string")
    return text


_worker_encoder: DocumentEncoder | None = None


def encode_in_worker(settings: tuple, first_line: int, lines: list[bytes]) -> EncodedChunk:
    """A worker's task: builds the worker's encoder on its first chunk (errors then reach the
    parent, where a failing worker initializer would break the pool)."""
    global _worker_encoder
    if _worker_encoder is None:
        tokenizer_path, jsonl, text_field, dtype, sentences = settings
        _worker_encoder = DocumentEncoder(
            load_tokenizer(tokenizer_path), jsonl=jsonl, text_field=text_field, dtype=dtype, sentences=sentences
        )
    return _worker_encoder.encode_chunk(first_line, lines)
