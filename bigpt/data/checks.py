"""Checks on indexed datasets before megatron-core sees them.

megatron-core asserts (or worse, loops forever: a split with zero tokens never reaches its
requested sample count) on data it cannot use. Every rank runs these checks on its own, so a
bad dataset fails the same way everywhere instead of leaving ranks waiting on each other.
"""

import os
from types import SimpleNamespace

import numpy
import psutil
from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset
from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    IndexedDataset,
    get_bin_path,
    get_idx_path,
)
from megatron.core.datasets.utils import Split

from bigpt.errors import BigptError

REGENERATE = "regenerate it with tools/preprocess_data.py"


def open_indexed_dataset(prefix: str, key: str) -> IndexedDataset:
    """Open the ``.bin``/``.idx`` pair at ``prefix`` (recipe key ``key``) and check it is whole."""
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    if not os.path.isfile(idx_path):
        found = " (its .bin exists)" if os.path.isfile(bin_path) else ""
        raise BigptError(
            f"{key}: no indexed dataset at prefix {prefix}: {idx_path} does not "
            f"exist{found}; give the path without .bin/.idx, or {REGENERATE}"
        )
    if not os.path.isfile(bin_path):
        raise BigptError(f"{key}: {bin_path} is missing next to {idx_path}; copy the .bin too, or {REGENERATE}")
    # Checked here because megatron-core cannot open these (and prints noise while failing).
    with open(idx_path, "rb") as stream:
        if stream.read(len(_INDEX_HEADER)) != _INDEX_HEADER:
            raise BigptError(f"{key}: {idx_path} is not a megatron-core index (its header is wrong); {REGENERATE}")
    if os.path.getsize(bin_path) == 0:
        raise BigptError(
            f"{key}: {prefix} holds no documents ({bin_path} is empty); {REGENERATE} from a non-empty corpus"
        )
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, OSError) as err:
        raise BigptError(f"{key}: {idx_path} is not a readable megatron-core index ({err}); {REGENERATE}") from None
    index = dataset.index
    if len(index) == 0:
        raise BigptError(f"{key}: {prefix} holds no documents; {REGENERATE} from a non-empty corpus")
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise BigptError(
            f"{key}: {bin_path} has {actual} bytes but its index {idx_path} "
            f"describes {expected} (truncated or mismatched copy); {REGENERATE} "
            "or copy both files again"
        )
    empty = numpy.flatnonzero(index.sequence_lengths == 0)
    if empty.size:
        raise BigptError(
            f"{key}: {prefix} has {empty.size} zero-length documents (the first is "
            f"number {empty[0]}), which megatron-core cannot sample; {REGENERATE}, "
            "which appends an end-of-document token to every document"
        )
    return dataset


def _split_range(dataset: IndexedDataset, bounds: tuple[float, float]) -> tuple[int, int]:
    """The documents megatron-core puts in a split with these (begin, end) fractions."""
    num_documents = len(dataset)
    begin, end = (int(round(bound * num_documents)) for bound in bounds)
    return begin, end


def split_tokens(dataset: IndexedDataset, bounds: tuple[float, float]) -> int:
    begin, end = _split_range(dataset, bounds)
    return int(dataset.sequence_lengths[begin:end].sum())


def split_documents(dataset: IndexedDataset, bounds: tuple[float, float]) -> int:
    begin, end = _split_range(dataset, bounds)
    return end - begin


def check_split_has_tokens(
    dataset: IndexedDataset, key: str, split_matrix, split: str, wanted: dict[Split, int]
) -> None:
    """Each split that must serve samples needs tokens."""
    for part, samples in wanted.items():
        bounds = split_matrix[part.value]
        if samples and bounds is not None and split_tokens(dataset, bounds) == 0:
            raise BigptError(
                f"{key}: data.split={split!r} gives the {part.name} split none of the "
                f"{len(dataset)} documents of {dataset.path_prefix}; add documents to that "
                "dataset or change data.split"
            )


INT32_MAX = 2**31 - 1


def check_index_fits(
    key: str, what: str, documents: int, epoch_tokens: int, samples: int, seq_length: int, length_key: str
) -> None:
    """megatron-core's GPTDataset builds its indices in memory, on one rank: counting the epochs
    it needs one by one (in Python), then a document index of every epoch's documents (int32
    each), a sample index and a shuffle index (up to 16 + 8 bytes a sample); its C++ helper takes
    the epoch count as an int32. A training length beyond that hangs or fails before step 1."""
    epochs = -(-(samples * seq_length + 1) // epoch_tokens)
    index_bytes = 4 * documents * epochs + 24 * (samples + 1)
    memory = psutil.virtual_memory().total
    if epochs <= INT32_MAX and index_bytes <= memory:
        return
    counter = f", and more than its int32 epoch counter holds ({INT32_MAX:,})" if epochs > INT32_MAX else ""
    raise BigptError(
        f"{key}: {samples:,} samples of model.seq_length={seq_length} tokens read {what} ({epoch_tokens:,} tokens in "
        f"{documents:,} documents) {epochs:,} times over, and megatron-core's sample index for that takes "
        f"{index_bytes / 2**30:,.0f} GiB of memory, more than this machine's {memory / 2**30:,.0f} GiB{counter}; "
        f"lower {length_key} or train on more data"
    )


def check_mock_index_fits(train_samples: int, valid_samples: int, seq_length: int) -> None:
    """check_index_fits for data.source = "mock": megatron-core's fixed set of random documents
    (at most all of them in a split)."""
    documents = MockGPTLowLevelDataset(SimpleNamespace(vocab_size=2, eod=1)).sequence_lengths
    tokens = int(documents.sum())
    for samples, length_key in ((train_samples, "train.train_iters"), (valid_samples, "eval.iters")):
        if samples:
            what = "megatron-core's mock dataset"
            check_index_fits(length_key, what, len(documents), tokens, samples, seq_length, length_key)


def check_weights(weights: list[float], key: str) -> None:
    for i, weight in enumerate(weights):
        if not weight > 0:
            raise BigptError(
                f"{key}[{i}].weight = {weight} must be positive; drop the "
                "dataset from the blend instead of giving it no weight"
            )


def check_vocab(vocab_size: int, model_vocab_size: int, tokenizer_path: str, weights: str | None = None) -> None:
    """``weights``: the [init] key naming the weights the model starts from, whose vocabulary is fixed."""
    if vocab_size > model_vocab_size:
        fix = (
            f"set model.vocab_size = {vocab_size} (or more)"
            if weights is None
            else f"the vocabulary is that of the weights {weights} names and cannot grow: set data.tokenizer to the "
            "tokenizer released with those weights (their tokenizer.json or tokenizer.model) and tokenize the "
            "data with it (tools/preprocess_data.py --tokenizer)"
        )
        raise BigptError(
            f"data.tokenizer {tokenizer_path} has {vocab_size} tokens but model.vocab_size is {model_vocab_size}; {fix}"
        )
