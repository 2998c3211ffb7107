"""Data phases: ``data.blend`` from the first token, then each ``data.phases`` entry from its
``start_tokens`` on (a curriculum, or a final anneal on high-quality data).

A blend's weights are either given, or derived from ``epochs``: weight = epochs × the tokens of
the dataset's training split, so each dataset is seen about that many times when the phase is
as long as the epochs add up to. ``plan_tokens`` prints what each dataset actually gets.
"""

import bisect
import math
from dataclasses import dataclass

import torch
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.utils import Split

from bigpt.data.checks import (
    check_index_fits,
    check_mock_index_fits,
    check_split_has_tokens,
    check_weights,
    open_indexed_dataset,
    split_documents,
    split_tokens,
)
from bigpt.data.masked import masked_token_share
from bigpt.data.span_corruption import span_token_share
from bigpt.errors import BigptError, BigptErrors, raise_problems
from bigpt.layout import samples_by_step
from bigpt.numbers import short


@dataclass
class Phase:
    key: str
    """Where the phase's blend is in the recipe: "data.blend" or "data.phases[i].blend"."""
    first_sample: int
    samples: int
    prefixes: list[str]
    weights: list[float]
    """Relative weights."""
    train_tokens: list[int]
    """Tokens in each dataset's training split."""
    valid_tokens: list[int]
    """Tokens in each dataset's validation split."""


def plan_phases(recipe, train_samples: int, *, valid_samples: int = 0) -> list[Phase]:
    """The phases of a run of ``train_samples`` samples, datasets checked as they are read."""
    data, seq_length = recipe.data, recipe.model.seq_length
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(data.split))
    later = data.phases
    starts = [0] + [phase.start_tokens // seq_length for phase in later]
    ends = starts[1:] + [train_samples]
    for i, phase in enumerate(later):
        if not starts[i] < starts[i + 1] < train_samples:
            raise BigptError(
                f"data.phases[{i}].start_tokens = {phase.start_tokens} must come after the "
                f"previous phase's start and before the end of training "
                f"({train_samples * seq_length} tokens); order the phases by start_tokens"
            )
    blends = [("data.blend", data.blend)] + [(f"data.phases[{i}].blend", phase.blend) for i, phase in enumerate(later)]
    phases, problems = [], []
    for i, ((key, blend), start, end) in enumerate(zip(blends, starts, ends)):
        wanted = {Split.train: end - start, Split.valid: valid_samples if i == 0 else 0}
        try:
            prefixes, weights, tokens, valid_tokens = _plan_blend(
                key, blend, split_matrix, data.split, wanted, seq_length
            )
        except BigptError as err:  # every phase's datasets are checked before saying what is wrong
            problems += err.problems if isinstance(err, BigptErrors) else [str(err)]
            continue
        phases.append(Phase(key, start, end - start, prefixes, weights, tokens, valid_tokens))
    raise_problems(problems)
    return phases


@dataclass
class ValidationSetPlan:
    """One [[eval.sets]] entry, its datasets checked."""

    name: str
    samples: int
    """Samples one evaluation reads: eval.sets[i].iters (or eval.iters) × train.global_batch_size."""
    blend: Phase
    """Its datasets (samples 0: only their validation splits are read)."""


def plan_validation_sets(recipe) -> list[ValidationSetPlan]:
    """The named validation sets (eval.sets; none without it), their datasets checked as a start
    checks them, every set before saying what is wrong."""
    data, seq_length = recipe.data, recipe.model.seq_length
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(data.split))
    plans, problems = [], []
    for i, entry in enumerate(recipe.eval.sets):
        key, blend = (f"eval.sets[{i}].blend", entry.blend) if entry.blend else ("data.blend", data.blend)
        samples = recipe.train.global_batch_size * (entry.iters or recipe.eval.iters)
        try:
            prefixes, weights, tokens, valid_tokens = _plan_blend(
                key, blend, split_matrix, data.split, {Split.valid: samples}, seq_length
            )
        except BigptError as err:
            problems += err.problems if isinstance(err, BigptErrors) else [str(err)]
            continue
        plans.append(ValidationSetPlan(entry.name, samples, Phase(key, 0, 0, prefixes, weights, tokens, valid_tokens)))
    raise_problems(problems)
    return plans


EVAL_READS_WARNED = 4
"""An evaluation that reads a validation split more times over than this says so."""


def validation_rereads(recipe, phase: Phase, valid_samples: int) -> list[str]:
    """Warnings for each dataset of a validation blend (data.blend's, or a named set's) whose
    validation split one evaluation reads more than EVAL_READS_WARNED times over: its loss is
    measured on a few documents, repeated."""
    drawn = valid_samples * recipe.model.seq_length
    total = sum(phase.weights)
    warnings = []
    for i, (prefix, weight, tokens) in enumerate(zip(phase.prefixes, phase.weights, phase.valid_tokens)):
        reads = weight / total * drawn / tokens if tokens else 0
        if reads > EVAL_READS_WARNED:
            warnings.append(
                f"each evaluation reads the validation split of {phase.key}[{i}] ({prefix}, {tokens:,} tokens) "
                f"{reads:.0f} times over (eval.iters × train.global_batch_size × model.seq_length = {drawn:,} "
                "tokens); lower eval.iters, or give validation a larger share of data.split"
            )
    return warnings


def _plan_blend(key, blend, split_matrix, split, wanted, seq_length):
    if not blend:
        raise BigptError(f'{key} is empty; name at least one dataset, e.g. [{{path = "corpus_text_document"}}]')
    epochs = [entry.epochs for entry in blend]
    if any(value is not None for value in epochs) and None in epochs:
        raise BigptError(
            f"{key}: give epochs for every dataset of the blend or for none (weights are then derived from them)"
        )
    prefixes, datasets, tokens, valid_tokens, problems = [entry.path for entry in blend], [], [], [], []
    for i, prefix in enumerate(prefixes):
        try:
            dataset = open_indexed_dataset(prefix, f"{key}[{i}].path")
            check_split_has_tokens(dataset, f"{key}[{i}].path", split_matrix, split, wanted)
        except BigptError as err:  # every dataset of the blend is checked before saying what is wrong
            problems.append(str(err))
            continue
        datasets.append(dataset)
        tokens.append(split_tokens(dataset, split_matrix[Split.train.value]))
        valid = split_matrix[Split.valid.value]
        valid_tokens.append(split_tokens(dataset, valid) if valid is not None else 0)
    raise_problems(problems)
    if epochs[0] is None:
        weights = [entry.weight for entry in blend]
    else:
        weights = [value * count for value, count in zip(epochs, tokens)]
    check_weights(weights, key)
    for part, length_key in ((Split.train, "train.train_iters"), (Split.valid, "eval.iters")):
        bounds = split_matrix[part.value]
        if not wanted.get(part) or bounds is None:
            continue
        for i, (prefix, weight, dataset) in enumerate(zip(prefixes, weights, datasets)):
            check_index_fits(
                f"{key}[{i}].path",
                f"the {part.name} split of {prefix}",
                split_documents(dataset, bounds),
                split_tokens(dataset, bounds),
                math.ceil(weight / sum(weights) * wanted[part]),
                seq_length,
                length_key,
            )
    return prefixes, weights, tokens, valid_tokens


class PhasedDataset(torch.utils.data.Dataset):
    """Global sample ``k`` comes from the phase whose sample range holds ``k``."""

    def __init__(self, first_samples: list[int], datasets: list):
        self.first_samples, self.datasets = first_samples, datasets

    def __len__(self) -> int:
        return self.first_samples[-1] + len(self.datasets[-1])

    def __getitem__(self, index: int):
        phase = bisect.bisect_right(self.first_samples, index) - 1
        return self.datasets[phase][index - self.first_samples[phase]]


def plan_tokens(recipe, train_samples: int | None = None) -> str:
    """A table of what each phase trains on, for the dry run: per dataset its share of the
    phase, the tokens drawn from it, its training-split size and the epochs that makes. The
    datasets are checked as a real start checks them: a missing or damaged one is an error."""
    train = recipe.train
    train_samples = train_samples or samples_by_step(train, train.train_iters)
    seq_length = recipe.model.seq_length
    valid_samples = default_validation_samples(recipe)
    if recipe.data.source == "mock":
        check_mock_index_fits(train_samples, valid_samples, seq_length)
        return f"data: mock (random tokens), {short(train_samples * seq_length)} tokens"
    rows = [("phase", "tokens", "dataset", "share", "drawn", "split size", "epochs")]
    phases = plan_phases(recipe, train_samples, valid_samples=valid_samples)
    for phase in phases:
        first = phase.first_sample * seq_length
        last = first + phase.samples * seq_length
        total = sum(phase.weights)
        for prefix, weight, tokens in zip(phase.prefixes, phase.weights, phase.train_tokens):
            drawn = weight / total * (last - first)
            rows.append(
                (
                    phase.key,
                    f"{short(first)}-{short(last)}",
                    prefix,
                    f"{weight / total:.1%}",
                    short(drawn),
                    short(tokens),
                    f"{drawn / tokens:.2f}",
                )
            )
    warnings = validation_rereads(recipe, phases[0], valid_samples)
    table = _tabulated(rows)
    if recipe.model.family in ("encoder", "encoder_decoder"):
        table += _masked_shares(recipe, phases)
    sets = plan_validation_sets(recipe)
    if sets:
        set_rows: list[tuple[str, ...]] = [("validation set", "dataset", "share", "read per evaluation", "split size")]
        for plan in sets:
            total = sum(plan.blend.weights)
            for prefix, weight, tokens in zip(plan.blend.prefixes, plan.blend.weights, plan.blend.valid_tokens):
                read = weight / total * plan.samples * seq_length
                set_rows.append((plan.name, prefix, f"{weight / total:.1%}", short(read), short(tokens)))
            warnings += validation_rereads(recipe, plan.blend, plan.samples)
        table += _tabulated(set_rows)
    return "\n".join(table + [f"warning: {line}" for line in warnings])


def default_validation_samples(recipe) -> int:
    """Samples of data.blend's validation split that each evaluation reads (the first eval.iters
    global batches, full size): 0 without evaluation, or with named sets (eval.sets) instead."""
    if not recipe.eval.interval or recipe.eval.sets:
        return 0
    return recipe.train.global_batch_size * recipe.eval.iters


def _tabulated(rows: list[tuple]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _masked_shares(recipe, phases: list[Phase]) -> list[str]:
    """Per dataset, how much of it masked-LM (model.family = "encoder") or span-corruption samples
    ("encoder_decoder") hold."""
    if recipe.model.family == "encoder":
        kind, share_of, reserved = "masked", masked_token_share, 3  # [CLS] and two [SEP]
    else:
        kind, share_of, reserved = "span-corruption", span_token_share, 2  # megatron-core's T5 room (sample_tokens)
    lines = []
    room = recipe.model.seq_length - reserved
    for phase in phases:
        for i, prefix in enumerate(phase.prefixes):
            dataset = open_indexed_dataset(prefix, f"{phase.key}[{i}].path")
            share = share_of(dataset, recipe)
            a_sequence_per_document = len(dataset.sequence_lengths) == len(dataset.document_indices) - 1
            if share >= 0.9:
                advice = ""
            elif a_sequence_per_document:
                advice = (
                    "; the rest is cut off: write a sequence per sentence (tools/preprocess_data.py --split-sentences)"
                )
            else:  # split already: what is left out is the part of a sentence longer than a sample
                advice = (
                    f"; the rest is cut off: sentences longer than {room} tokens (a longer model.seq_length keeps them)"
                )
            lines.append(
                f"{kind} samples hold {share:.0%} of {prefix}'s tokens in one pass (whole sentences of one "
                f"document, up to model.seq_length - {reserved} = {room})" + advice
            )
    return lines
