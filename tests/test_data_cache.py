"""The sample-index cache cannot go stale: keyed on each index file's identity, checked before use."""

import pytest

from bigpt.data import build_datasets
from test_data_support import indexed_recipe, write_indexed

EOD = 2


def documents(first_token: int, count: int, longest: int) -> list[list[int]]:
    """``count`` documents told apart by their token ids (from ``first_token`` on), each ending in EOD."""
    return [list(range(first_token, first_token + n % longest + 5)) + [EOD] for n in range(count)]


def build(recipe):
    return build_datasets(recipe, world_rank=0, train_samples=30, valid_samples=4)


def first_tokens(dataset, count=30) -> set[int]:
    return {int(dataset[k]["tokens"][0]) for k in range(count)} - {EOD}


@pytest.mark.parametrize("blended", [False, True])
def test_a_corpus_retokenised_under_the_same_prefix_gets_new_indices(tmp_path, tokenizer_path, capsys, blended):
    """The old indices would point past the new corpus's end (an IndexError) or at other samples."""
    web = write_indexed(tmp_path / "web", documents(10, 120, 80))
    books = write_indexed(tmp_path / "books", documents(300, 60, 90))
    recipe = indexed_recipe(tmp_path, tokenizer_path, [web, books] if blended else [web], seq_length=16)
    train, _ = build(recipe)
    assert max(first_tokens(train)) < 400
    capsys.readouterr()
    write_indexed(tmp_path / "web", documents(200, 40, 10))  # re-tokenised: fewer, shorter, other ids
    train, valid = build(recipe)
    seen = first_tokens(train)
    assert seen and all(200 <= token < 215 or token >= 300 for token in seen)
    assert all(200 <= int(valid[k]["tokens"][0]) < 215 or int(valid[k]["tokens"][0]) >= 300 for k in range(4))
    said = capsys.readouterr().err
    assert f"the train indices cached for {web} were built from another version of {web}.idx" in said
    assert "they are dropped and built anew" in said
    cache = tmp_path / "run" / "data_cache"
    assert len(list(cache.glob("*-KeyedGPTDataset-train-description.txt"))) == (2 if blended else 1)
    capsys.readouterr()
    again, _ = build(recipe)  # unchanged since: the new indices are reused, without a word
    assert [again[k]["tokens"].tolist() for k in range(30)] == [train[k]["tokens"].tolist() for k in range(30)]
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "victim, damage",
    [  # each file a set holds, each way a write is cut short
        ("document_index", "empty"),
        ("sample_index", "data cut"),
        ("shuffle_index", "header cut"),
        ("BlendedDataset-train-dataset_index", "data cut"),
        ("sample_index", "bytes appended"),
    ],
)
def test_a_damaged_cache_file_is_rebuilt_and_said(tmp_path, tokenizer_path, capsys, victim, damage):
    """As a kill or a full disk leaves a file megatron-core was writing (it writes in place)."""
    web = write_indexed(tmp_path / "web", documents(10, 120, 80))
    books = write_indexed(tmp_path / "books", documents(300, 60, 90))
    recipe = indexed_recipe(tmp_path, tokenizer_path, [web, books], seq_length=16)
    train, _ = build(recipe)
    expected = [train[k]["tokens"].tolist() for k in range(30)]
    cache = tmp_path / "run" / "data_cache"
    (path,) = [p for p in cache.glob(f"*-{victim}.npy") if "-train-" in p.name][:1]
    whole = path.read_bytes()
    cut = {
        "empty": b"",
        "header cut": whole[:20],
        "data cut": whole[: len(whole) - 8],
        "bytes appended": whole + b"\0" * 8,
    }
    path.write_bytes(cut[damage])
    capsys.readouterr()
    train, _ = build(recipe)
    assert [train[k]["tokens"].tolist() for k in range(30)] == expected
    said = capsys.readouterr().err
    assert f"data.cache_dir {cache}: {path.name} is damaged (" in said
    assert "the indices cached with it are dropped and built anew" in said
    assert path.read_bytes() == whole


def test_a_damaged_cache_file_that_cannot_be_deleted_is_named(tmp_path, tokenizer_path, monkeypatch):
    from pathlib import Path

    from bigpt.errors import BigptError

    web = write_indexed(tmp_path / "web", documents(10, 120, 80))
    recipe = indexed_recipe(tmp_path, tokenizer_path, [web], seq_length=16)
    build(recipe)
    cache = tmp_path / "run" / "data_cache"
    (path,) = cache.glob("*-train-sample_index.npy")
    path.write_bytes(path.read_bytes()[:-8])
    unlink = Path.unlink

    def not_ours(self, *args, **kwargs):  # another user's files, in a folder this user cannot write
        if self.parent == cache:
            raise PermissionError(13, "Permission denied")
        unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", not_ours)
    with pytest.raises(BigptError, match=rf"data.cache_dir {cache}: .* is cached with {path.name}, which is damaged"):
        build(recipe)


def test_an_encoders_corpus_retokenised_under_the_same_prefix_gets_new_indices(tmp_path, capsys):
    """The masked-LM datasets cache their sample index (of sentences) the same way."""
    import json
    from pathlib import Path

    from bigpt.recipe import load_recipe

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>", *(f"w{i}" for i in range(60))]
    model = {"type": "WordLevel", "vocab": {piece: i for i, piece in enumerate(vocab)}, "unk_token": "[UNK]"}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": model}))
    old, new = range(6, 36), range(36, 66)  # the ids of each version's words
    prefix = write_indexed(tmp_path / "corpus", [[old[(d + k) % 30] for k in range(5 + d % 7)] for d in range(80)])
    recipe = load_recipe(
        Path(__file__).parent / "recipes" / "mock_encoder.toml",
        [
            f"model.vocab_size={len(vocab)}",
            "model.seq_length=16",
            "data.source='indexed'",
            f"data.tokenizer='{tmp_path / 'tokenizer.json'}'",
            f"data.blend=[{{path='{prefix}'}}]",
            "data.split='100,0,0'",
            f"data.cache_dir='{tmp_path / 'cache'}'",
        ],
    )
    build_datasets(recipe, world_rank=0, train_samples=20, valid_samples=0)
    capsys.readouterr()
    write_indexed(tmp_path / "corpus", [[new[(d + k) % 30] for k in range(3 + d % 4)] for d in range(30)])
    train, _ = build_datasets(recipe, world_rank=0, train_samples=20, valid_samples=0)
    words = [token for k in range(20) for token in train[k]["tokens"].tolist() if token >= old.start]
    assert sum(token in new for token in words) > 0.8 * len(words)  # masking swaps a few for random words
    assert "were built from another version of" in capsys.readouterr().err
