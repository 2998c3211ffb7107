"""How passes hand documents on: a folder of JSONL shards, ``RANK.jsonl`` per task."""

from pathlib import Path
from typing import Callable

from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter


def documents_writer(folder: str | Path) -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None)


def documents_reader(folder: str | Path) -> Callable[[], JsonlReader]:
    """A maker of fresh readers of ``folder`` (each job needs its own)."""
    return lambda: JsonlReader(str(folder), glob_pattern="*.jsonl", compression=None)
