"""Text or JSONL corpus → megatron-core indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

The output is written under temporary names and renamed only when complete, so a failed or
interrupted run leaves nothing that looks like a dataset. megatron-core's ``IndexedDataset``
reads the result with no bigpt code involved.
"""

import contextlib
import multiprocessing
import os
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

with warnings.catch_warnings():
    # Importing megatron-core warns about GPU libraries (TE, apex) no data tool uses.
    warnings.simplefilter("ignore", UserWarning)
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

from bigpt.data.encode import JSONL_SUFFIXES, DocumentEncoder, EncodedChunk, encode_in_worker
from bigpt.data.tokenizer import load_tokenizer
from bigpt.errors import BigptError
from bigpt.paths import not_a_file, reporting_a_full_disk

LINES_PER_CHUNK = 256


@dataclass
class PreprocessSummary:
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    bad_lines: int = 0
    empty_lines: int = 0
    seconds: float = 0.0

    def line(self, output_prefix: str) -> str:
        seconds = max(self.seconds, 1e-9)
        return (
            f"wrote {output_prefix}.bin/.idx: {self.documents:,} documents, "
            f"{self.tokens:,} tokens from {self.input_bytes:,} bytes in {self.seconds:.1f} s "
            f"({self.documents / seconds:,.0f} documents/s, {self.tokens / seconds:,.0f} "
            f"tokens/s); skipped {self.bad_lines} bad and {self.empty_lines} empty lines"
        )


def preprocess(
    input_path,
    output_prefix: str,
    tokenizer_path,
    *,
    text_field: str = "text",
    workers: int = 1,
    on_bad_line: str = "stop",
    progress: TextIO | None = None,
    progress_interval_s: float = 2.0,
    sentences: bool = False,
) -> PreprocessSummary:
    """Tokenize every document (one per line) of ``input_path`` and write the indexed dataset.

    JSONL input (``.jsonl``/``.json``/``.ndjson``) takes ``text_field`` of each object; other
    files are plain text. ``on_bad_line`` is "stop" (raise BigptError naming file:line) or
    "skip" (report each on ``progress`` and go on). ``sentences``: one sequence per sentence of a
    document (for masked-LM encoders; ``DocumentEncoder``).
    """
    input_path = Path(input_path)
    if why := not_a_file(input_path):
        raise BigptError(f"input {input_path} {why}")
    if input_path.stat().st_size == 0:
        raise BigptError(f"input {input_path} is empty; give a file with one document per line")
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    jsonl = input_path.suffix in JSONL_SUFFIXES
    chunks = _read_chunks(input_path)
    if workers > 1:
        settings = (str(tokenizer_path), jsonl, text_field, dtype, sentences)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        try:
            encoded = _in_order(pool, settings, chunks, depth=2 * workers)
            return _write(encoded, input_path, output_prefix, dtype, on_bad_line, progress, progress_interval_s)
        finally:
            # On an error too, the chunks in flight are let finish and the rest cancelled: killing
            # a worker while it sends a result larger than a pipe holds loses the queue's lock with
            # it, and multiprocessing.Pool.terminate then waits on that lock forever.
            pool.shutdown(wait=True, cancel_futures=True)
    encoder = DocumentEncoder(tokenizer, jsonl=jsonl, text_field=text_field, dtype=dtype, sentences=sentences)
    encoded = (encoder.encode_chunk(first, lines) for first, lines in chunks)
    return _write(encoded, input_path, output_prefix, dtype, on_bad_line, progress, progress_interval_s)


def _read_chunks(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    with open(path, "rb") as stream:
        first, lines = 1, []
        for line in stream:
            lines.append(line)
            if len(lines) == LINES_PER_CHUNK:
                yield first, lines
                first, lines = first + len(lines), []
        if lines:
            yield first, lines


def _in_order(pool: ProcessPoolExecutor, settings, chunks, depth: int) -> Iterator[EncodedChunk]:
    """Results in input order, with at most ``depth`` chunks in flight (``Executor.map`` would
    read the whole input into memory ahead of the workers)."""
    pending: deque[Future] = deque()
    for first, lines in chunks:
        pending.append(pool.submit(encode_in_worker, settings, first, lines))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write(
    encoded: Iterator[EncodedChunk],
    input_path: Path,
    output_prefix: str,
    dtype,
    on_bad_line: str,
    progress: TextIO | None,
    progress_interval_s: float,
) -> PreprocessSummary:
    final_bin, final_idx = get_bin_path(output_prefix), get_idx_path(output_prefix)
    partial_bin, partial_idx = final_bin + ".partial", final_idx + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    summary, started = PreprocessSummary(), time.monotonic()
    last_report = started
    builder = IndexedDatasetBuilder(partial_bin, dtype=dtype)
    with reporting_a_full_disk(output_prefix, "the output prefix"):
        try:
            for chunk in encoded:
                for line_number, problem in chunk.bad_lines:
                    where = f"{input_path}:{line_number}: {problem}"
                    if on_bad_line == "stop":
                        raise BigptError(
                            f"{where}; fix or remove the line, or pass --on-bad-line skip to leave such lines out"
                        )
                    if progress:
                        print(f"skipping {where}", file=progress)
                for document, lengths in zip(chunk.documents, chunk.sequence_lengths):
                    builder.add_document(document, lengths)
                    summary.tokens += document.size
                summary.documents += len(chunk.documents)
                summary.bad_lines += len(chunk.bad_lines)
                summary.empty_lines += chunk.empty_lines
                summary.input_bytes += chunk.input_bytes
                now = time.monotonic()
                if progress and now - last_report >= progress_interval_s:
                    summary.seconds, last_report = now - started, now
                    print(_progress_line(summary), file=progress, flush=True)
            if not summary.documents:
                raise BigptError(
                    f"input {input_path} has no documents ({summary.bad_lines} bad and "
                    f"{summary.empty_lines} empty lines); nothing was written"
                )
            builder.finalize(partial_idx)
            # A prefix with an .idx is complete, so the old .idx goes first and the new one last.
            if os.path.exists(final_idx):
                os.remove(final_idx)
            os.replace(partial_bin, final_bin)
            os.replace(partial_idx, final_idx)
        finally:
            with contextlib.suppress(OSError):  # already closed on success; a full disk may fail its flush
                builder.data_file.close()
            for leftover in (partial_bin, partial_idx):
                if os.path.exists(leftover):
                    os.remove(leftover)
    summary.seconds = time.monotonic() - started
    return summary


def _progress_line(summary: PreprocessSummary) -> str:
    return (
        f"{summary.documents:,} documents, {summary.tokens:,} tokens, "
        f"{summary.input_bytes / 2**20:,.1f} MiB | "
        f"{summary.documents / summary.seconds:,.0f} documents/s, "
        f"{summary.tokens / summary.seconds:,.0f} tokens/s"
    )
