"""tools/prepare_demo.py builds what the demo recipes read, quickly, and only once; and the
demos scripts/demo.sh runs (recipes/tiny_<demo>.toml at its intended world size) train on it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from bigpt.data import load_tokenizer
from bigpt.data.masked import masked_vocabulary
from bigpt.recipe import load_recipe
from multirank import run_bigpt, scalars
from test_recipes import intended_world_size

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "demo"  # where the demo recipes' paths lead


def prepare(out: Path) -> tuple[str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_demo.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return result.stdout, time.monotonic() - started


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> tuple[Path, str, float]:
    """The demo data, built once: its directory, what the tool said and how long it took."""
    out = tmp_path_factory.mktemp("demo")
    return out, *prepare(out)


@pytest.mark.slow
def test_prepare_demo_builds_the_demo_recipes_data_once(demo_data):
    out, first, seconds = demo_data
    assert seconds < 60, first
    tokenizer = load_tokenizer(out / "tokenizer.model")
    assert tokenizer.vocab_size == 4096
    dataset = IndexedDataset(str(out / "demo_text_document"))
    assert len(dataset) > 1000
    assert all(dataset[i][-1] == tokenizer.eod for i in (0, len(dataset) - 1))
    # the encoder's (and T5's): the same vocabulary size with <pad>, <mask> and sentinels, a sequence per sentence
    masked = load_tokenizer(out / "masked_tokenizer.model")
    vocabulary = masked_vocabulary(masked, "masked_tokenizer.model", whole_word=True)
    assert (masked.vocab_size, vocabulary.pad, vocabulary.mask) == (4096, 3, 4)
    assert masked.pieces()[5:105] == [f"<extra_id_{n}>" for n in range(100)]
    sentences = IndexedDataset(str(out / "demo_text_sentence"))
    assert len(sentences.document_indices) - 1 == len(dataset.document_indices) - 1 < len(sentences)
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    second, _ = prepare(out)
    assert second.count("skipped") == 5
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before


@pytest.mark.slow
@pytest.mark.parametrize("demo", ["moe", "encoder", "t5"])
def test_the_demo_trains(demo_data, demo, tmp_path):
    """What `bash scripts/demo.sh moe|encoder|t5 train.train_iters=10` runs, on the data built above:
    the loss falls, and validation runs."""
    recipe = REPO / "recipes" / f"tiny_{demo}.toml"
    data = load_recipe(recipe).data
    assert data.tokenizer and data.blend

    def built(path: str) -> str:  # the recipe's file in data/demo, in the one built above
        return str(demo_data[0] / Path(path).relative_to(DEMO_DATA))

    blend = ", ".join(f"{{path='{built(entry.path)}'}}" for entry in data.blend)
    run = run_bigpt(
        recipe,
        f"run_dir={tmp_path}",
        "train.train_iters=10",
        f"data.tokenizer='{built(data.tokenizer)}'",
        f"data.blend=[{blend}]",
        nproc=intended_world_size(recipe),
    )
    losses = scalars(tmp_path, "train/loss")
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.2, losses
    assert "step 10 | validation loss" in run.stdout
