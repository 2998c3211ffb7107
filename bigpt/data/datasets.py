"""Recipe [data] → megatron-core's datasets (mock, or phases of indexed-dataset blends): GPT's
for a decoder, the masked-LM ones (``bigpt.data.masked``) for an encoder."""

import os
from pathlib import Path

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import Split

from bigpt.data.checks import check_mock_index_fits, check_vocab
from bigpt.data.index_cache import KeyedGPTDataset, KeyedMaskedLMDataset, drop_damaged
from bigpt.data.masked import (
    MaskedVocabulary,
    MockMaskedLMDataset,
    masked_config,
    masked_vocabulary,
    mock_vocabulary,
)
from bigpt.data.phases import Phase, PhasedDataset, plan_phases, plan_validation_sets, validation_rereads
from bigpt.data.rank_zero_first import build_rank_zero_first, megatron_sees_one_process
from bigpt.data.tokenizer import Tokenizer, load_tokenizer
from bigpt.runtime import console


class VocabularyOnly(Tokenizer):
    """Stands in for a tokenizer with mock data, which only needs the vocabulary size."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1


def build_datasets(recipe, *, world_rank: int, train_samples: int, valid_samples: int):
    """Return ``(train, valid)`` datasets; ``valid`` is None when ``valid_samples`` is 0.

    Call on every rank. ``source = "indexed"`` datasets are checked on every rank first, then
    their sample indices are built on rank 0 into ``data.cache_dir`` and loaded by the others
    (keyed on each index file's identity, checked before use: ``index_cache``).
    Samples are dicts of ``seq_length``-long tensors: tokens, labels, loss_mask, position_ids.
    Validation samples come from the first phase's blend (``data.blend``).
    """
    data = recipe.data
    masked = recipe.model.family == "encoder"
    tokenizer: Tokenizer | MaskedVocabulary
    if data.source == "mock":
        if masked:
            tokenizer = mock_vocabulary(recipe.model.vocab_size)
        else:
            check_mock_index_fits(train_samples, valid_samples, recipe.model.seq_length)
            tokenizer = checked_tokenizer(recipe) if data.tokenizer else VocabularyOnly(recipe.model.vocab_size)
        config = _config(recipe, tokenizer, {Split.train: train_samples, Split.valid: valid_samples})
        # Mock data is generated in memory from the seed, so every rank builds its own.
        with megatron_sees_one_process(quiet=True):
            train, valid, _ = BlendedMegatronDatasetBuilder(
                MockMaskedLMDataset if masked else MockGPTDataset,
                [train_samples, valid_samples, 0],
                lambda: True,
                config,
            ).build()
        return train, valid
    tokenizer = data_vocabulary(recipe)
    cache_dir = os.path.abspath(data.cache_dir or os.path.join(recipe.run_dir, "data_cache"))
    phases = plan_phases(recipe, train_samples, valid_samples=valid_samples)
    for warning in validation_rereads(recipe, phases[0], valid_samples):
        console.warn(warning)
    built = [
        _build_phase(recipe, tokenizer, number, phase, valid_samples if number == 0 else 0, world_rank, cache_dir)
        for number, phase in enumerate(phases)
    ]
    train, valid = built[0]
    if len(phases) > 1:
        train = PhasedDataset([phase.first_sample for phase in phases], [phase_train for phase_train, _ in built])
    return train, valid


def build_validation_sets(recipe, *, world_rank: int) -> dict:
    """The named validation sets of eval.sets, by name: each its blend's validation split (call on
    every rank, as ``build_datasets``). Each evaluation reads a set's first samples."""
    tokenizer = data_vocabulary(recipe)
    cache_dir = os.path.abspath(recipe.data.cache_dir or os.path.join(recipe.run_dir, "data_cache"))
    sets = {}
    for plan in plan_validation_sets(recipe):
        for warning in validation_rereads(recipe, plan.blend, plan.samples):
            console.warn(warning)
        _, sets[plan.name] = _build_phase(recipe, tokenizer, 0, plan.blend, plan.samples, world_rank, cache_dir)
    return sets


def _build_phase(recipe, tokenizer, number: int, phase: Phase, valid_samples: int, world_rank: int, cache_dir: str):
    # One dataset needs no blending; weights would make megatron wrap it in a BlendedDataset.
    weights = phase.weights if len(phase.prefixes) > 1 else None
    # Each phase shuffles with its own seed, so a dataset met again is not replayed in order.
    config = _config(
        recipe,
        tokenizer,
        {Split.train: phase.samples, Split.valid: valid_samples},
        blend=(phase.prefixes, weights),
        cache_dir=cache_dir,
        seed=recipe.train.seed + number,
    )
    dataset = KeyedMaskedLMDataset if recipe.model.family == "encoder" else KeyedGPTDataset
    builder = BlendedMegatronDatasetBuilder(dataset, [phase.samples, valid_samples, 0], lambda: True, config)

    def build():
        drop_damaged(Path(cache_dir))  # before megatron maps a cached file: each rank, rank 0 first
        return builder.build()

    train, valid, _ = build_rank_zero_first(
        build, world_rank=world_rank, cache_dir=cache_dir, timeout_minutes=recipe.data.build_timeout_minutes
    )
    return train, valid


def data_vocabulary(recipe) -> Tokenizer | MaskedVocabulary:
    """data.tokenizer, checked, as the model family's datasets read it: an encoder's special tokens
    and word boundaries; refused if it lacks what they need."""
    checked = checked_tokenizer(recipe)
    if recipe.model.family == "encoder":
        return masked_vocabulary(checked, recipe.data.tokenizer, whole_word=recipe.data.masking.whole_word)
    return checked


def checked_tokenizer(recipe) -> Tokenizer:
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    init = recipe.init
    weights = (
        f"init.from_hf = {init.from_hf}"
        if init.from_hf
        else f"init.from_checkpoint = {init.from_checkpoint}"
        if init.from_checkpoint
        else None
    )
    check_vocab(tokenizer.vocab_size, recipe.model.vocab_size, recipe.data.tokenizer, weights)
    return tokenizer


def _config(recipe, tokenizer, wanted: dict, *, blend=None, cache_dir=None, seed=None):
    shared = dict(
        random_seed=recipe.train.seed if seed is None else seed,
        blend=blend,
        split=recipe.data.split if blend else None,
        path_to_cache=cache_dir,
    )
    if recipe.model.family == "encoder":
        config = masked_config(recipe, tokenizer, **shared)
    else:
        config = GPTDatasetConfig(
            sequence_length=recipe.model.seq_length,
            tokenizer=tokenizer,
            # Documents are packed back to back and attend across EOD: Megatron's default pretraining.
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            **shared,
        )
    # Splits nobody samples from are not built: megatron would build a whole epoch of each
    # (and spin forever on one without tokens). Their documents stay out of the train split.
    config.split_matrix = [bounds if wanted.get(part) else None for part, bounds in zip(Split, config.split_matrix)]
    return config
