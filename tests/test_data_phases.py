"""Data phases (a later blend from a token count on), epochs-derived weights, plan_tokens."""

import pytest

from bigpt.data import build_datasets, micro_batches, plan_tokens
from bigpt.data.phases import plan_phases
from bigpt.errors import BigptError
from bigpt.recipe.tables import BlendEntry, DataPhase
from test_data_support import indexed_recipe, write_indexed

SEQ = 16
EOD = 2


def Entry(**fields):
    """A [[data.phases]] entry (has start_tokens) or a blend entry, as the recipe loader makes them."""
    return (DataPhase if "start_tokens" in fields else BlendEntry)(**fields)


@pytest.fixture(scope="module")
def web_and_books(tmp_path_factory):
    """Two datasets told apart by their token ids: web uses 10-99, books 200-299."""
    directory = tmp_path_factory.mktemp("datasets")
    web = write_indexed(directory / "web", [list(range(10, 10 + n % 80 + 5)) + [EOD] for n in range(100)])
    books = write_indexed(directory / "books", [list(range(200, 200 + n % 90 + 5)) + [EOD] for n in range(60)])
    return web, books


def recipe_with_phases(tmp_path, tokenizer_path, first, phases):
    recipe = indexed_recipe(tmp_path, tokenizer_path, [first], seq_length=SEQ)
    recipe.data.phases = phases
    return recipe


def test_a_later_phase_takes_over_at_its_token_count(tmp_path, tokenizer_path, web_and_books):
    web, books = web_and_books
    recipe = recipe_with_phases(
        tmp_path, tokenizer_path, web, [Entry(start_tokens=10 * SEQ, blend=[Entry(path=books, weight=1.0)])]
    )
    train, valid = build_datasets(recipe, world_rank=0, train_samples=30, valid_samples=4)
    assert len(train) >= 30
    sources = ["web" if max(train[k]["tokens"]) < 100 else "books" for k in range(30)]
    assert sources == ["web"] * 10 + ["books"] * 20
    assert all(max(valid[k]["tokens"]) < 100 for k in range(4))  # validation: data.blend
    # Resuming inside the second phase continues it.
    rows = next(micro_batches(train, consumed_samples=12, micro_batch_size=2, dp_rank=0, dp_size=1))["tokens"]
    assert rows.tolist() == [train[12]["tokens"].tolist(), train[13]["tokens"].tolist()]


def test_epochs_set_weights_from_training_split_sizes(tmp_path, tokenizer_path, web_and_books):
    web, books = web_and_books
    recipe = recipe_with_phases(
        tmp_path,
        tokenizer_path,
        web,
        [
            Entry(
                start_tokens=40 * SEQ,
                blend=[Entry(path=web, weight=1.0, epochs=1.0), Entry(path=books, weight=1.0, epochs=3.0)],
            )
        ],
    )
    second = plan_phases(recipe, train_samples=100)[1]
    assert (second.first_sample, second.samples) == (40, 60)
    web_tokens, books_tokens = second.train_tokens
    assert second.weights == [1.0 * web_tokens, 3.0 * books_tokens]


def test_plan_tokens_tabulates_shares_and_epochs(tmp_path, tokenizer_path, web_and_books):
    web, books = web_and_books
    recipe = recipe_with_phases(
        tmp_path,
        tokenizer_path,
        web,
        [Entry(start_tokens=1000, blend=[Entry(path=web, weight=1.0), Entry(path=books, weight=3.0)])],
    )
    table = plan_tokens(recipe, train_samples=200).splitlines()
    assert table[0].split() == ["phase", "tokens", "dataset", "share", "drawn", "split", "size", "epochs"]
    first, *second = table[1:]
    assert first.split()[:4] == ["data.blend", "0-992", web, "100.0%"]
    assert [row.split()[3] for row in second] == ["25.0%", "75.0%"]


def test_plan_tokens_refuses_what_a_real_start_refuses(tmp_path, tokenizer_path, web_and_books):
    """The dry run's table is no excuse to pass over a dataset that is not there: it is an error, as
    at a real start, naming the recipe key."""
    recipe = recipe_with_phases(
        tmp_path,
        tokenizer_path,
        web_and_books[0],
        [Entry(start_tokens=1000, blend=[Entry(path=str(tmp_path / "elsewhere"), weight=4.0)])],
    )
    with pytest.raises(BigptError, match=r"data\.phases\[0\]\.blend\[0\]\.path: no indexed dataset at prefix"):
        plan_tokens(recipe, train_samples=200)


@pytest.mark.parametrize(
    "phases, problem",
    [
        ([Entry(start_tokens=0, blend=["x"])], r"data\.phases\[0\]\.start_tokens = 0 must come after"),
        ([Entry(start_tokens=64 * SEQ, blend=["x"])], r"before the end of training \(1024 tokens\)"),
        ([Entry(start_tokens=32, blend=[])], r"data\.phases\[0\]\.blend is empty"),
    ],
)
def test_phases_out_of_place_are_refused(tmp_path, tokenizer_path, web_and_books, phases, problem):
    recipe = recipe_with_phases(tmp_path, tokenizer_path, web_and_books[0], phases)
    with pytest.raises(BigptError, match=problem):
        plan_phases(recipe, train_samples=64)


def test_epochs_must_be_given_for_the_whole_blend_or_not_at_all(tmp_path, tokenizer_path, web_and_books):
    web, books = web_and_books
    recipe = recipe_with_phases(
        tmp_path,
        tokenizer_path,
        web,
        [
            Entry(
                start_tokens=32,
                blend=[Entry(path=web, weight=1.0, epochs=2.0), Entry(path=books, weight=1.0, epochs=None)],
            )
        ],
    )
    with pytest.raises(BigptError, match=r"data\.phases\[0\]\.blend: give epochs for every"):
        plan_phases(recipe, train_samples=64)


def test_an_evaluation_that_rereads_a_tiny_validation_split_says_so(tmp_path, tokenizer_path, web_and_books):
    """web's validation split is 10 documents (~500 tokens): 50 batches of 8 × 16 tokens read it
    ~13 times over per evaluation, a loss measured on a few documents. Said at the start (rank 0)
    and in the dry run's data plan; 2 batches are not worth a word."""
    recipe = recipe_with_phases(tmp_path, tokenizer_path, web_and_books[0], [])
    recipe.eval.interval = 5
    recipe.eval.iters = 50
    plan = plan_tokens(recipe, train_samples=80)
    assert "warning: each evaluation reads the validation split of data.blend[0]" in plan
    assert "times over (eval.iters × train.global_batch_size × model.seq_length = 6,400 tokens)" in plan
    recipe.eval.iters = 2
    assert "warning" not in plan_tokens(recipe, train_samples=80)


@pytest.mark.parametrize("seq_length, global_batch_size", [(SEQ, 2), (SEQ, 8), (SEQ // 2, 8), (SEQ * 2, 2)])
def test_a_resume_with_another_batch_or_sequence_length_switches_phase_at_its_token_count(
    tmp_path, tokenizer_path, web_and_books, seq_length, global_batch_size
):
    """A checkpoint saved after 3 steps of 4 samples of SEQ tokens (192 tokens); the resumed run
    reads the stream bigpt builds for it (its length, its position) with other batches: books,
    the phase from 20 × SEQ tokens on, begin where that many tokens have been consumed."""
    from dataclasses import replace

    from bigpt.layout import Resumed, data_position, train_samples_needed

    web, books = web_and_books
    start_tokens = 20 * SEQ
    recipe = recipe_with_phases(
        tmp_path, tokenizer_path, web, [Entry(start_tokens=start_tokens, blend=[Entry(path=books, weight=1.0)])]
    )
    recipe.model.seq_length = seq_length
    recipe.train = replace(recipe.train, global_batch_size=global_batch_size, micro_batch_size=1)
    resumed = Resumed(
        iteration=3,
        consumed_samples=12,
        consumed_tokens=12 * SEQ,
        seq_length=SEQ,
        train=replace(recipe.train, global_batch_size=4),
    )
    samples = train_samples_needed(recipe.train, seq_length, resumed)
    train, _ = build_datasets(recipe, world_rank=0, train_samples=samples, valid_samples=0)
    position = data_position(resumed.consumed_tokens, seq_length)
    stream = micro_batches(train, consumed_samples=position, micro_batch_size=1, dp_rank=0, dp_size=1)
    tokens, switched_at = resumed.consumed_tokens, None
    for _ in range(recipe.train.train_iters - resumed.iteration):  # every step the resumed run trains
        for _ in range(global_batch_size):
            sample = next(stream)["tokens"][0]
            if switched_at is None and max(sample) >= 200:
                switched_at = tokens
            tokens += seq_length
    assert switched_at == start_tokens
