"""The few datatrove blocks bigpt adds: what datatrove has no block for, or loads differently.

Keyword and URL-domain selection keep *or* drop (datatrove's RegexFilter and URLFilter only
drop); the length filter gives its drop reasons; the fastText blocks load a model file from
disk as it is now (datatrove copies a local model into its download cache once and keeps using
that copy after the file is retrained), the MinHash signature step pickles light, and a
plain-text reader reads one document per line.
"""

import json
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from datatrove.data import Document
from datatrove.pipeline.dedup import ExactDedupSignature, MinhashDedupCluster, MinhashDedupSignature
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FastTextClassifierFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.c4_filters import CITATION_REGEX, ELLIPSIS, END_PUNCTUATION
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.lid import FastTextLID
from datatrove.utils.text import PUNCTUATION_SET, split_into_words
from datatrove.utils.word_tokenizers import load_word_tokenizer

from bigpt.curate.inputs import COMPRESSED, InputCutShort, open_decompressed


def load_fasttext(path: str):
    from fasttext.FastText import _FastText

    return _FastText(path)


class LengthFilter(BaseFilter):
    name = "📏 Length"

    def __init__(self, min_words: int, max_words: int):
        super().__init__()
        self.min_words, self.max_words = min_words, max_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        words = len(doc.text.split())
        if words < self.min_words:
            return False, "too_short"
        if words > self.max_words:
            return False, "too_long"
        return True


class GopherQuality(GopherQualityFilter):
    """datatrove's Gopher quality rules on the text's content lines (see ``layout_free``), with
    the alphabetic-word share taken over words as Gopher means them (its word tokenizer makes
    every bracket, comma and full stop a "word", so technical prose and manuals, ``f(x)``,
    ``e.g.,``, fell below 80% alphabetic words) and stop words found in any case (datatrove
    missed THE and OF in a paragraph in capitals, as licenses write their warranty)."""

    def __init__(self, min_alpha_words_ratio: float, min_stop_words: int, **rules):
        super().__init__(max_non_alpha_words_ratio=None, min_stop_words=0, **rules)
        self.min_alpha_words_ratio, self.stop_words_needed = min_alpha_words_ratio, min_stop_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = layout_free(doc.text)
        if not text.strip():  # (datatrove divides by its word count)
            return False, "gopher_short_doc"
        verdict = super().filter(Document(text=text, id=doc.id))
        if verdict is not True:
            return verdict
        words = _words(text, self.language)
        if sum(any(c.isalpha() for c in w) for w in words) < self.min_alpha_words_ratio * len(words):
            return False, "gopher_below_alpha_threshold"
        if len(self.stop_words & {word.lower() for word in words}) < self.stop_words_needed:
            return False, "gopher_enough_stop_words"
        return True


def layout_free(text: str) -> str:
    """``text`` without its lines of layout: lines with no letter or digit (table rules, heading
    underlines, separators, box frames, code fences). The line and repetition rules count
    lines of content; ten ``+----+`` rules of a table are not ten repeated lines, nor ten
    bullet points, nor a line missing its full stop. Blank lines (paragraph breaks) stay."""
    return "\n".join(line for line in text.split("\n") if not line.strip() or any(c.isalnum() for c in line))


CLOSING = ")]}*_`\"'\u201d\u2019\u00bb"
"""Closing brackets, emphasis marks and quotes, read through when looking for a sentence end."""


def ends_sentence(line: str, terminal: tuple[str, ...] = END_PUNCTUATION) -> bool:
    """Whether ``line`` ends a sentence: in ``terminal`` punctuation (C4's . ? ! or a closing
    quote; no ellipsis) or a colon (documentation's sentence that introduces a list or a code
    sample; menus' "Share:" lines are short, and C4 removes lines of fewer than 3 words), also
    when closing marks or a box frame follow it: ``(see below.)``, ``**Note.**``, ``... of the
    License.   *``."""
    line = line.rstrip()
    closed = line.rstrip(CLOSING + " \t")
    return any(text.endswith((*terminal, ":")) and not text.endswith(ELLIPSIS) for text in (line, closed))


def unwrap(text: str, wrap_length: int, joiner: str = " ") -> str:
    """``text`` with hard line wraps replaced by ``joiner``. Web pages break lines between
    paragraphs, menu items and headings, and the C4 and FineWeb line rules read a line so;
    text wrapped at a fixed width (manuals, licenses, READMEs, docstrings) also breaks inside
    sentences. A line of ``wrap_length`` characters or more that does not end a sentence and is
    followed by a non-blank line is read as wrapped; short lines (menus, headings) stay
    lines. 0 = no unwrapping."""
    if not wrap_length:
        return text
    lines = text.splitlines()
    return "".join(
        line + (joiner if _wrapped(line, after, wrap_length) else "\n") for line, after in zip(lines, lines[1:] + [""])
    )[: len(text)]


def _wrapped(line: str, after: str, wrap_length: int) -> bool:
    line = line.rstrip()
    return len(line) >= wrap_length and bool(after.strip()) and not ends_sentence(line)


class C4Quality(C4QualityFilter):
    """datatrove's C4 rules on unwrapped lines (see ``unwrap``): C4 keeps only lines ending in
    terminal punctuation, so in hard-wrapped text it removed every line but a paragraph's last,
    then the document for too few sentences. A line ends a sentence also through closing marks
    (``ends_sentence``). The kept text keeps its line breaks."""

    JOINER = "\u2007"  # a space to str.split, no line break to str.splitlines, rare in text

    def __init__(self, wrap_length: int, filter_no_terminal_punct: bool, **rules):
        super().__init__(filter_no_terminal_punct=False, **rules)
        self.wrap_length, self.sentence_lines_only = wrap_length, filter_no_terminal_punct

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        unwrapped = self.JOINER not in doc.text  # (a text that has it is read line by line)
        if unwrapped:
            doc.text = unwrap(doc.text, self.wrap_length, self.JOINER)
        if self.sentence_lines_only:  # as C4 does it, before its other line rules
            doc.text = "\n".join(
                line for line in doc.text.splitlines() if ends_sentence(CITATION_REGEX.sub("", line).strip())
            )
        verdict = super().filter(doc)
        if unwrapped:
            doc.text = doc.text.replace(self.JOINER, "\n")
        return verdict


class FineWebQuality(FineWebQualityFilter):
    """datatrove's FineWeb line rules on unwrapped content lines (see ``unwrap`` and
    ``layout_free``): the lines of wrapped text are short, rarely end in punctuation, and
    repeat when a phrase does. A line ends in punctuation also through closing marks."""

    def __init__(self, wrap_length: int, line_punct_thr: float, **rules):
        super().__init__(line_punct_thr=0, **rules)
        self.wrap_length, self.min_punct_lines = wrap_length, line_punct_thr

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = unwrap(layout_free(doc.text), self.wrap_length)
        lines = [line for line in text.split("\n") if line.strip()]
        if lines and sum(ends_sentence(line, self.stop_chars) for line in lines) < self.min_punct_lines * len(lines):
            return False, "line_punct_ratio"
        return super().filter(Document(text=text, id=doc.id))


class GopherRepetition(GopherRepetitionFilter):
    """datatrove's Gopher repetition rules on the text's content lines (see ``layout_free``),
    with the n-gram rules over words that are not punctuation (see GopherQuality): n-grams of
    brackets and commas repeat in any technical text, ``( default : None )`` in every other
    line of an API reference."""

    def __init__(self, top_n_grams, dup_n_grams, **rules):
        super().__init__(top_n_grams=(), dup_n_grams=(), **rules)
        self.word_top_n_grams, self.word_dup_n_grams = top_n_grams, dup_n_grams

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = layout_free(doc.text)
        verdict = super().filter(Document(text=text, id=doc.id))
        if verdict is not True:
            return verdict
        words = _words(text, self.language)
        for n, fraction in self.word_top_n_grams:
            n_grams = get_n_grams(words, n)
            if n_grams and find_top_duplicate(n_grams) > fraction * len(text):
                return False, f"top_{n}_gram"
        for n, fraction in self.word_dup_n_grams:
            if find_all_duplicate(words, n) > fraction * len(text):
                return False, f"duplicated_{n}_n_grams"
        return True


def _words(text: str, language: str) -> list[str]:
    """Words as Gopher means them: tokens with a character that is not punctuation."""
    return [word for word in split_into_words(text, language) if not set(word) <= PUNCTUATION_SET]


class KeywordFilter(BaseFilter):
    """Keeps documents with at least ``min_hits`` include keywords (when any are given) and
    none of the exclude keywords; keywords match whole words."""

    name = "🔑 Keywords"

    def __init__(self, include: list[str], exclude: list[str], min_hits: int, case_sensitive: bool):
        super().__init__()
        flags = 0 if case_sensitive else re.IGNORECASE
        self.include = _words_regex(include, flags)
        self.exclude = _words_regex(exclude, flags)
        self.min_hits = min_hits

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.exclude and self.exclude.search(doc.text):
            return False, "excluded_keyword"
        if self.include and sum(1 for _ in self.include.finditer(doc.text)) < self.min_hits:
            return False, "no_included_keyword"
        return True


def _words_regex(words: list[str], flags: int) -> re.Pattern | None:
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(word) for word in words) + r")\b", flags)


class UrlDomainFilter(BaseFilter):
    """Keeps documents whose URL's host is (a subdomain of) an include domain, when any are
    given, and of no exclude domain."""

    name = "🌐 URL domains"

    def __init__(self, include: list[str], exclude: list[str], url_field: str, keep_without_url: bool):
        super().__init__()
        self.include = tuple(domain.lower().strip(".") for domain in include)
        self.exclude = tuple(domain.lower().strip(".") for domain in exclude)
        self.url_field, self.keep_without_url = url_field, keep_without_url

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        url = doc.metadata.get(self.url_field)
        if not url:
            return True if self.keep_without_url else (False, "no_url")
        host = (urlsplit(url if "//" in url else f"//{url}").hostname or "").lower()
        if _in_domains(host, self.exclude):
            return False, "excluded_domain"
        if self.include and not _in_domains(host, self.include):
            return False, "domain_not_included"
        return True


def _in_domains(host: str, domains: tuple[str, ...]) -> bool:
    return any(host == domain or host.endswith("." + domain) for domain in domains)


class _LocalLID(FastTextLID):
    _model: Any  # datatrove's, loaded on first use

    def __init__(self, path: str, languages: list[str]):
        super().__init__(languages)
        self.path = path

    @property
    def model(self):
        if self._model is None:
            self._model = load_fasttext(self.path)
        return self._model


class _AnyFastTextBuild:
    """datatrove checks for the fasttext-numpy2-wheel distribution by name, whose training
    returns NaN here; fasttext-community provides the same ``fasttext`` module and works."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)  # skips only PipelineStep.__new__'s distribution-name check


class LocalLanguageFilter(_AnyFastTextBuild, LanguageFilter):
    """datatrove's LanguageFilter with a language-ID model file from disk."""

    def __init__(self, model_path: str, languages: list[str], min_score: float):
        super().__init__(languages=languages, language_threshold=min_score)
        self.model = _LocalLID(model_path, languages)


class LocalFastTextClassifier(_AnyFastTextBuild, FastTextClassifierFilter):
    """datatrove's FastTextClassifierFilter with the model file read from disk as it is now."""

    _model: Any  # datatrove's, loaded on first use

    @property
    def model(self):
        if self._model is None:
            self._model = load_fasttext(self.model_url)
        return self._model


class MinhashSignatures(MinhashDedupSignature):
    """datatrove's MinHash signature step, pickled without the loaded spaCy pipeline it holds
    (pickling that to each worker took seconds); a worker takes the word tokenizer it
    inherited, or loads it."""

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "word_tokenizer"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.word_tokenizer = load_word_tokenizer(self.language)


class InputOrderExactSignature(ExactDedupSignature):
    """datatrove's exact-dedup signatures, ranked so the first copy in input order survives:
    datatrove keeps the copy with the smallest position inside its task's shard, whatever the
    task; here an earlier task (an earlier part of the input) ranks first, then the position."""

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.priority = 65535 - rank  # 16 bits, highest first (run.MAX_DEDUP_TASKS)
        return super().run(data, rank, world_size)

    def get_hashes(self, doc: Document, doc_idx: int):
        return [(hash_value, self.priority, index) for hash_value, _, index in super().get_hashes(doc, doc_idx)]


class InputOrderCluster(MinhashDedupCluster):
    """datatrove's MinHash clustering, keeping each cluster's first document in input order
    (task, then position in the task's shard); datatrove keeps the root of its union by size."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def root(node):
            while parent.get(node, node) != node:
                parent[node] = node = parent.get(parent[node], parent[node])
            return node

        with self.track_time():
            for name in self.input_folder.list_files(glob_pattern="*.dups"):
                with self.input_folder.open(name, "rb") as pairs:
                    for f1, d1, f2, d2 in read_tuples_from_file(pairs, "4I", lines_to_buffer=self.lines_to_buffer):
                        a, b = root((f1, d1)), root((f2, d2))
                        if a != b:
                            parent[max(a, b)] = min(a, b)
            with self.output_folder.get_output_file_manager(mode="wb") as removed:
                for task, position in sorted(node for node in parent if root(node) != node):
                    removed.write(f"{task:06d}.remove", struct.pack("<I", position))
                    self.stat_update("to_remove")


class CountingJsonlReader(JsonlReader):
    """datatrove's JSONL reader, splitting files by bytes and counting the lines it skips.

    Task r of n reads the lines that start in the r-th n-th of the input's bytes (the files end to
    end, in input order; a compressed file is read whole by the task its first byte falls to),
    so one large file gives every task work, and the tasks in rank order read the input in its
    order. Skipped lines are counted by reason in ``skipped_folder/RANK.json`` (datatrove only
    logs them): blank_line, not_json, no_text (no non-empty string under the text field),
    not_utf8."""

    def __init__(self, data_folder: str, skipped_folder: str, files: list[str], **options):
        super().__init__(data_folder, **options)
        self.skipped_folder, self.files = skipped_folder, files

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        self.skipped: Counter[str] = Counter()
        for filepath, start, end in self._pieces(rank, world_size):
            for document in self._read(filepath, start, end):
                self.update_doc_stats(document)
                yield document
        path = Path(self.skipped_folder) / f"{rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(self.skipped.items()))))

    def _pieces(self, rank: int, world_size: int):
        """(file, first byte, end byte) of this task's share; (file, None, None) for a whole file."""
        sizes = [self.data_folder.size(filepath) for filepath in self.files]
        total = sum(sizes)
        low, high = rank * total // world_size, (rank + 1) * total // world_size
        offset = 0
        for filepath, size in zip(self.files, sizes):
            if filepath.endswith(COMPRESSED):
                if low <= offset < high:
                    yield filepath, None, None
            elif max(low - offset, 0) < min(high - offset, size):
                yield filepath, max(low - offset, 0), min(high - offset, size)
            offset += size

    def _read(self, filepath: str, start: int | None, end: int | None):
        if start is None:
            with open_decompressed(filepath, self.data_folder.open(filepath, "rb")) as lines:
                try:
                    yield from self._documents(lines, filepath, 0, None)
                except EOFError:
                    raise InputCutShort(f"{self.data_folder.path}/{filepath}") from None
            return
        with self.data_folder.open(filepath, "rb") as lines:
            number = 0
            if start:  # the line that starts at or after ``start``, and its number
                number = _newlines(lines, start - 1)
                number += lines.readline().endswith(b"\n")
            yield from self._documents(lines, filepath, number, end)

    def _documents(self, lines, filepath: str, number: int, end: int | None):
        while end is None or lines.tell() < end:
            raw = lines.readline()
            if not raw:
                return
            with self.track_time():
                document = self._document(raw, filepath, number)
            number += 1
            if document:
                yield document

    def _document(self, raw: bytes, filepath: str, number: int) -> Document | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped["not_utf8"] += 1
            return None
        if not line.strip():
            self.skipped["blank_line"] += 1
            return None
        try:
            record = json.loads(line)
        except ValueError:
            self.skipped["not_json"] += 1
            return None
        text = record.get(self.text_key) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            self.skipped["no_text"] += 1
            return None
        return self.get_document_from_dict(record, filepath, number)


def _newlines(binary, size: int) -> int:
    """Line breaks in the first ``size`` bytes of ``binary``, which is left at byte ``size``."""
    binary.seek(0)
    count = 0
    while size > 0:
        chunk = binary.read(min(size, 1 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        size -= len(chunk)
    return count


class TextLineReader(BaseDiskReader):
    """Plain text, one document per line (the format tools/preprocess_data.py also reads)."""

    name = "📄 Text lines"

    def read_file(self, filepath: str):
        with self.data_folder.open(filepath, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines):
                if line.strip():
                    with self.track_time():
                        yield self.get_document_from_dict({self.text_key: line.rstrip("\n")}, filepath, number)
