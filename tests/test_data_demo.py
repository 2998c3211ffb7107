"""tools/prepare_demo.py builds what recipes/tiny.toml reads, quickly, and only once."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from bigpt.data import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
def test_prepare_demo_builds_the_tiny_recipes_data_once(tmp_path):
    first, seconds = prepare(tmp_path)
    assert seconds < 60, first
    tokenizer = load_tokenizer(tmp_path / "tokenizer.model")
    assert tokenizer.vocab_size == 4096
    dataset = IndexedDataset(str(tmp_path / "demo_text_document"))
    assert len(dataset) > 1000
    assert all(dataset[i][-1] == tokenizer.eod for i in (0, len(dataset) - 1))
    before = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    second, _ = prepare(tmp_path)
    assert second.count("skipped") == 3
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == before
