"""One test per class of bad recipe: each is a BigptError naming the key and the file.

Bad recipes inherit the shipped tiny recipe and add one mistake. A few go through the CLI to
check the user-facing contract: exit code 2, the key in the message, no traceback.
"""

import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from bigpt.errors import EXIT_USER_ERROR, BigptError
from bigpt.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes/tiny.toml"
MOCK = ROOT / "tests/recipes/mock_tiny.toml"


def bad_recipe(tmp_path, text, name="bad.toml"):
    path = tmp_path / name
    path.write_text(f'base = "{TINY}"\n' + dedent(text))
    return path


def load_error(path, overrides=()) -> str:
    with pytest.raises(BigptError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def cli_error(*args) -> str:
    result = subprocess.run(
        [sys.executable, "launchers/run.py", *map(str, args), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_USER_ERROR, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_cli_malformed_toml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[model]\nnum_layers 4\n')
    message = cli_error(path)
    assert "broken.toml is not valid TOML" in message and "line 3" in message


def test_cli_unknown_key_suggests_the_right_one(tmp_path):
    message = cli_error(bad_recipe(tmp_path, "[model]\nnum_layer = 4\n"))
    assert "unknown key model.num_layer in" in message and "bad.toml" in message
    assert "did you mean model.num_layers?" in message


def test_cli_wrong_type_names_key_value_and_file(tmp_path):
    message = cli_error(bad_recipe(tmp_path, '[model]\nnum_layers = "four"\n'))
    assert "model.num_layers must be an integer, got 'four' (str) in" in message
    assert "bad.toml" in message


def test_cli_layout_rule_names_the_keys():
    message = cli_error(TINY, "parallel.tensor=3", "--world-size", "6")
    assert "model.num_attention_heads=4 is not divisible by parallel.tensor=3" in message


def test_cli_bad_override_names_the_override():
    message = cli_error(TINY, "model.num_layer=4")
    assert "unknown key model.num_layer in override 'model.num_layer=4'" in message
    assert "did you mean model.num_layers?" in message


def test_unknown_table(tmp_path):
    message = load_error(bad_recipe(tmp_path, "[modle]\nnum_layers = 4\n"))
    assert "unknown table [modle]" in message and "did you mean [model]?" in message


def test_unknown_key_without_close_match_lists_the_known_ones(tmp_path):
    message = load_error(bad_recipe(tmp_path, "[logging]\nwandb_project = 'x'\n"))
    assert "unknown key logging.wandb_project" in message and "interval, tensorboard" in message


def test_bool_is_not_an_int(tmp_path):
    message = load_error(bad_recipe(tmp_path, "[parallel]\ntensor = true\n"))
    assert "parallel.tensor must be an integer, got True (bool)" in message


def test_bad_enum_lists_the_choices(tmp_path):
    message = load_error(bad_recipe(tmp_path, '[model]\nactivation = "silu"\n'))
    assert "model.activation must be one of 'swiglu', 'gelu', 'relu', 'geglu', got 'silu'" in message


def test_non_positive_size(tmp_path):
    message = load_error(bad_recipe(tmp_path, "[model]\nhidden_size = 0\n"))
    assert "model.hidden_size must be positive, got 0 in" in message


def test_wrong_type_inside_a_list_of_tables(tmp_path):
    message = load_error(bad_recipe(tmp_path, '[data]\nblend = [{path = "a", weight = "x"}]\n'))
    assert "data.blend[0].weight must be a number, got 'x' (str)" in message


def test_table_given_as_a_value(tmp_path):
    message = load_error(bad_recipe(tmp_path, "model = 3\n"))
    assert "model must be a table, got 3 (int)" in message


def test_missing_required_key(tmp_path):
    path = tmp_path / "partial.toml"
    path.write_text('name = "x"\n[model]\nnum_layers = 2\n')
    message = load_error(path)
    assert "missing required key model.hidden_size" in message and "partial.toml" in message


def test_missing_recipe_file(tmp_path):
    assert "recipe file" in load_error(tmp_path / "nope.toml")


def test_missing_base_file_names_the_file_that_names_it(tmp_path):
    path = tmp_path / "child.toml"
    path.write_text('base = "bases/gone.toml"\nname = "x"\n')
    message = load_error(path)
    assert "bases/gone.toml does not exist" in message and "child.toml" in message


def test_inheritance_cycle_lists_the_chain(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    message = load_error(tmp_path / "a.toml")
    assert "inheritance cycle" in message
    assert message.index("a.toml") < message.index("b.toml") < message.rindex("a.toml")


def test_override_without_equals_sign():
    assert "not of the form table.key=value" in load_error(TINY, ["parallel.tensor"])


def test_override_wrong_type_names_the_override():
    message = load_error(TINY, ["train.train_iters=many"])
    assert "train.train_iters must be an integer, got 'many' (str) in override" in message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.num_query_groups=3"], "model.num_attention_heads=4 is not a multiple of model.num_query_groups=3"),
        (["model.hidden_size=130"], "model.hidden_size=130 is not divisible by model.num_attention_heads=4"),
        (['precision.fp8="delayed"', 'precision.transformer_engine="off"'], "needs Transformer Engine"),
        (
            ['precision.fp8="delayed"', "precision.fp8_bf16_first_layers=1"],
            "precision.fp8_bf16_first_layers=1 applies to precision.fp8='tensorwise' only, and "
            "precision.fp8='delayed': megatron-core cannot keep layers in bf16 with delayed scaling",
        ),
        (
            ["precision.fp8_amax_history_len=16"],
            "precision.fp8_amax_history_len=16 applies to precision.fp8='delayed' only, and precision.fp8='none': "
            "it would be ignored",
        ),
        (
            ['precision.fp8="tensorwise"', "precision.fp8_bf16_last_layers=3"],
            "precision.fp8_bf16_last_layers=3 is more than the 2 layers of a pipeline stage",
        ),
        (["train.rampup_batch_size=[3, 2, 100]"], "never reaches train.global_batch_size=8"),
        (["train.rampup_batch_size=[2, 2]"], "does not have 3 entries"),
        (["optimizer.min_lr=1.0"], "optimizer.min_lr=1.0 is above optimizer.lr"),
        (["schedule.warmup_iters=30"], "schedule.warmup_iters=30 is not below the end of the decay"),
        (["schedule.decay_style=wsd"], "needs schedule.wsd_decay_iters"),
        (["data.blend=[]"], "data.source='indexed' needs data.tokenizer and a non-empty data.blend"),
        (['data.split="100,0,0"'], "leaves no validation data"),
        (['data.split="a,b"'], "is not three comma-separated"),
        (["init.from_hf=a", "init.from_checkpoint=b"], "init.from_hf and init.from_checkpoint are both set"),
        (["init.extend_vocab=ext.json"], "ext.json is set without init.from_hf"),
        (
            ['optimizer.name="muon"', 'precision.dtype="fp16"'],
            "optimizer.name='muon' cannot train in precision.dtype='fp16'",
        ),
        (['optimizer.name="adafactor"'], "optimizer.name='adafactor' cannot be offered: its factored second moments"),
        (
            ['model.position_embedding="learned"', "model.max_position_embeddings=64"],
            "model.max_position_embeddings=64 is shorter than model.seq_length=128",
        ),
        (
            ['model.rope_scaling="llama3"', "model.rope_high_freq_factor=1.0"],
            "model.rope_high_freq_factor=1.0 is not above model.rope_low_freq_factor=1.0",
        ),
        (["model.kv_channels=15"], "model.kv_channels=15 is odd, but rotary embeddings"),
        (
            ["model.hidden_size=132"],
            "the head width model.hidden_size / model.num_attention_heads = 33 is odd, but rotary embeddings",
        ),
        (
            [f"train.train_iters={10**19}"],
            f"train.train_iters={10**19} × train.global_batch_size=8 × model.seq_length=128 = 1.024e+22 tokens, "
            "more than the 9.223e+18 that megatron-core's dataset indices (int64) can count",
        ),
        ([f"eval.iters={2**60}"], f"eval.iters={2**60} × train.global_batch_size=8"),
        (
            [f"train.seed={2**32 - 100}"],
            f"train.seed={2**32 - 100} is too large: the seeds derived from it (up to train.seed + 100, for "
            "parallel.pipeline=2 and 0 data.phases) must be at most 4294967295",
        ),
        (
            ["optimizer.adam_beta2=1.0"],
            "optimizer.adam_beta2=1.0 with optimizer.name='adamw': the moment would never decay",
        ),
        (['recompute.modules=["mlp"]'], "recompute.modules set while recompute.granularity = 'none'"),
        (
            ['recompute.granularity="selective"', 'recompute.modules=["mlp"]', "recompute.num_layers=2"],
            "recompute.num_layers set while recompute.granularity = 'selective'",
        ),
    ],
)
def test_cross_field_rule(overrides, expected):
    message = load_error(TINY, overrides)
    assert expected in message
    assert any(f"override '{override}'" in message for override in overrides)  # what set the value, not the file


TINY_LABEL = "recipes/tiny.toml"  # as the recipe was named: relative to the working directory (the repository)


@pytest.mark.parametrize(
    "recipe_text, overrides, where",
    [
        # Every key the problem names was set by an override: the file is not blamed.
        ("", ["model.kv_channels=15"], "in override 'model.kv_channels=15'; "),
        ("", ['recompute.modules=["mlp"]'], """in override 'recompute.modules=["mlp"]'; """),
        # One by an override, one by the file: both, in the order the problem names them.
        ("", ["model.num_query_groups=3"], f"in {TINY_LABEL} and override 'model.num_query_groups=3'; "),
        ("", ["optimizer.min_lr=1.0"], f"in override 'optimizer.min_lr=1.0' and {TINY_LABEL}; "),
        # A list set by an override (data.phases), beside a list and a value of the file's table.
        (
            "",
            ['data.source="mock"', "data.phases=[{start_tokens=100, blend=[{path='a'}]}]"],
            f"in {TINY_LABEL} and override 'data.phases=[{{start_tokens=100, blend=[{{path='a'}}]}}]' and "
            """override 'data.source="mock"'; """,
        ),
        # An override beside the child recipe's value; the child's value beside its base's.
        (
            "[train]\ntrain_iters = 40\n",
            ["schedule.warmup_iters=50"],
            "in override 'schedule.warmup_iters=50' and {bad}; ",
        ),
        ("[schedule]\nwarmup_iters = 50\n", [], f"in {{bad}} and {TINY_LABEL}; "),
        ("[model]\nnum_query_groups = 3\n", [], f"in {TINY_LABEL} and {{bad}}; "),
        # An override of a key the child recipe also sets: the override is what to change.
        ("[model]\nnum_query_groups = 1\n", ["model.num_query_groups=3"], "override 'model.num_query_groups=3'; "),
    ],
)
def test_a_problem_is_placed_where_its_values_were_set(tmp_path, recipe_text, overrides, where):
    """Each key a cross-field problem names is attributed to the layer that set it: a command-line
    override, the recipe file, or the base recipe it inherits from."""
    path = bad_recipe(tmp_path, recipe_text) if recipe_text else TINY
    message = load_error(path, overrides)
    assert where.replace("{bad}", str(path)) in message
    if recipe_text.startswith("[model]") and overrides:
        assert str(path) not in message


def test_a_layout_problem_names_the_override_that_caused_it():
    from bigpt.layout import Layout

    with pytest.raises(BigptError) as info:
        Layout.from_recipe(load_recipe(TINY, ["train.global_batch_size=10"]), world_size=8)
    assert "train.global_batch_size 10 is not divisible by train.micro_batch_size × data parallel" in str(info.value)
    assert f"in override 'train.global_batch_size=10' and {TINY_LABEL}; " in str(info.value)


def test_an_odd_head_width_is_fine_without_rotary_embeddings():
    """The RoPE rule is about RoPE: learned positions take any head width."""
    recipe = load_recipe(TINY, ["model.kv_channels=15", 'model.position_embedding="learned"'])
    assert recipe.model.kv_channels == 15


def test_data_phases_need_real_datasets(tmp_path):
    message = load_error(
        bad_recipe(
            tmp_path,
            """
        [data]
        source = "mock"
        [[data.phases]]
        start_tokens = 1000
        blend = [{path = "anneal_text_document"}]
        """,
        )
    )
    assert "data.phases set, but data.source='mock' (random tokens" in message


@pytest.mark.parametrize(
    "recipe_text",
    [
        '[data]\nsource = "mock"\ntokenizer = "t.model"\nblend = [{path = "corpus_text_document"}]\n',
        '[data]\ntokenizer = "t.model"\nblend = [{path = "corpus_text_document"}]\n',  # source left to its default
        '[data]\nsource = "mock"\ncache_dir = "cache"\n',
    ],
)
def test_data_keys_that_mock_data_would_ignore_are_refused(tmp_path, recipe_text):
    """No recipe naming real data trains on random tokens without a word."""
    path = tmp_path / "mock.toml"
    path.write_text(MOCK.read_text().replace('[data]\nsource = "mock"\n', "") + recipe_text)
    message = load_error(path)
    assert "but data.source='mock' (random tokens, the default when source is not set) ignores them" in message
    assert "set source = 'indexed'" in message and "mock.toml" in message


def _float_keys(cls, prefix=""):
    """Every float key of a recipe schema, dotted (tables of tables included, lists of tables not)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        options = typing.get_args(annotation) if typing.get_origin(annotation) is not None else (annotation,)
        if float in options:
            yield prefix + f.name
        elif dataclasses.is_dataclass(annotation):
            yield from _float_keys(annotation, f"{prefix}{f.name}.")


FLOAT_KEYS = list(_float_keys(Recipe))


def test_every_float_key_is_found():
    assert {
        "optimizer.lr",
        "model.init_std",
        "optimizer.adam_eps",
        "model.rope_base",
        "train.clip_grad",
        "model.norm_epsilon",
        "optimizer.weight_decay",
    } <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_key_must_be_finite(key, value):
    message = load_error(TINY, [f"{key}={value}"])
    assert f"{key} must be a finite number, got" in message and f"override '{key}={value}'" in message


def test_a_non_finite_number_in_a_list_of_tables(tmp_path):
    message = load_error(bad_recipe(tmp_path, '[data]\nblend = [{path = "a", weight = inf}]\n'))
    assert "data.blend[0].weight must be a finite number, got inf" in message and "bad.toml" in message


def test_a_non_finite_curation_threshold_is_refused(tmp_path):
    from bigpt.curate.recipe import load_curation_recipe

    with pytest.raises(BigptError, match="must be a finite number"):
        load_curation_recipe(ROOT / "recipes/data/web_quality.toml", ["stage.gopher_quality.min_avg_word_length=nan"])
