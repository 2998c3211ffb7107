"""Shared fixtures."""

import pytest


@pytest.fixture
def small_tokenizer(tmp_path):
    """A 100-token Hugging Face tokenizer.json: stands in for a recipe's tokenizer on a machine
    without its data (a dry run checks the tokenizer a recipe names, as a real start does)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel({"</s>": 0, **{f"w{i}": i for i in range(1, 100)}}, unk_token="w1")).save(str(path))
    return path
