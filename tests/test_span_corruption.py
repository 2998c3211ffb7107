"""Span-corruption samples of the encoder-decoder (model.family = "encoder_decoder", T5;
bigpt/data/span_corruption.py): T5's layout, padding by position, the noise asked for, sentinels
from real tokenizers, what megatron-core's own T5 dataset gets wrong, and the refusals."""

import json
from types import SimpleNamespace

import numpy
import pytest
import torch
from megatron.core.datasets.masked_dataset import MaskedWordPieceDataset
from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset

from bigpt.data.masked import MASKED_BATCH_KEYS
from bigpt.data.span_corruption import MOCK_SPECIALS, NOT_A_TOKEN, SPAN_BATCH_KEYS, span_vocabulary
from bigpt.data.tokenizer import load_tokenizer
from bigpt.errors import BigptError
from bigpt.recipe import load_recipe
from multirank import REPO

T5_RECIPE = REPO / "tests" / "recipes" / "mock_t5.toml"
PAD, EOS = MOCK_SPECIALS["pad"], MOCK_SPECIALS["eos"]
SAMPLES = 400


def build(overrides=(), samples: int = SAMPLES):
    from bigpt.data.datasets import build_datasets

    recipe = load_recipe(T5_RECIPE, list(overrides))
    train, _ = build_datasets(recipe, world_rank=0, train_samples=samples, valid_samples=0)
    return recipe, train


def source_tokens(dataset, index: int) -> list[int]:
    """The tokens a sample was made from: megatron-core's whole sentences of one document, cut."""
    first, end, length = dataset.sample_index[index]
    return [int(token) for sentence in range(first, end) for token in dataset.dataset[sentence]][:length]


def spans_of(sample: dict, vocabulary) -> tuple[list[int], list[list[int]]]:
    """(the encoder's kept tokens with a sentinel for each span, the spans), read back from a sample."""
    sentinels = vocabulary.additional_special_tokens_ids
    encoder = sample["text_enc"][sample["enc_mask"].bool()].tolist()
    labels = sample["labels"][sample["loss_mask"].bool()].tolist()
    assert encoder[-1] == vocabulary.eos and labels[-1] == vocabulary.eos
    spans, at = [], [labels.index(sentinel) for sentinel in sentinels if sentinel in labels] + [len(labels) - 1]
    for start, end in zip(at, at[1:]):
        spans.append(labels[start + 1 : end])
    return encoder[:-1], spans


def uncorrupted(encoder: list[int], spans: list[list[int]], sentinels: list[int]) -> list[int]:
    for n, span in enumerate(spans):
        at = encoder.index(sentinels[n])
        encoder = encoder[:at] + span + encoder[at + 1 :]
    return encoder


@pytest.fixture(scope="module")
def t5_samples():
    """The first SAMPLES training samples bigpt builds for the tiny T5 on mock data (pad id 0)."""
    recipe, train = build()
    return recipe, train, [train[i] for i in range(SAMPLES)]


def test_samples_are_t5s_span_corruption_padded_by_position(t5_samples):
    recipe, train, samples = t5_samples
    sentinels = train.config.tokenizer.additional_special_tokens_ids
    assert sentinels == list(range(511, 511 - len(sentinels), -1))  # <extra_id_0> the highest id, as T5's
    decoder_length = recipe.data.span_corruption.decoder_seq_length(recipe.model.seq_length)
    full = 0
    for index, sample in enumerate(samples):
        assert set(sample) == set(SPAN_BATCH_KEYS)
        assert sample["text_enc"].shape == (recipe.model.seq_length,) and sample["text_dec"].shape == (decoder_length,)
        for tokens, real in ((sample["text_enc"], sample["enc_mask"]), (sample["text_dec"], sample["dec_mask"])):
            length = int(real.sum())
            assert real[:length].all() and not real[length:].any()  # padding at the end only
            assert (tokens[length:] == PAD).all()
        # The decoder starts with T5's start token, the pad id, and that position is a token.
        assert sample["text_dec"][0] == PAD and sample["dec_mask"][0] == 1
        assert torch.equal(sample["loss_mask"], sample["dec_mask"].float())
        real = sample["dec_mask"].bool()
        assert torch.equal(sample["text_dec"][real][1:], sample["labels"][real][:-1])  # shifted by one
        assert (sample["labels"][~real] == PAD).all()
        encoder, spans = spans_of(sample, train.config.tokenizer)
        used = [token for token in encoder if token in sentinels]
        assert used == sentinels[: len(spans)]  # one sentinel per span, in order
        assert uncorrupted(encoder, spans, sentinels) == source_tokens(train, index)
        assert all(encoder[encoder.index(s) - 1] not in sentinels for s in used)  # a kept token before each
        full += int(real.sum()) == decoder_length
    assert full  # the longest samples fill the decoder's derived length exactly


def test_the_noise_density_and_mean_span_length_asked_for_are_what_samples_get(t5_samples):
    _, train, samples = t5_samples
    _, other = build(["data.span_corruption.noise_density=0.3", "data.span_corruption.mean_span_length=5"])
    for dataset, drawn, density, mean in ((train, samples, 0.15, 3), (other, None, 0.3, 5)):
        drawn = drawn or [dataset[i] for i in range(SAMPLES)]
        dropped = total = spans = 0
        for index, sample in enumerate(drawn):
            _, sample_spans = spans_of(sample, dataset.config.tokenizer)
            dropped += sum(map(len, sample_spans))
            spans += len(sample_spans)
            total += len(source_tokens(dataset, index))
        assert abs(dropped / total - density) < 0.01
        assert abs(dropped / spans - mean) < 0.2 * mean


def test_megatron_cores_own_t5_samples_are_wrong_for_t5(t5_samples):
    """What SpanCorruptionDataset fixes, shown on megatron-core's own output for the same samples:
    its padding from ids marks T5's decoder start (the pad id 0) as padding, and Megatron-LM's local
    attention masks (``id >= 1``) hide it; its encoder's input has no EOS; its labels pad with -1;
    its spans (Megatron-LM's pretrain_t5 settings: geometric lengths up to 10) come next to each
    other, and their mean length is not T5's."""
    _, train, samples = t5_samples
    short = next(i for i, sample in enumerate(samples) if not sample["dec_mask"].all())
    train._pad_token_id = PAD  # as megatron-core sets it from the tokenizer
    try:
        theirs = T5MaskedWordPieceDataset.__getitem__(train, short)
    finally:
        train._pad_token_id = NOT_A_TOKEN
    assert theirs["text_dec"][0] == PAD and theirs["dec_mask"][0] == 0
    assert EOS not in theirs["text_enc"] and (theirs["labels"] == -1).any()
    ours = samples[short]
    assert ours["dec_mask"][0] == 1 and ours["text_enc"][int(ours["enc_mask"].sum()) - 1] == EOS
    batch = {key: ours[key][None] for key in ("text_enc", "text_dec")}
    _, decoder_mask, cross_mask = T5MaskedWordPieceDataset.config_attention_mask(
        batch["text_enc"], batch["text_dec"], None, None, use_local=True
    )
    assert decoder_mask[0, 0, 0].all() and cross_mask[0, 0, 0].all()  # the start token sees nothing

    # megatron-core's spans at T5's length (510 tokens), as Megatron-LM's pretrain_t5 asks for them
    vocabulary = SimpleNamespace(cls=-2, sep=-3, inv_vocab={i: "w" for i in range(512)})
    config = SimpleNamespace(
        tokenizer=vocabulary,
        masking_probability=0.15,
        masking_max_ngram=10,
        masking_do_full_word=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=True,
        masking_do_permutation=False,
    )
    megatron = SimpleNamespace(config=config, _get_token_mask=lambda rng: 3)
    lengths, adjacent = [], 0
    for seed in range(8):
        tokens = numpy.random.RandomState(seed).randint(3, 500, size=510).tolist()
        rng = numpy.random.RandomState(seed)
        spans = MaskedWordPieceDataset._create_masked_lm_predictions(megatron, tokens, len(tokens), rng)[4]
        lengths += [len(positions) for positions, _ in spans]
        adjacent += sum(a[0][-1] + 1 == b[0][0] for a, b in zip(spans, spans[1:]))
    assert adjacent and numpy.mean(lengths) > 3.5  # not the mean of 3 T5 asks for (it cannot be asked for)


def _hf_tokenizer(tmp_path, sentinels: int, *, pad: bool = True):
    """A word-level tokenizer.json laid out as T5's: <pad> </s> <unk>, words, then the sentinels as
    added tokens, <extra_id_0> the highest id."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel

    pieces = (["<pad>"] if pad else []) + ["</s>", "<unk>"] + [f"w{i}" for i in range(40)]
    tokenizer = Tokenizer(WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.add_special_tokens([AddedToken(f"<extra_id_{n}>", special=True) for n in reversed(range(sentinels))])
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_sentinels_are_read_from_a_hugging_face_tokenizer_in_order(tmp_path):
    path = _hf_tokenizer(tmp_path, sentinels=5)
    recipe = load_recipe(T5_RECIPE, [f"data.tokenizer='{path}'", "model.seq_length=40"])
    vocabulary = span_vocabulary(load_tokenizer(path), recipe)
    assert (vocabulary.pad, vocabulary.bos, vocabulary.eos) == (0, 0, 1)
    assert vocabulary.additional_special_tokens_ids == [47, 46, 45, 44, 43]  # <extra_id_0> = 47, as T5's


def _sentencepiece(directory, **options):
    """A tiny SentencePiece model laid out as T5's spiece.model (<pad> 0, </s> 1, <unk> 2)."""
    import sentencepiece

    directory.mkdir(exist_ok=True)
    text = directory / "text.txt"
    text.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(directory / "spiece"),
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
        **options,
    )
    return directory / "spiece.model"


def test_sentinels_are_read_from_a_sentencepiece_model(tmp_path):
    """As pieces of its own, or after its pieces as T5's spiece.model has them: transformers'
    T5Tokenizer counts them in the tokenizer_config.json saved beside it (extra_ids)."""
    symbols = [f"<extra_id_{n}>" for n in range(4)]
    path = _sentencepiece(tmp_path / "symbols", vocab_size=60, user_defined_symbols=symbols)
    recipe = load_recipe(T5_RECIPE, [f"data.tokenizer='{path}'", "model.seq_length=40"])
    vocabulary = span_vocabulary(load_tokenizer(path), recipe)
    assert (vocabulary.pad, vocabulary.eos) == (0, 1) and vocabulary.additional_special_tokens_ids == [3, 4, 5, 6]

    path = _sentencepiece(tmp_path / "t5", vocab_size=50)
    recipe = load_recipe(T5_RECIPE, [f"data.tokenizer='{path}'", "model.seq_length=40"])
    with pytest.raises(BigptError, match="has no T5 sentinel token"):
        span_vocabulary(load_tokenizer(path), recipe)
    (tmp_path / "t5" / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 100}))
    vocabulary = span_vocabulary(load_tokenizer(path), recipe)
    assert vocabulary.additional_special_tokens_ids == list(range(149, 49, -1))  # <extra_id_0> = 149, as T5's
    assert vocabulary.vocab_size == 150 and vocabulary.inv_vocab[149] == "<extra_id_0>"
    small = load_recipe(T5_RECIPE, [f"data.tokenizer='{path}'", "model.seq_length=40", "model.vocab_size=128"])
    with pytest.raises(BigptError, match="sentinels up to id 149.*set model.vocab_size = 150 or more"):
        span_vocabulary(load_tokenizer(path), small)


def test_a_tokenizer_without_the_sentinels_or_pad_a_sample_needs_is_refused(tmp_path, tokenizer_path):
    def refusal(path):
        recipe = load_recipe(T5_RECIPE, [f"data.tokenizer='{path}'"])  # 62 tokens a sample: up to 3 spans
        assert recipe.data.span_corruption.most_spans(recipe.model.seq_length) == 3
        with pytest.raises(BigptError) as refused:
            span_vocabulary(load_tokenizer(path), recipe)
        assert f"tokenizer {path} (data.tokenizer) has" in str(refused.value)
        return str(refused.value)

    (tmp_path / "two").mkdir()
    assert "has 2 T5 sentinel token(s) (<extra_id_0>, <extra_id_1>, ... in order), but a sample of " in refusal(
        _hf_tokenizer(tmp_path / "two", sentinels=2)
    )
    assert "has no T5 sentinel token(s)" in refusal(_hf_tokenizer(tmp_path, sentinels=0))
    assert "has no pad token (<pad> or [PAD])" in refusal(tokenizer_path)  # bigpt's own SentencePiece
    # The dry run lists it as a problem a start would refuse.
    from bigpt.dryrun import describe
    from bigpt.layout import Layout

    recipe = load_recipe(T5_RECIPE, [f"run_dir={tmp_path / 'run'}", f"data.tokenizer='{tmp_path / 'tokenizer.json'}'"])
    problems: list[str] = []
    describe(recipe, Layout.from_recipe(recipe, 1), problems)
    assert [problem for problem in problems if "has no T5 sentinel token(s)" in problem], problems


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["data.span_corruption.noise_density=0.8"], "at most 0.75 of a sample can be dropped"),
        (["data.span_corruption.noise_density=0"], "nothing would be dropped"),
        (["data.span_corruption.mean_span_length=0.5"], "a span holds at least one token"),
        (["data.masking.probability=0.3"], r"masking is \[data.span_corruption\]"),
        (["model.seq_length=3"], "use 4 or more"),
    ],
)
def test_span_corruption_settings_are_checked_on_paper(overrides, words):
    with pytest.raises(BigptError, match=words):
        load_recipe(T5_RECIPE, overrides)


def test_span_corruption_keys_without_the_family_are_refused():
    with pytest.raises(BigptError, match=r"data.span_corruption.noise_density set while model.family='decoder'"):
        load_recipe(REPO / "tests" / "recipes" / "mock_tiny.toml", ["data.span_corruption.noise_density=0.2"])


def test_t5s_lengths_follow_from_the_spans():
    """T5's settings at an encoder of 512: 510 tokens, 76 dropped in 25 spans; the decoder needs its
    start token and a sentinel per span besides them."""
    span = load_recipe(T5_RECIPE).data.span_corruption
    assert span.noise_and_spans(510) == (76, 25)
    assert span.most_spans(512) == 25 and span.decoder_seq_length(512) == 1 + 76 + 25


def test_preprocessed_sentences_are_packed_into_span_corruption_samples(tmp_path):
    """tools/preprocess_data.py --split-sentences serves T5 as it serves the encoder: sentences of
    one document packed into a sample; the dry run's data plan says how much of the data samples hold.
    An <unk> of id 0 (SentencePiece's) is a token; named validation sets (eval.sets) read the
    family's samples, the encoder's too."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from bigpt.data.datasets import build_validation_sets
    from bigpt.data.phases import plan_tokens
    from bigpt.data.preprocess import preprocess
    from bigpt.data.span_corruption import span_token_share

    words = [f"w{i}" for i in range(40)]
    vocab = ["<unk>", "<pad>", "</s>", "<s>", "<mask>", ".", *words]  # T5's and the encoder's specials
    tokenizer = Tokenizer(WordLevel({piece: i for i, piece in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([AddedToken(f"<extra_id_{n}>", special=True) for n in range(4)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    rng = numpy.random.default_rng(0)
    documents = [
        " ".join(" ".join(rng.choice([*words, "unknown"], size=rng.integers(3, 8))) + "." for _ in range(5))
        for _ in range(40)
    ]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    prefix = str(tmp_path / "corpus")
    preprocess(tmp_path / "corpus.jsonl", prefix, tmp_path / "tokenizer.json", sentences=True)
    overrides = [
        "model.vocab_size=50",
        "model.seq_length=16",
        "data.source='indexed'",
        f"data.tokenizer='{tmp_path / 'tokenizer.json'}'",
        f"data.blend=[{{path='{prefix}'}}]",
        "data.split='90,10,0'",
        f"data.cache_dir='{tmp_path / 'cache'}'",
        "eval.interval=2",
        "eval.iters=1",
        "eval.sets=[{name='general'}]",
    ]
    recipe, train = build(overrides, samples=16)
    sample = train[0]
    sentinels = train.config.tokenizer.additional_special_tokens_ids
    encoder, spans = spans_of(sample, train.config.tokenizer)
    assert uncorrupted(encoder, spans, sentinels) == source_tokens(train, 0)
    assert source_tokens(train, 0).count(vocab.index(".")) > 1  # more than one sentence
    unknown = [sample["enc_mask"][sample["text_enc"] == 0] for sample in (train[i] for i in range(16))]
    assert torch.cat(unknown).numel() and torch.cat(unknown).all()  # <unk> = 0 is a token, not padding
    valid = build_validation_sets(recipe, world_rank=0)["general"]
    assert set(valid[0]) == set(SPAN_BATCH_KEYS) and spans_of(valid[0], train.config.tokenizer)[1]
    preprocess(tmp_path / "corpus.jsonl", str(tmp_path / "whole"), tmp_path / "tokenizer.json")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    by_sentence = span_token_share(IndexedDataset(prefix), recipe)
    by_document = span_token_share(IndexedDataset(str(tmp_path / "whole")), recipe)
    assert by_document < 0.5 < 0.8 < by_sentence
    assert f"span-corruption samples hold {by_sentence:.0%} of {prefix}'s tokens in one pass" in plan_tokens(recipe)
    encoder = load_recipe(REPO / "tests" / "recipes" / "mock_encoder.toml", overrides)
    assert set(build_validation_sets(encoder, world_rank=0)["general"][0]) == set(MASKED_BATCH_KEYS)
