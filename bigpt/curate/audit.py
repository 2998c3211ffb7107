"""Count what each stage keeps and drops: documents and words, per drop reason, per task.

Each audited stage writes ``work/audit/NN_STAGE/RANK.json`` when its task finishes (before
datatrove marks the task complete), so an interrupted run's counts are redone with its task
and the report sums exactly one file per task.
"""

import json
from collections import deque
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result

from bigpt.paths import write_atomically

LENGTH_BINS = 24
"""Histogram bin b holds documents of 2**(b-1) <= words < 2**b (bin 0: no words); the last
bin holds everything longer."""

SKIPPED_LINES = "audit/skipped_lines"
"""Per task, the input lines the JSONL reader skipped, by reason: work/audit/skipped_lines/RANK.json."""

EDITED = "edited_lines"
"""Pseudo drop reason: words a stage removed from documents it kept (C4 removes lines)."""


def word_count(text: str) -> int:
    return len(text.split())


def length_bin(words: int) -> int:
    return min(words.bit_length(), LENGTH_BINS - 1)


EXCERPT_CHARACTERS = 240


class Tally:
    """One task's counts for one stage, and the first ``excerpts`` dropped documents per reason."""

    def __init__(self, excerpts: int = 0):
        self.counts = {"in": [0, 0], "kept": [0, 0]}
        self.dropped: dict[str, list[int]] = {}
        self.hist_in = [0] * LENGTH_BINS
        self.hist_kept = [0] * LENGTH_BINS
        self.excerpts_per_reason = excerpts
        self.excerpts: dict[str, list[dict]] = {}

    def add(self, side: str, words: int, reason: str | None = None) -> None:
        """side: "in", "kept" or "dropped" (with a reason)."""
        if side == "dropped":
            assert reason is not None, "a dropped document has a reason"
            counts = self.dropped.setdefault(reason, [0, 0])
        else:
            counts = self.counts[side]
        counts[0] += 1
        counts[1] += words
        if side != "dropped":
            (self.hist_in if side == "in" else self.hist_kept)[length_bin(words)] += 1

    def drop(self, doc: Document, words: int, reason: str) -> None:
        self.add("dropped", words, reason)
        excerpts = self.excerpts.setdefault(reason, [])
        if len(excerpts) < self.excerpts_per_reason:
            excerpts.append({"id": doc.id, "words": words, "text": " ".join(doc.text.split())[:EXCERPT_CHARACTERS]})

    def add_words_removed(self, words: int) -> None:
        if words:
            self.dropped.setdefault(EDITED, [0, 0])[1] += words

    def save(self, folder: str, rank: int) -> None:
        path = Path(folder) / f"{rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "in": self.counts["in"],
            "kept": self.counts["kept"],
            "dropped": self.dropped,
            "hist_in": self.hist_in,
            "hist_kept": self.hist_kept,
            "excerpts": {reason: found for reason, found in self.excerpts.items() if found},
        }
        write_atomically(path, json.dumps(record))


class AuditedFilter(BaseFilter):
    """A datatrove filter, counted per drop reason (``default_reason`` when it gives none)."""

    def __init__(self, inner: BaseFilter, folder: str, default_reason: str, excerpts: int = 0):
        self.name = inner.name  # before the base class names its stats after it
        super().__init__(batch_size=inner.batch_size)
        self.inner, self.folder, self.default_reason, self.excerpts = inner, folder, default_reason, excerpts

    def filter(self, doc: Document):
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]):
        words_in = [word_count(doc.text) for doc in batch]
        results = self.inner.filter_batch(batch)
        for doc, words, result in zip(batch, words_in, results):
            self.tally.add("in", words)
            keep, reason = get_filter_result(result)
            if keep:
                words_kept = word_count(doc.text)
                self.tally.add("kept", words_kept)
                self.tally.add_words_removed(words - words_kept)
            else:
                self.tally.drop(doc, words, reason or self.default_reason)
        return results

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.tally = Tally(self.excerpts)
        yield from super().run(data, rank, world_size)
        self.tally.save(self.folder, rank)


class AuditedStep(PipelineStep):
    """A step that only drops documents (a dedup filter): what goes in and does not come out
    is counted under ``reason``."""

    def __init__(self, inner: PipelineStep, folder: str, reason: str, excerpts: int = 0):
        super().__init__()
        self.inner, self.folder, self.reason, self.excerpts = inner, folder, reason, excerpts
        self.name, self.type = inner.name, inner.type
        self.stats = inner.stats  # datatrove's stats.json shows the inner step's own counts

    def run(self, data, rank: int = 0, world_size: int = 1):
        tally = Tally(self.excerpts)
        entered: deque[tuple[Document, int]] = deque()

        def counted(documents):
            for doc in documents:
                words = word_count(doc.text)
                tally.add("in", words)
                entered.append((doc, words))
                yield doc

        for doc in self.inner.run(counted(data), rank, world_size):
            while entered[0][0] is not doc:  # order is kept: what entered before it was dropped
                tally.drop(*entered.popleft(), self.reason)
            tally.add("kept", entered.popleft()[1])
            yield doc
        for dropped, words in entered:
            tally.drop(dropped, words, self.reason)
        tally.save(self.folder, rank)
