"""Zero-shot multiple-choice tasks: the JSONL format, and each choice as one scoring sample, built
as lm-evaluation-harness builds its log-likelihood requests.

One example per line: ``{"context": "The capital of France is", "choices": ["Paris", "Rome"],
"gold": 0}``. Each choice is scored by the log-likelihood of ``" " + choice`` (lm-eval's target
delimiter) after the context: the context and the whole text are tokenized separately and the
choice is what the whole has beyond the context's tokens (trailing spaces of the context move to
the choice, as lm-eval's ``_encode_pair`` does); an empty context is the end-of-text token. A
sample longer than model.seq_length + 1 tokens loses its start, as lm-eval truncates.
``acc``: the gold choice has the highest log-likelihood; ``acc_norm``: the highest log-likelihood
per character of the choice (lm-eval's ``acc_norm``); the first choice wins a tie.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bigpt.data.tokenizer import Tokenizer
from bigpt.errors import BigptError

DELIMITER = " "
"""Between the context and a choice (lm-evaluation-harness's default target_delimiter)."""


@dataclass(frozen=True)
class Example:
    context: str
    choices: list[str]
    gold: int


def read_task(path: str | Path, key: str) -> list[Example]:
    """The examples of the task file ``path`` (named by the recipe key ``key``), every line checked."""
    where = f"{key} = {path}"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BigptError(
            f"{where} cannot be read ({err}); give a UTF-8 JSONL task file (docs/evaluation.md)."
        ) from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            example = Example(fields["context"], list(fields["choices"]), fields["gold"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise BigptError(
                f"{where}, line {number}: not a task example ({type(err).__name__}: {err}); each line is "
                '{"context": "...", "choices": ["...", "..."], "gold": <index of the right choice>} '
                "(docs/evaluation.md)."
            ) from None
        if not (
            isinstance(example.context, str)
            and len(example.choices) >= 2
            and all(isinstance(choice, str) and choice for choice in example.choices)
            and isinstance(example.gold, int)
            and 0 <= example.gold < len(example.choices)
        ):
            raise BigptError(
                f"{where}, line {number}: the context must be text, the choices at least two non-empty "
                f"texts, and gold the index of one of them (0..{len(example.choices) - 1}); fix the line "
                "or remove it."
            )
        examples.append(example)
    if not examples:
        raise BigptError(f"{where} holds no example; give at least one line (docs/evaluation.md).")
    return examples


def plan_tasks(recipe) -> str:
    """For the dry run: each task of eval.tasks, read and checked as a start reads it, and what one
    evaluation scores."""
    lines = []
    for i, entry in enumerate(recipe.eval.tasks):
        examples = read_task(entry.path, f"eval.tasks[{i}].path")[: entry.limit]
        choices = sum(len(example.choices) for example in examples)
        lines.append(
            f"task {entry.name}: {len(examples)} examples, {choices} choices scored per evaluation ({entry.path})"
        )
    return "\n".join(lines)


def context_and_continuation(tokenizer: Tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``_encode_pair`` of (context, delimiter + choice)."""
    continuation = DELIMITER + choice
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return (context_ids or [tokenizer.eod]), whole[len(context_ids) :]


def scoring_samples(examples: list[Example], tokenizer: Tokenizer, seq_length: int) -> list[dict[str, torch.Tensor]]:
    """One sample per (example, choice), in order, in the training batches' layout: the loss mask
    covers the choice's tokens, so the masked loss sum is minus the choice's log-likelihood."""
    samples = []
    for example in examples:
        for choice in example.choices:
            context, continuation = context_and_continuation(tokenizer, example.context, choice)
            ids = (context + continuation)[-(seq_length + 1) :]
            scored = min(len(continuation), len(ids) - 1)
            samples.append(_sample(ids, scored, seq_length, tokenizer.eod))
    return samples


def blank_sample(seq_length: int, eod: int) -> dict[str, torch.Tensor]:
    """A sample that scores nothing: pads the last global batch."""
    return _sample([eod, eod], 0, seq_length, eod)


def _sample(ids: list[int], scored: int, seq_length: int, eod: int) -> dict[str, torch.Tensor]:
    inputs, labels = ids[:-1], ids[1:]
    pad = seq_length - len(inputs)
    mask = [0.0] * (len(labels) - scored) + [1.0] * scored + [0.0] * pad
    return {
        "tokens": torch.tensor(inputs + [eod] * pad, dtype=torch.int64),
        "labels": torch.tensor(labels + [eod] * pad, dtype=torch.int64),
        "loss_mask": torch.tensor(mask, dtype=torch.float32),
        "position_ids": torch.arange(seq_length, dtype=torch.int64),
    }


def accuracies(examples: list[Example], loglikelihoods: list[float]) -> dict[str, float]:
    """acc and acc_norm (lm-evaluation-harness's definitions) from each choice's log-likelihood, in
    ``scoring_samples`` order."""
    correct = correct_norm = 0
    position = 0
    for example in examples:
        scores = loglikelihoods[position : position + len(example.choices)]
        position += len(example.choices)
        normed = [score / len(choice) for score, choice in zip(scores, example.choices)]
        correct += max(range(len(scores)), key=lambda i: (scores[i], -i)) == example.gold
        correct_norm += max(range(len(normed)), key=lambda i: (normed[i], -i)) == example.gold
    return {"acc": correct / len(examples), "acc_norm": correct_norm / len(examples)}
