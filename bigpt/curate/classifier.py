"""Train the fastText quality classifier that the ``quality_classifier`` stage applies.

Positive examples (trusted text: reference books, curated articles) get ``__label__hq``,
negative ones (raw web pages, spam) ``__label__lq``; a held-out share measures how well the
model separates them. Training is single-threaded with a fixed seed, so it is reproducible.
"""

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bigpt.data.encode import JSONL_SUFFIXES, document_text
from bigpt.errors import BigptError
from bigpt.paths import not_a_file, replacing_atomically


@dataclass
class ClassifierSummary:
    train_examples: int
    held_out: int
    precision: float
    """Of held-out documents scored good, the share that are positive examples."""
    recall: float
    """Of held-out positive examples, the share scored good."""

    def line(self, out: str) -> str:
        return (
            f"wrote {out}: trained on {self.train_examples:,} documents; on {self.held_out:,} "
            f"held out: precision {self.precision:.3f}, recall {self.recall:.3f} at score 0.5"
        )


def train_quality_classifier(
    positive: Path,
    negative: Path,
    out: Path,
    *,
    text_field: str = "text",
    label: str = "hq",
    negative_label: str = "lq",
    epochs: int = 20,
    lr: float = 0.5,
    ngrams: int = 2,
    dim: int = 32,
    buckets: int = 200_000,
    held_out: float = 0.1,
    seed: int = 0,
) -> ClassifierSummary:
    import fasttext

    examples = [(label, text) for text in _documents(Path(positive), text_field)] + [
        (negative_label, text) for text in _documents(Path(negative), text_field)
    ]
    random.Random(seed).shuffle(examples)
    split = int(len(examples) * held_out)
    test, train = examples[:split], examples[split:]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, dir=out.parent) as f:
        f.writelines(f"__label__{name} {_one_line(text)}\n" for name, text in train)
    try:
        model = fasttext.train_supervised(
            f.name, epoch=epochs, lr=lr, wordNgrams=ngrams, dim=dim, bucket=buckets, thread=1, seed=seed, verbose=0
        )
    finally:
        os.unlink(f.name)
    with replacing_atomically(out, "--out") as temporary:
        model.save_model(str(temporary))
    scored_good = [name for name, text in test if _score(model, text, label) >= 0.5]
    true_good = sum(1 for name in scored_good if name == label)
    positives = sum(1 for name, _ in test if name == label)
    return ClassifierSummary(len(train), len(test), true_good / max(len(scored_good), 1), true_good / max(positives, 1))


def _score(model, text: str, label: str) -> float:
    labels, scores = model.predict(_one_line(text), k=-1)
    return dict(zip(labels, scores)).get(f"__label__{label}", 0.0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _documents(path: Path, text_field: str) -> list[str]:
    """Documents of a JSONL file (``text_field``) or a text file (one per line)."""
    if why := not_a_file(path):
        raise BigptError(f"example file {path} {why}.")
    jsonl = path.suffix in JSONL_SUFFIXES
    texts = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                texts.append(document_text(raw, jsonl=jsonl, text_field=text_field))
            except ValueError as err:
                raise BigptError(f"{path}:{number}: {err}") from None
    if not texts:
        raise BigptError(f"example file {path} has no documents; give one document per line.")
    return texts
