"""build_datasets + micro_batches: shapes, data-parallel slicing, resume, and data checks."""

import os
import shutil

import pytest
import torch

from bigpt.data import BATCH_KEYS, build_datasets, load_tokenizer, micro_batches
from bigpt.data.preprocess import preprocess
from bigpt.errors import BigptError
from test_data_support import (
    corpus_texts,
    data_recipe,
    indexed_recipe,
    write_indexed,
    write_jsonl,
)


@pytest.fixture(scope="module")
def corpus_prefixes(tmp_path_factory, tokenizer_path):
    """Two real-text indexed datasets: the first 150 documents and the next 150."""
    directory = tmp_path_factory.mktemp("corpus")
    texts = corpus_texts(300)
    prefixes = []
    for name, part in (("first", texts[:150]), ("second", texts[150:])):
        jsonl = write_jsonl(directory / f"{name}.jsonl", part)
        preprocess(jsonl, str(directory / name), tokenizer_path)
        prefixes.append(str(directory / name))
    return prefixes


def take(batches, count):
    return [next(batches) for _ in range(count)]


def samples_of(batches):
    """The rows of a list of micro-batches, as token lists."""
    return [row.tolist() for batch in batches for row in batch["tokens"]]


def test_mock_batches_have_the_documented_layout(tmp_path):
    recipe = data_recipe(tmp_path, 'source = "mock"', seq_length=16, vocab_size=128)
    train, valid = build_datasets(recipe, world_rank=0, train_samples=64, valid_samples=0)
    assert valid is None and len(train) >= 64
    batch = next(micro_batches(train, consumed_samples=0, micro_batch_size=3, dp_rank=0, dp_size=1))
    assert tuple(batch) == BATCH_KEYS
    assert all(tensor.shape == (3, 16) for tensor in batch.values())
    for key in ("tokens", "labels", "position_ids"):
        assert batch[key].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["position_ids"], torch.arange(16).expand(3, 16))
    assert batch["loss_mask"].eq(1).all()


def test_loader_workers_keep_the_stream(tmp_path):
    recipe = data_recipe(tmp_path, 'source = "mock"', seq_length=8, vocab_size=100)
    train, _ = build_datasets(recipe, world_rank=0, train_samples=64, valid_samples=0)
    in_process, with_workers = (
        samples_of(
            take(
                micro_batches(train, consumed_samples=3, micro_batch_size=2, dp_rank=1, dp_size=2, num_workers=workers),
                4,
            )
        )
        for workers in (0, 2)
    )
    assert in_process == with_workers


def test_making_batches_leaves_the_default_generator_alone(tmp_path):
    """It is CPU dropout's generator: a new iterator (a resume, an evaluation) must not move it."""
    recipe = data_recipe(tmp_path, 'source = "mock"', seq_length=8, vocab_size=100)
    train, _ = build_datasets(recipe, world_rank=0, train_samples=16, valid_samples=0)
    before = torch.get_rng_state()
    next(micro_batches(train, consumed_samples=0, micro_batch_size=2, dp_rank=0, dp_size=1))
    assert torch.equal(torch.get_rng_state(), before)


def test_two_data_parallel_ranks_together_see_what_one_rank_sees(tmp_path):
    recipe = data_recipe(tmp_path, 'source = "mock"', seq_length=8, vocab_size=100)
    train, _ = build_datasets(recipe, world_rank=0, train_samples=64, valid_samples=0)

    def stream(dp_rank, dp_size, steps):
        return take(
            micro_batches(train, consumed_samples=4, micro_batch_size=2, dp_rank=dp_rank, dp_size=dp_size), steps
        )

    alone = samples_of(stream(0, 1, 6))
    rank0, rank1 = (samples_of(stream(rank, 2, 3)) for rank in (0, 1))
    # Each step hands ranks 0 and 1 consecutive pairs of the same global stream.
    interleaved = [row for step in range(3) for row in rank0[2 * step : 2 * step + 2] + rank1[2 * step : 2 * step + 2]]
    assert interleaved == alone
    assert alone[0] == train[4]["tokens"].tolist()


def test_resume_from_consumed_samples_continues_the_same_stream(tmp_path, tokenizer_path, corpus_prefixes):
    recipe = indexed_recipe(tmp_path, tokenizer_path, corpus_prefixes)
    mbs, dp = 2, 2

    def run(consumed, steps):
        # A restart: datasets rebuilt (their indices now come from the cache), iterators new.
        train, _ = build_datasets(recipe, world_rank=0, train_samples=80, valid_samples=8)
        ranks = [
            micro_batches(train, consumed_samples=consumed, micro_batch_size=mbs, dp_rank=rank, dp_size=dp)
            for rank in range(dp)
        ]
        return [samples_of(take(batches, steps)) for batches in ranks]

    uninterrupted = run(0, 5)
    before = run(0, 2)
    after = run(2 * mbs * dp, 3)
    assert [b + a for b, a in zip(before, after)] == uninterrupted


def test_indexed_blend_builds_from_a_preprocessed_corpus(tmp_path, tokenizer_path, corpus_prefixes):
    recipe = indexed_recipe(tmp_path, tokenizer_path, corpus_prefixes, seq_length=64)
    recipe.data.blend[0].weight = 3.0
    train, valid = build_datasets(recipe, world_rank=0, train_samples=40, valid_samples=8)
    assert len(train) >= 40 and len(valid) >= 8
    cache = tmp_path / "run" / "data_cache"
    assert any(name.endswith("BlendedDataset-train-dataset_index.npy") for name in os.listdir(cache))
    sample = train[0]
    assert sample["tokens"].shape == (64,)
    text = load_tokenizer(tokenizer_path).decode(sample["tokens"].tolist())
    assert sum(char.isalpha() for char in text) > len(text) / 2  # real words, not noise
    again, _ = build_datasets(recipe, world_rank=0, train_samples=40, valid_samples=8)
    assert torch.equal(again[7]["tokens"], train[7]["tokens"])


def test_the_end_of_the_dataset_is_a_clear_error(tmp_path, tokenizer_path, corpus_prefixes):
    recipe = indexed_recipe(tmp_path, tokenizer_path, corpus_prefixes[:1])
    train, _ = build_datasets(recipe, world_rank=0, train_samples=16, valid_samples=0)
    batches = micro_batches(train, consumed_samples=len(train) - 3, micro_batch_size=2, dp_rank=0, dp_size=2)
    with pytest.raises(BigptError, match="all were consumed"):
        next(batches)


# --- checks before megatron-core sees the data -------------------------------------------


def build(recipe):
    return build_datasets(recipe, world_rank=0, train_samples=16, valid_samples=4)


def copy_dataset(prefix, directory):
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, directory / f"copy{suffix}")
    return str(directory / "copy")


def test_a_missing_prefix_is_named(tmp_path, tokenizer_path):
    recipe = indexed_recipe(tmp_path, tokenizer_path, [str(tmp_path / "nothing_here")])
    with pytest.raises(
        BigptError,
        match=r"data\.blend\[0\]\.path: no indexed dataset at prefix "
        r".*nothing_here",
    ):
        build(recipe)


def test_an_idx_without_its_bin_is_named(tmp_path, tokenizer_path, corpus_prefixes):
    prefix = copy_dataset(corpus_prefixes[0], tmp_path)
    os.remove(prefix + ".bin")
    with pytest.raises(BigptError, match=r"copy\.bin is missing next to .*copy\.idx"):
        build(indexed_recipe(tmp_path, tokenizer_path, [prefix]))


def test_a_truncated_bin_is_named(tmp_path, tokenizer_path, corpus_prefixes):
    prefix = copy_dataset(corpus_prefixes[0], tmp_path)
    size = os.path.getsize(prefix + ".bin")
    os.truncate(prefix + ".bin", size - 10)
    with pytest.raises(
        BigptError,
        match=rf"copy\.bin has {size - 10} bytes but its index .* "
        rf"describes {size}",
    ):
        build(indexed_recipe(tmp_path, tokenizer_path, [prefix]))


def test_a_file_that_is_not_an_index_is_named(tmp_path, tokenizer_path, corpus_prefixes):
    prefix = copy_dataset(corpus_prefixes[0], tmp_path)
    with open(prefix + ".idx", "wb") as stream:
        stream.write(b"not an index at all")
    with pytest.raises(BigptError, match=r"copy\.idx is not a megatron-core index"):
        build(indexed_recipe(tmp_path, tokenizer_path, [prefix]))


def test_zero_length_documents_are_refused(tmp_path, tokenizer_path):
    prefix = write_indexed(tmp_path / "holes", [[5, 6, 2], [], [7, 2]] * 10)
    with pytest.raises(BigptError, match="10 zero-length documents"):
        build(indexed_recipe(tmp_path, tokenizer_path, [prefix]))


def test_an_empty_dataset_is_refused(tmp_path, tokenizer_path):
    prefix = write_indexed(tmp_path / "empty", [])
    with pytest.raises(BigptError, match="holds no documents"):
        build(indexed_recipe(tmp_path, tokenizer_path, [prefix]))


def test_a_split_left_without_documents_is_refused(tmp_path, tokenizer_path):
    # 90% of 3 documents rounds to all 3: validation would get none (and megatron would spin).
    prefix = write_indexed(tmp_path / "three", [[5, 6, 7, 2]] * 3)
    with pytest.raises(BigptError, match="gives the valid split none of the 3 documents"):
        build(indexed_recipe(tmp_path, tokenizer_path, [prefix]))


def test_a_split_nobody_samples_from_may_be_empty(tmp_path, tokenizer_path):
    prefix = write_indexed(tmp_path / "three", [[5, 6, 7, 2]] * 3)
    recipe = indexed_recipe(tmp_path, tokenizer_path, [prefix])
    train, valid = build_datasets(recipe, world_rank=0, train_samples=4, valid_samples=0)
    assert valid is None and len(train) >= 4


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, tokenizer_path, corpus_prefixes):
    recipe = indexed_recipe(tmp_path, tokenizer_path, corpus_prefixes, vocab_size=300)
    with pytest.raises(BigptError, match=r"has 512 tokens but model\.vocab_size is 300; set model\.vocab_size = 512"):
        build(recipe)
    recipe.init.from_hf = str(tmp_path / "hf")  # imported weights: their vocabulary is fixed
    with pytest.raises(
        BigptError,
        match=r"is 300; the vocabulary is that of the weights init\.from_hf = .* cannot grow: "
        r"set data\.tokenizer to the tokenizer released with those weights",
    ):
        build(recipe)


def test_blend_weights_must_be_positive(tmp_path, tokenizer_path, corpus_prefixes):
    recipe = indexed_recipe(tmp_path, tokenizer_path, corpus_prefixes)
    recipe.data.blend[1].weight = 0.0  # the recipe loader refuses this too; code can set it
    with pytest.raises(BigptError, match=r"data\.blend\[1\]\.weight = 0\.0 must be positive"):
        build(recipe)
