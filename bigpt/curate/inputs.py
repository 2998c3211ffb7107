"""The raw corpus: which files, whether they can be read, and the datatrove reader for them.

Everything is checked before any work starts: a missing path, no matching file, a file that
cannot be opened, or a first record without the text field is a BigptError naming the file.
"""

import bz2
import gzip
import io
import json
import lzma
import os
from pathlib import Path
from typing import BinaryIO

from bigpt.curate.recipe import InputConfig
from bigpt.errors import BigptError

DEFAULT_GLOBS = {"jsonl": "*.jsonl*", "parquet": "*.parquet", "text": "*.txt"}


def input_files(config: InputConfig) -> list[Path]:
    """The input files in a fixed order (sorted paths), each checked to be readable."""
    path = Path(config.path)
    if not path.exists():
        raise BigptError(
            f"input.path {path} does not exist; check the path (a relative one is relative to the recipe file "
            "that sets it, or to the working directory when set on the command line)."
        )
    if path.is_file():
        files = [path]
    else:
        pattern = config.glob or DEFAULT_GLOBS[config.format]
        files = sorted(p for p in path.rglob(pattern) if p.is_file())
        if not files:
            raise BigptError(
                f"input.path {path} has no file matching {pattern!r}; set input.glob or input.format ({config.format})."
            )
    for file in files:
        _check_readable(file, config)
    return files


def _check_readable(file: Path, config: InputConfig) -> None:
    if not os.access(file, os.R_OK):
        raise BigptError(f"input file {file} cannot be read (permissions); fix them or remove it from input.path.")
    try:
        if config.format == "parquet":
            import pyarrow.parquet

            columns = pyarrow.parquet.read_schema(file).names
            if config.text_field not in columns:
                raise BigptError(
                    f"input file {file} has no column {config.text_field!r} "
                    f"(input.text_field); its columns: {', '.join(columns)}."
                )
        elif config.format == "jsonl":
            _check_first_json_line(file, config.text_field)
        else:
            with _open_text(file) as lines:
                lines.readline()
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise BigptError(f"input file {file} cannot be read as {config.format}: {err}.") from None
    except Exception as err:  # pyarrow's errors have no common base worth importing here
        if isinstance(err, BigptError):
            raise
        raise BigptError(f"input file {file} cannot be read as {config.format}: {err}.") from None


def _check_first_json_line(file: Path, text_field: str) -> None:
    """The first line with text is a JSON object with the text field; blank lines and lines that
    are not UTF-8 before it are skipped (and counted) by the run, as anywhere else."""
    with open_decompressed(file) as binary:
        for number, raw in enumerate(binary, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BigptError(
                    f"input file {file}:{number} is not JSON ({err}); input.format is jsonl (one JSON object per line)."
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise BigptError(f"input file {file}:{number} has no string field {text_field!r} (input.text_field).")
            return


def _open_text(file: Path):
    return io.TextIOWrapper(open_decompressed(file), encoding="utf-8")


COMPRESSED = (".gz", ".zst", ".zstd", ".bz2", ".xz")
CUT_SHORT = "Compressed file ended before the end-of-stream marker was reached"  # Python's own words


class InputCutShort(Exception):
    """Raised in a worker (and sent to the main process) when a compressed input file ends before
    its stream does: a download or copy that did not finish."""

    def __init__(self, file: str):
        super().__init__(file)
        self.file = file

    def refusal(self) -> BigptError:
        return BigptError(
            f"input file {self.file} is cut short: its compressed stream ends before its end marker (a "
            "download or copy that did not finish). Fetch the file again, or remove it from input.path, "
            "then run the same command again (finished shards are kept)."
        )


def open_decompressed(file: Path | str, binary: BinaryIO | None = None) -> BinaryIO:
    """The lines of ``file`` (read from ``binary`` when given), decompressed by its suffix: a
    stream that ends before its end marker (a download cut short) raises EOFError, for zstd too
    (whose reader would just stop)."""
    binary = binary or open(file, "rb")
    name = str(file)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=binary)  # type: ignore[return-value]
    if name.endswith(".bz2"):
        return bz2.BZ2File(binary)  # type: ignore[return-value]
    if name.endswith(".xz"):
        return lzma.LZMAFile(binary)  # type: ignore[return-value]
    if name.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdFrames(binary))
    return binary


class _ZstdFrames(io.RawIOBase):
    """The frames of a zstd stream one after another, as raw bytes; EOFError if the last ends early."""

    def __init__(self, binary: BinaryIO):
        try:
            import zstandard
        except ImportError:
            raise BigptError(
                "reading .zst input needs the Python package 'zstandard', which is not installed; install "
                "bigpt's curation extra: pip install -e '.[curate]'."
            ) from None
        self.binary, self.new_frame = binary, zstandard.ZstdDecompressor().decompressobj
        self.frame, self.pending, self.started = self.new_frame(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            left = b""
            if self.frame.eof:  # the next frame starts with what the last one left
                left, self.frame, self.started = self.frame.unused_data, self.new_frame(), False
            chunk = left or self.binary.read(1 << 20)
            if not chunk:
                if self.started:  # a frame begun and not ended
                    raise EOFError(CUT_SHORT)
                return 0
            self.started = True
            self.pending = self.frame.decompress(chunk)
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size

    def close(self) -> None:
        self.binary.close()
        super().close()


def input_reader(config: InputConfig, files: list[Path], paths_file: Path, skipped: Path, tasks: int):
    """A datatrove reader of exactly ``files`` (listed in ``paths_file``, relative to their
    common folder) for ``tasks`` tasks, in input order: task 0 reads the first part of the
    input, task 1 the next one, ... (so dedup's "first copy in task order" is the first in
    input order). JSONL is split by bytes, so one large file gives every task work, and the
    lines skipped are counted in ``skipped/RANK.json`` (filters.CountingJsonlReader); Parquet
    and text files are read whole, one task's files after the other's."""
    from datatrove.pipeline.readers import ParquetReader

    from bigpt.curate.filters import CountingJsonlReader, TextLineReader

    root = Path(os.path.commonpath([file.parent for file in files]))
    paths_file.parent.mkdir(parents=True, exist_ok=True)
    paths_file.write_text("".join(f"{file.relative_to(root)}\n" for file in _listed_for_tasks(files, tasks)))
    if config.format == "jsonl":
        relative = [str(file.relative_to(root)) for file in files]
        return lambda: CountingJsonlReader(
            str(root), str(skipped), relative, text_key=config.text_field, id_key=config.id_field
        )
    reader = {"parquet": ParquetReader, "text": TextLineReader}[config.format]
    return lambda: reader(str(root), paths_file=str(paths_file), text_key=config.text_field, id_key=config.id_field)


def _listed_for_tasks(files: list[Path], tasks: int) -> list[Path]:
    """``files`` listed so that datatrove, which gives task r the listed files r, r + tasks,
    r + 2 * tasks, ..., gives each task a contiguous run of them, task 0 the first."""
    listed: list[Path] = [Path()] * len(files)
    start = 0
    for rank in range(tasks):
        positions = range(rank, len(files), tasks)
        for position, file in zip(positions, files[start : start + len(positions)]):
            listed[position] = file
        start += len(positions)
    return listed
