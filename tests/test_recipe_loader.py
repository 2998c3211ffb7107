"""Inheritance (deep merge, relative paths), overrides and their precedence, serialisation."""

import os
import tomllib
from textwrap import dedent

import pytest

from bigpt.recipe import BlendEntry, load_recipe, recipe_to_dict, recipe_to_toml

MINIMAL = """
name = "t"
[model]
num_layers = 2
hidden_size = 64
ffn_hidden_size = 128
num_attention_heads = 4
seq_length = 32
vocab_size = 1000
[train]
global_batch_size = 4
train_iters = 10
[optimizer]
lr = 1e-3
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(text))
    return path


@pytest.fixture
def family(tmp_path):
    """grand.toml <- shared/base.toml <- child.toml, each setting overlapping keys."""
    write(tmp_path / "grand.toml", MINIMAL + '[data]\ncache_dir = "cache"\n')
    write(
        tmp_path / "shared/base.toml",
        """
        base = "../grand.toml"
        [model]
        num_layers = 8
        hidden_size = 128
        [optimizer]
        lr = 1.0
        min_lr = 0.5
        [data]
        source = "indexed"
        tokenizer = "tok/tokenizer.model"
        blend = [{path = "a_text_document"}, {path = "b_text_document", weight = 3}]
        """,
    )
    return write(
        tmp_path / "child.toml",
        """
        base = "shared/base.toml"
        name = "child"
        [model]
        num_layers = 4
        [optimizer]
        lr = 2.0
        [data]
        blend = [{path = "c_text_document", weight = 2}]
        [checkpoint]
        dir = "ckpt"
        """,
    )


def test_deep_merge_child_wins_and_lists_are_replaced(family):
    recipe = load_recipe(family)
    assert recipe.name == "child"
    assert recipe.model.num_layers == 4  # child
    assert recipe.model.hidden_size == 128  # base, kept beside the child's model keys
    assert recipe.model.vocab_size == 1000  # grand
    assert recipe.model.activation == "swiglu"  # default
    assert recipe.optimizer.min_lr == 0.5
    assert len(recipe.data.blend) == 1


def test_paths_resolve_against_the_file_that_sets_them(family, tmp_path):
    recipe = load_recipe(family)
    assert recipe.data.tokenizer == str(tmp_path / "shared/tok/tokenizer.model")
    assert recipe.data.cache_dir == str(tmp_path / "cache")
    assert recipe.data.blend == [BlendEntry(path=str(tmp_path / "c_text_document"), weight=2.0)]


def test_run_dir_and_checkpoint_dir_stay_relative_to_the_working_directory(family):
    recipe = load_recipe(family)
    assert recipe.run_dir == "runs/child"
    assert recipe.checkpoint.dir == "ckpt"


def test_precedence_cli_over_recipe_over_base_over_defaults(family):
    assert load_recipe(family, ["optimizer.lr=3"]).optimizer.lr == 3.0
    recipe = load_recipe(family)
    assert recipe.optimizer.lr == 2.0
    assert recipe.optimizer.min_lr == 0.5
    assert recipe.optimizer.weight_decay == 0.1


def test_override_values_are_toml_or_bare_strings(tmp_path, monkeypatch):
    recipe_path = write(tmp_path / "r.toml", MINIMAL)
    monkeypatch.chdir(tmp_path / "..")
    recipe = load_recipe(
        recipe_path,
        [
            "model.activation=gelu",
            "parallel.sequence_parallel=true",
            "train.rampup_batch_size=[1, 1, 100]",
            'name="quoted"',
            "data.tokenizer=tok.model",
        ],
    )
    assert recipe.model.activation == "gelu"
    assert recipe.parallel.sequence_parallel is True
    assert recipe.train.rampup_batch_size == [1, 1, 100]
    assert recipe.name == "quoted"
    # A path typed on the command line is relative to where it was typed.
    assert recipe.data.tokenizer == os.path.join(os.getcwd(), "tok.model")


def test_ints_are_accepted_for_floats(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.toml", MINIMAL), ["optimizer.lr=1"])
    assert recipe.optimizer.lr == 1.0 and isinstance(recipe.optimizer.lr, float)


def test_toml_round_trip_of_an_inherited_recipe(family, tmp_path):
    recipe = load_recipe(family, ["train.rampup_batch_size=[2, 2, 8]", "model.kv_channels=32"])
    text = recipe_to_toml(recipe)
    assert not {"base", "source"} & set(tomllib.loads(text))
    resolved = write(tmp_path / "elsewhere/resolved.toml", text)
    assert load_recipe(resolved) == recipe


def test_recipe_to_dict_omits_unset_values(family):
    data = recipe_to_dict(load_recipe(family))
    assert "num_query_groups" not in data["model"]
    assert not {"from_hf", "from_checkpoint", "extend_vocab"} & set(data["init"])  # unset: None
    assert data["data"]["blend"][0]["weight"] == 2.0
