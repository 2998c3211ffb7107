"""Hugging Face directories as they come (issue 25 part 7): shards in different float dtypes, a tied
model that stores an output layer of its own, shard sizes out of range. In-process, tiny models."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bigpt.errors import EXIT_USER_ERROR, BigptError
from bigpt.hf.files import INDEX, inspect_hf
from test_hf import SHAPES, save_model
from tools.convert_hf import main as convert_main

TIED = dict(SHAPES["mha_untied"], tie_word_embeddings=True)


def shards_of(directory: Path) -> list[Path]:
    return [
        directory / name for name in sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
    ]


def recast(directory: Path, dtype_of_shard, config_dtype: str | None) -> dict[str, torch.Tensor]:
    """Each shard re-saved in ``dtype_of_shard(number)``, config.json's dtype set to
    ``config_dtype`` (or removed); returns the tensors as now stored."""
    stored = {}
    for number, shard in enumerate(shards_of(directory)):
        tensors = {name: tensor.to(dtype_of_shard(number)) for name, tensor in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
        stored.update(tensors)
    config = json.loads((directory / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        config.pop(key, None)
    if config_dtype:
        config["torch_dtype"] = config_dtype
    (directory / "config.json").write_text(json.dumps(config))
    return stored


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A small model in several shards (float32 as saved), kept as the reference."""
    directory = save_model(tmp_path_factory.mktemp("hf") / "model", 0, SHAPES["mha_untied"], max_shard_size="100KB")
    assert len(shards_of(directory)) > 2
    return directory, {name: tensor for shard in shards_of(directory) for name, tensor in load_file(shard).items()}


def alternating(number: int) -> torch.dtype:
    return torch.bfloat16 if number % 2 else torch.float16


@pytest.mark.parametrize("config_dtype, read_as", [("bfloat16", torch.bfloat16), (None, torch.float32)])
def test_shards_mixing_float16_and_bfloat16_are_read_in_one_dtype_with_a_note(
    sharded, tmp_path, capsys, config_dtype, read_as
):
    """Read as config.json's torch_dtype (as transformers loads them), or float32 (which holds
    both exactly) without one; the import completes (a stacked tensor used to fail an assertion
    inside torch's writer) and says what it converted."""
    from bigpt.hf.convert import import_hf
    from bigpt.runtime.distributed import process_group_of_one

    directory = tmp_path / "mixed"
    directory.mkdir()
    for file in sharded[0].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    stored = recast(directory, alternating, config_dtype)
    model, weights = inspect_hf(directory)
    assert weights.dtype == read_as
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert weights.get(name).dtype == read_as and torch.equal(weights.get(name), stored[name].to(read_as))
    with process_group_of_one():
        import_hf(directory, tmp_path / "imported")
    note = capsys.readouterr().err
    assert "the weights mix bfloat16 (" in note and "and float16 (" in note, note
    assert f"every tensor is read as {str(read_as).removeprefix('torch.')}" in note


def test_a_value_the_common_dtype_cannot_hold_is_refused_naming_the_tensor(sharded, tmp_path):
    directory = tmp_path / "mixed"
    directory.mkdir()
    for file in sharded[0].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    recast(directory, alternating, "float16")
    bf16_shard = next(
        shard for shard in shards_of(directory) if next(iter(load_file(shard).values())).dtype == torch.bfloat16
    )
    tensors = load_file(bf16_shard)
    name = next(iter(tensors))
    tensors[name][0, 0] = 1e6  # beyond float16's 65504
    save_file(tensors, bf16_shard, metadata={"format": "pt"})
    _, weights = inspect_hf(directory)
    with pytest.raises(BigptError, match=f"tensor {name} in .* holds values beyond the range of torch.float16"):
        weights.get(name)


@pytest.fixture
def tied(tmp_path):
    return save_model(tmp_path / "tied", 0, TIED)


def test_a_tied_model_storing_its_embedding_again_imports(tied):
    weights = load_file(tied / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    _, read = inspect_hf(tied)
    assert "lm_head.weight" not in read.files


def test_a_tied_model_whose_output_layer_differs_from_its_embedding_is_refused(tied):
    weights = load_file(tied / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    weights["lm_head.weight"][-1, -1] += 0.5  # the last row: every block of rows is compared
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        BigptError,
        match="ties the output layer to the embedding .* lm_head.weight in model.safetensors "
        "differs from model.embed_tokens.weight",
    ) as refusal:
        inspect_hf(tied)
    assert '"tie_word_embeddings": false' in str(refusal.value)


@pytest.mark.parametrize("size", ["0", "-1", "nan", "inf", "1e-9", "1e12"])
def test_an_out_of_range_shard_size_is_refused_before_any_work(tmp_path, capsys, size):
    assert (
        convert_main(["export", str(tmp_path / "none"), str(tmp_path / "out"), "--max-shard-gb", size])
        == EXIT_USER_ERROR
    )
    err = capsys.readouterr().err
    assert f"--max-shard-gb {float(size)}: the largest safetensors shard must be a size in GiB" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
