"""The sample-index cache (``data.cache_dir``): keyed on what each dataset is, checked before use.

megatron-core finds a dataset's cached indices by a hash of its settings and its path prefix
alone, and trusts every file it finds there. So a corpus re-tokenised under the same prefix
reused the old indices (training silently on other samples, or an IndexError past its end), and
a file cut short by a kill or a full disk (megatron writes them in place) failed with a traceback
at the next start. Here the key also holds the identity of the index file (``index_identity``),
indices cached for another version of it are dropped, and every cached file is checked against
its own header before megatron maps it; what is dropped is built anew, and each drop is said.
"""

import hashlib
import json
from pathlib import Path

import numpy
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from bigpt.data.masked import MaskedLMDataset
from bigpt.data.span_corruption import SpanCorruptionDataset
from bigpt.errors import BigptError
from bigpt.runtime import console

INDEX_FILE = "index_file"
"""The key bigpt adds to megatron-core's description of a dataset (and so to its hash)."""

_hashed: dict[tuple, str] = {}  # (path, size, mtime, inode) -> hash: each phase and split reopens a dataset


def index_identity(dataset: IndexedDataset) -> dict:
    """What the sample indices of ``dataset`` are built from: the sequence lengths and document
    boundaries its ``.idx`` file holds (the indices depend on them alone), as a hash, with the
    sizes of its ``.idx`` and ``.bin`` files."""
    idx, bin_ = Path(f"{dataset.path_prefix}.idx"), Path(f"{dataset.path_prefix}.bin")
    stat = idx.stat()
    seen = (str(idx.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if seen not in _hashed:
        digest = hashlib.blake2b(digest_size=16)
        for array in (dataset.sequence_lengths, dataset.document_indices):  # documents split by either
            digest.update(memoryview(numpy.ascontiguousarray(array)).cast("B"))
        _hashed[seen] = digest.hexdigest()
    return {"idx_bytes": stat.st_size, "bin_bytes": bin_.stat().st_size, "lengths_blake2b": _hashed[seen]}


def key_on_index_file(dataset) -> None:
    """Before a megatron-core dataset looks for its cached indices: add its index file's identity
    to its description and hash (megatron-core's own, of the extended key), and drop the indices
    cached for the same dataset, split and settings from another version of that file."""
    cache = dataset.config.path_to_cache
    if not cache:
        return
    dataset.unique_identifiers[INDEX_FILE] = index_identity(dataset.dataset)
    dataset.unique_description = json.dumps(
        dataset.unique_identifiers, indent=4, default=lambda obj: obj.unique_identifiers
    )
    dataset.unique_description_hash = hashlib.md5(
        dataset.unique_description.encode("utf-8"), usedforsecurity=False
    ).hexdigest()
    cache = Path(cache)
    if any(cache.glob(f"{dataset.unique_description_hash}-*description.txt")):
        return
    ours = {key: value for key, value in json.loads(dataset.unique_description).items() if key != INDEX_FILE}
    for description in sorted(cache.glob(f"*-{type(dataset).__name__}-*description.txt")):
        try:
            theirs = json.loads(description.read_text())
        except (OSError, ValueError):
            continue  # not readable: drop_damaged's to judge
        if theirs.pop(INDEX_FILE, None) is not None and theirs == ours:
            prefix = dataset.dataset_path
            _drop(cache, description.name.removesuffix("description.txt"), f"was built from another {prefix}.idx")
            console.warn(
                f"data.cache_dir {cache}: the {dataset.index_split.name} indices cached for {prefix} were built "
                f"from another version of {prefix}.idx (it was rewritten since); they are dropped and built anew",
                here=True,
            )


class KeyedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset, whose cached indices are keyed on its index file's identity too."""

    def _build_document_sample_shuffle_indices(self):
        key_on_index_file(self)
        return super()._build_document_sample_shuffle_indices()


class KeyedSampleIndex:
    """Keys a masked dataset's cached sample index on its index file's identity too (put it first
    among the bases)."""

    def _build_sample_index(self, sequence_length: int, min_sentences_per_sample: int) -> numpy.ndarray:
        key_on_index_file(self)
        return super()._build_sample_index(sequence_length, min_sentences_per_sample)  # type: ignore[misc]


class KeyedMaskedLMDataset(KeyedSampleIndex, MaskedLMDataset):
    """bigpt's masked-LM dataset, whose cached indices are keyed on its index file's identity too."""


class KeyedSpanCorruptionDataset(KeyedSampleIndex, SpanCorruptionDataset):
    """bigpt's span-corruption dataset, whose cached indices are keyed on its index file's identity too."""


def drop_damaged(cache: Path) -> None:
    """Drop each set of cached indices (``<hash>-<class>[-<split>]-*``) holding a file that is not
    whole: a ``.npy`` shorter or longer than its header says (a kill or a full disk while megatron
    wrote it), or unreadable; it is built anew. Said once per set."""
    if not cache.is_dir():
        return
    sets: dict[str, list[Path]] = {}
    for path in sorted(cache.glob("*-*.npy")):  # <hash>-<class>[-<split>]-<name>.npy
        sets.setdefault(path.name[: path.name.rindex("-") + 1], []).append(path)
    for stem, files in sets.items():
        for path in files:
            if why := _npy_problem(path):
                _drop(cache, stem, f"is cached with {path.name}, which is damaged ({why})")
                console.warn(
                    f"data.cache_dir {cache}: {path.name} is damaged ({why}), as a kill or a full disk leaves "
                    "a file megatron-core was writing; the indices cached with it are dropped and built anew",
                    here=True,
                )
                break


def _npy_problem(path: Path) -> str | None:
    """Why the ``.npy`` file at ``path`` cannot be mapped as it says it is, or None."""
    try:
        size = path.stat().st_size
    except OSError as err:  # e.g. a link to a file that is gone
        return f"it cannot be read: {err.strerror or err}"
    if not size:
        return "it is empty"
    try:
        mapped = numpy.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        return f"{size:,} bytes that numpy cannot map: {err}"
    expected = mapped.offset + mapped.nbytes
    del mapped
    return f"{size:,} bytes where its header says {expected:,}" if size != expected else None


def _drop(cache: Path, stem: str, why: str) -> None:
    """Delete the cached files named ``stem*``, which are ``why`` (worded for the error if one cannot go)."""
    for path in cache.glob(f"{stem}*"):
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise BigptError(
                f"data.cache_dir {cache}: {path.name} {why}, and cannot be deleted ({err.strerror or err}) to build it "
                "anew; delete it by hand, or point data.cache_dir at a folder of this run's own"
            ) from None
