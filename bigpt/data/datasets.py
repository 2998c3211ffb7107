"""Recipe [data] → megatron-core GPT datasets (mock, or a blend of indexed datasets)."""

import os

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import Split

from bigpt.data.checks import check_split_has_tokens, check_vocab, check_weights, open_indexed_dataset
from bigpt.data.rank_zero_first import build_rank_zero_first, megatron_sees_one_process
from bigpt.data.tokenizer import Tokenizer, load_tokenizer

DEFAULT_BUILD_TIMEOUT_MINUTES = 30.0


class VocabularyOnly(Tokenizer):
    """Stands in for a tokenizer with mock data, which only needs the vocabulary size."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1


def build_datasets(recipe, *, world_rank: int, train_samples: int, valid_samples: int):
    """Return ``(train, valid)`` megatron-core datasets; ``valid`` is None if nothing is asked.

    Call on every rank. ``source = "indexed"`` datasets are checked on every rank first, then
    their sample indices are built on rank 0 into ``data.cache_dir`` and loaded by the others.
    Samples are dicts of ``seq_length``-long tensors: tokens, labels, loss_mask, position_ids.
    """
    data = recipe.data
    wanted = {Split.train: train_samples, Split.valid: valid_samples}
    sizes = [train_samples, valid_samples, 0]
    if data.source == "mock":
        tokenizer = _checked_tokenizer(recipe) if data.tokenizer else VocabularyOnly(
            recipe.model.vocab_size)
        config = _config(recipe, tokenizer, wanted, blend=None, cache_dir=None)
        # Mock data is generated in memory from the seed, so every rank builds its own.
        with megatron_sees_one_process(quiet=True):
            train, valid, _ = BlendedMegatronDatasetBuilder(
                MockGPTDataset, sizes, lambda: True, config).build()
    else:
        tokenizer = _checked_tokenizer(recipe)
        cache_dir = os.path.abspath(data.cache_dir or os.path.join(recipe.run_dir, "data_cache"))
        config = _config(recipe, tokenizer, wanted, blend=_checked_blend(data, wanted),
                         cache_dir=cache_dir)
        builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
        train, valid, _ = build_rank_zero_first(
            builder.build, world_rank=world_rank, cache_dir=cache_dir,
            timeout_minutes=getattr(data, "build_timeout_minutes", DEFAULT_BUILD_TIMEOUT_MINUTES))
    return train, valid


def _checked_tokenizer(recipe) -> Tokenizer:
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    check_vocab(tokenizer.vocab_size, recipe.model.vocab_size, recipe.data.tokenizer)
    return tokenizer


def _checked_blend(data, wanted: dict) -> tuple[list[str], list[float] | None]:
    """The blend as megatron takes it, after checking every dataset can serve its splits."""
    prefixes = [entry.path for entry in data.blend]
    weights = [entry.weight for entry in data.blend]
    check_weights(weights)
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(data.split))
    for i, prefix in enumerate(prefixes):
        dataset = open_indexed_dataset(prefix, f"data.blend[{i}].path")
        check_split_has_tokens(dataset, f"data.blend[{i}].path", split_matrix, data.split, wanted)
    # One dataset needs no blending; weights would make megatron wrap it in a BlendedDataset.
    return prefixes, (weights if len(prefixes) > 1 else None)


def _config(recipe, tokenizer: Tokenizer, wanted: dict, *, blend, cache_dir) -> GPTDatasetConfig:
    config = GPTDatasetConfig(
        random_seed=recipe.train.seed,
        sequence_length=recipe.model.seq_length,
        blend=blend,
        split=recipe.data.split if blend else None,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        # Documents are packed back to back and attend across EOD: Megatron's default pretraining.
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # Splits nobody samples from are not built: megatron would build a whole epoch of each
    # (and spin forever on one without tokens). Their documents stay out of the train split.
    config.split_matrix = [bounds if wanted.get(part) else None
                           for part, bounds in zip(Split, config.split_matrix)]
    return config
