"""Helpers shared by the data tests (no tests here): a small real corpus, a tokenizer trained
on it, indexed datasets written directly with megatron-core, and recipes that use them."""

import itertools
import json
from pathlib import Path

import numpy

from bigpt.data.demo_corpus import stdlib_documents
from bigpt.data.tokenizer_training import train_tokenizer
from bigpt.recipe import load_recipe

TEST_VOCAB_SIZE = 512


def corpus_texts(count: int = 200) -> list[str]:
    """The first ``count`` documents of the demo corpus: real text, deterministic, fast."""
    return [text for _, text in itertools.islice(stdlib_documents(), count)]


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return path


def make_tokenizer(directory: Path) -> Path:
    corpus = write_jsonl(directory / "tokenizer_corpus.jsonl", corpus_texts())
    return train_tokenizer([corpus], TEST_VOCAB_SIZE, directory / "tokenizer")


def write_indexed(prefix: Path, documents: list[list[int]], dtype=numpy.uint16) -> str:
    """Write documents as they are (no EOD added), bypassing bigpt's checks and tools."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for document in documents:
        builder.add_document(numpy.array(document, dtype=dtype), [len(document)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def data_recipe(
    directory: Path, data_toml: str, *, seq_length: int = 32, vocab_size: int = TEST_VOCAB_SIZE, seed: int = 1234
):
    """A small recipe whose [data] table is ``data_toml``, with run_dir under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.toml"
    path.write_text(f"""
name = "data-test"
run_dir = "{directory / "run"}"
[model]
num_layers = 2
hidden_size = 64
ffn_hidden_size = 128
num_attention_heads = 4
seq_length = {seq_length}
vocab_size = {vocab_size}
[train]
global_batch_size = 8
train_iters = 10
seed = {seed}
[optimizer]
lr = 1e-3
[data]
{data_toml}
""")
    return load_recipe(str(path), [])


def indexed_recipe(directory: Path, tokenizer: Path, prefixes: list[str], **kwargs):
    blend = ", ".join(f'{{path = "{prefix}"}}' for prefix in prefixes)
    return data_recipe(
        directory, f'source = "indexed"\ntokenizer = "{tokenizer}"\nblend = [{blend}]\nsplit = "90,10,0"', **kwargs
    )
