"""How passes hand documents on: a folder of JSONL shards, ``RANK.jsonl`` per task."""

from collections.abc import Callable
from pathlib import Path

from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter


class ShardWriter(JsonlWriter):
    """Writes ``RANK.jsonl``, empty when the task kept nothing: the next pass's task RANK reads
    shard RANK (a missing one would shift the shards over the tasks, and a pass that kept
    nothing at all would leave the next one no files to read)."""

    def __init__(self, folder: str | Path):
        super().__init__(str(folder), output_filename="${rank}.jsonl", compression=None)

    def run(self, data, rank: int = 0, world_size: int = 1):
        yield from super().run(data, rank, world_size)
        name = self.output_filename.substitute(rank=str(rank).zfill(5))
        if not self.output_folder.exists(name):
            self.output_folder.open(name, "w").close()


def documents_writer(folder: str | Path) -> ShardWriter:
    return ShardWriter(folder)


def documents_reader(folder: str | Path) -> Callable[[], JsonlReader]:
    """A maker of fresh readers of ``folder`` (each job needs its own)."""
    return lambda: JsonlReader(str(folder), glob_pattern="*.jsonl", compression=None)
