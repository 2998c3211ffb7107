"""The masked-LM encoder family (model.family = "encoder", bigpt/families/encoder.py): BERT's and
RoBERTa's post-LayerNorm computed exactly on megatron-core's BERT layer, its keys checked on paper,
its counts, and its masked samples (bigpt/data/masked.py)."""

import json
import tomllib
from types import SimpleNamespace

import numpy
import pytest
import torch
from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset
from transformers import BertConfig, BertForMaskedLM

from bigpt.data.masked import (
    MASKED_BATCH_KEYS,
    MOCK_SPECIALS,
    NOT_A_TOKEN,
    MaskedLMDataset,
    masked_vocabulary,
)
from bigpt.data.tokenizer import load_tokenizer
from bigpt.errors import BigptError
from bigpt.flops import num_parameters
from bigpt.hf.config import check_recipe_matches
from bigpt.layout import Layout
from bigpt.plan import make_plan
from bigpt.recipe import load_recipe, recipe_to_toml
from multirank import MOCK_RECIPE, REPO, run_bigpt, scalars
from test_training_path import world_of_one

ENCODER_RECIPE = REPO / "tests" / "recipes" / "mock_encoder.toml"


def build_encoder(*overrides: str):
    """The one-rank chunk bigpt builds for the tiny encoder recipe (call inside world_of_one)."""
    from bigpt.model import build_model_chunks
    from bigpt.runtime.seeding import seed_everything

    recipe = load_recipe(ENCODER_RECIPE, list(overrides))
    seed_everything(recipe.train.seed)
    chunks, _ = build_model_chunks(recipe, Layout.from_recipe(recipe, 1))
    return recipe, chunks[0]


def hf_bert_of(recipe) -> BertForMaskedLM:
    m = recipe.model
    config = BertConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.ffn_hidden_size,
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        type_vocab_size=m.encoder.token_types,
        layer_norm_eps=m.norm_epsilon,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():  # transformers starts norms at 1 and 0, biases at 0: make them count
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def bert_weights_as_megatron(hf: BertForMaskedLM, num_layers: int, heads: int, vocab_rows: int) -> dict:
    """BertForMaskedLM's weights under megatron-core's names, post-LN's norms one position later
    (the module docstring of bigpt/families/encoder.py); q, k and v interleaved per head."""
    state = hf.state_dict()

    def norm(prefix):
        return {"weight": state[f"{prefix}.weight"], "bias": state[f"{prefix}.bias"]}

    def padded(tensor):
        return torch.cat([tensor, tensor.new_zeros(vocab_rows - tensor.shape[0], *tensor.shape[1:])])

    ours = {
        "embedding.word_embeddings.weight": padded(state["bert.embeddings.word_embeddings.weight"]),
        "embedding.position_embeddings.weight": state["bert.embeddings.position_embeddings.weight"],
        "embedding.tokentype_embeddings.weight": state["bert.embeddings.token_type_embeddings.weight"],
        "lm_head.dense.weight": state["cls.predictions.transform.dense.weight"],
        "lm_head.dense.bias": state["cls.predictions.transform.dense.bias"],
        "output_layer.bias": padded(state["cls.predictions.bias"]),
    }
    ours.update({f"lm_head.layer_norm.{k}": v for k, v in norm("cls.predictions.transform.LayerNorm").items()})
    for i in range(num_layers):
        hf_layer, layer = f"bert.encoder.layer.{i}", f"encoder.layers.{i}"
        input_norm = "bert.embeddings.LayerNorm" if i == 0 else f"bert.encoder.layer.{i - 1}.output.LayerNorm"
        ours.update({f"{layer}.input_layernorm.{k}": v for k, v in norm(input_norm).items()})
        ours.update(
            {f"{layer}.pre_mlp_layernorm.{k}": v for k, v in norm(f"{hf_layer}.attention.output.LayerNorm").items()}
        )
        for kind in ("weight", "bias"):
            q, k, v = (state[f"{hf_layer}.attention.self.{name}.{kind}"] for name in ("query", "key", "value"))
            per_head = [t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)]
            ours[f"{layer}.self_attention.linear_qkv.{kind}"] = torch.cat(per_head, dim=1).reshape(-1, *q.shape[1:])
            ours[f"{layer}.self_attention.linear_proj.{kind}"] = state[f"{hf_layer}.attention.output.dense.{kind}"]
            ours[f"{layer}.mlp.linear_fc1.{kind}"] = state[f"{hf_layer}.intermediate.dense.{kind}"]
            ours[f"{layer}.mlp.linear_fc2.{kind}"] = state[f"{hf_layer}.output.dense.{kind}"]
    last = f"bert.encoder.layer.{num_layers - 1}.output.LayerNorm"
    ours.update({f"encoder.final_layernorm.{k}": v for k, v in norm(last).items()})
    return ours


@pytest.fixture(scope="module")
def logits_against_transformers():
    """{norm_position: (bigpt's MLM logits, transformers' BertForMaskedLM's)} at every position of
    padded sequences of two segments, the weights of one BertForMaskedLM loaded into both."""
    found = {}
    with world_of_one():
        for position in ("post", "pre"):
            recipe, chunk = build_encoder(f'model.encoder.norm_position="{position}"')
            hf = hf_bert_of(recipe)
            m = recipe.model
            weights = bert_weights_as_megatron(hf, m.num_layers, m.num_attention_heads, chunk.vocab_size)
            missing, unexpected = chunk.load_state_dict(weights, strict=False)
            assert not unexpected and all(name.endswith("_extra_state") for name in missing), (missing, unexpected)
            generator = torch.Generator().manual_seed(1)
            tokens = torch.randint(4, m.vocab_size, (2, 24), generator=generator)
            types = (torch.arange(24) >= 10).long().expand(2, 24)
            padding = torch.ones(2, 24, dtype=torch.long)
            padding[1, 18:] = 0
            with torch.no_grad():
                ours, _ = chunk.eval()(tokens, padding, tokentype_ids=types)
                theirs = hf(input_ids=tokens, attention_mask=padding, token_type_ids=types).logits
            real = padding.bool()  # padded positions' outputs mean nothing in either
            found[position] = (ours[..., : m.vocab_size][real], theirs[real])
    return found


def test_post_layernorm_encoder_computes_bert_exactly(logits_against_transformers):
    ours, theirs = logits_against_transformers["post"]
    assert (ours - theirs).abs().max() <= 1e-5


def test_pre_layernorm_is_another_model(logits_against_transformers):
    """The same weights in megatron-core's own (pre-LN) layer: other logits, so the post-LN
    comparison above is not met by any placement of the norms."""
    ours, theirs = logits_against_transformers["pre"]
    assert (ours - theirs).abs().max() > 1e-2


ROPE = ["model.position_embedding='rope'"]


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["model.encoder.next_sentence_prediction=true"], "next_sentence_prediction=true is not offered"),
        (["model.attention_window=16"], 'model.attention_window=16 with model.family = "encoder"'),
        (["model.qk_layernorm=true"], "BERT layers have no query/key norms"),
        ([*ROPE, "model.rope_scaling='linear'", "model.rope_scaling_factor=2.0"], "BertModel takes no RoPE scaling"),
        ([*ROPE, "model.rope_base=500000.0"], "rotary embedding with base 10000"),
        (['model.family="decoder"', "model.encoder.token_types=1"], "model.encoder.token_types set while"),
        (['model.family="decoder"', "data.masking.whole_word=true"], "data.masking.whole_word set while"),
        (["data.masking.probability=1.0"], "leaves nothing to predict or nothing to see"),
        (["eval.tasks=[{name='t', path='t.jsonl'}]"], "which a masked-LM encoder does not compute"),
        (["data.masking.span_lengths='geometric'"], "every span is one token long"),
    ],
)
def test_what_the_encoder_does_not_offer_is_refused_on_paper(overrides, words):
    with pytest.raises(BigptError, match=words):
        load_recipe(ENCODER_RECIPE, overrides)


RECIPES = REPO / "recipes"


@pytest.mark.parametrize(
    "recipe_name,released",
    [  # BertForMaskedLM(bert-base-uncased's config), RobertaForMaskedLM(roberta-base's), counted by transformers
        ("bert_base.toml", 109_514_298),
        ("roberta_base.toml", 124_697_433),
    ],
)
def test_encoder_recipes_count_as_the_released_models(recipe_name, released):
    assert num_parameters(load_recipe(RECIPES / recipe_name).model) == released


def test_the_count_is_what_megatron_core_builds():
    with world_of_one():
        recipe, chunk = build_encoder()
        built = sum(parameter.numel() for parameter in chunk.parameters())
    assert num_parameters(recipe.model, chunk.vocab_size) == built


def test_weights_of_another_encoder_are_refused():
    """[model.encoder] decides what the weights compute (the norms' places, the token types); a
    checkpoint of another family, or one written before the table existed, compares without it."""
    saved = tomllib.loads(recipe_to_toml(load_recipe(ENCODER_RECIPE)))["model"]
    assert check_recipe_matches(load_recipe(ENCODER_RECIPE).model, saved, "ckpt", key="checkpoint.load") == []
    pre = load_recipe(ENCODER_RECIPE, ['model.encoder.norm_position="pre"'])
    with pytest.raises(BigptError, match=r"model.encoder = .*'norm_position': 'pre'.* \(the checkpoint has .*'post'"):
        check_recipe_matches(pre.model, saved, "ckpt", key="checkpoint.load")
    decoder = tomllib.loads(recipe_to_toml(load_recipe(MOCK_RECIPE)))["model"]
    del decoder["encoder"]
    assert check_recipe_matches(load_recipe(MOCK_RECIPE).model, decoder, "ckpt", key="checkpoint.load") == []


# ------------------------------------------------------------ layouts against one rank, resume
PARITY_STEPS = 3


@pytest.fixture(scope="module")
def encoder_start(tmp_path_factory):
    """A one-rank encoder checkpoint after 2 steps, and the one-rank run from it (saving every
    step): the weights every layout starts from (layouts initialise differently) and its losses.
    The 2 steps train on a "domain" corpus of sentences and evaluate two named validation sets
    (eval.sets), it and a "general" corpus of other words."""
    root = tmp_path_factory.mktemp("encoder")
    domain = sentence_corpus(root, "domain", SENTENCE_WORDS[:20])
    general = sentence_corpus(root, "general", SENTENCE_WORDS[20:], seed=1)
    run_bigpt(
        ENCODER_RECIPE,
        f"run_dir={root / 'init'}",
        "train.train_iters=2",
        "schedule.warmup_iters=1",
        "data.source='indexed'",
        f"data.tokenizer='{root / 'tokenizer.json'}'",
        f"data.blend=[{{path='{domain}'}}]",
        "data.split='80,20,0'",
        "eval.interval=2",
        "eval.iters=1",
        f"eval.sets=[{{name='domain', blend=[{{path='{domain}'}}]}}, {{name='general', blend=[{{path='{general}'}}]}}]",
    )
    checkpoint = root / "init" / "checkpoints" / "iter_0000002"
    run_bigpt(
        ENCODER_RECIPE, *_from(checkpoint, root / "reference"), "checkpoint.save_interval=1", "checkpoint.keep_last=0"
    )
    return root, checkpoint, scalars(root / "reference", "train/loss")


def _from(checkpoint, run_dir):
    return [f"run_dir={run_dir}", f"init.from_checkpoint={checkpoint}", f"train.train_iters={PARITY_STEPS}"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,nproc,overrides",
    [
        pytest.param("tp2_pp2_vpp2", 4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
        pytest.param("dp2", 2, []),
    ],
)
def test_encoder_layout_trains_as_one_rank(encoder_start, layout, nproc, overrides):
    root, checkpoint, reference = encoder_start
    run_bigpt(ENCODER_RECIPE, *_from(checkpoint, root / layout), *overrides, nproc=nproc)
    losses = scalars(root / layout, "train/loss")
    assert len(losses) == PARITY_STEPS
    assert losses == pytest.approx(reference, rel=1e-5), f"{layout}: {losses} vs one rank {reference}"


@pytest.mark.slow
def test_named_validation_sets_of_an_encoder_are_each_evaluated(encoder_start):
    """eval.sets with an encoder: each set's validation split in masked samples, its masked-LM loss
    reported under its name (the sets' datasets once read the plain tokenizer and failed)."""
    root = encoder_start[0]
    domain, general = (scalars(root / "init", f"valid/{name}/loss") for name in ("domain", "general"))
    assert len(domain) == len(general) == 1 and domain != general  # each its own sentences
    assert all(3.0 < loss < 9.0 for loss in domain + general)  # about ln(512) = 6.2 of barely trained weights


@pytest.mark.slow
def test_encoder_resumes_bit_identically(encoder_start, tmp_path):
    root, _, reference = encoder_start
    resumed = run_bigpt(
        ENCODER_RECIPE,
        f"run_dir={tmp_path}",
        f"checkpoint.load={root / 'reference' / 'checkpoints' / 'iter_0000001'}",
        f"train.train_iters={PARITY_STEPS}",
    )
    assert "resuming from" in resumed.stdout
    assert scalars(tmp_path, "train/loss") == reference[1:]


# ------------------------------------------------------------ masked samples
@pytest.fixture(scope="module")
def masked_samples():
    """The first 64 training samples bigpt builds for the tiny encoder on mock data (pad id 1)."""
    from bigpt.data.datasets import build_datasets

    recipe = load_recipe(ENCODER_RECIPE)
    train, _ = build_datasets(recipe, world_rank=0, train_samples=64, valid_samples=0)
    return recipe, train, [train[i] for i in range(64)]


def test_masked_samples_pad_with_the_pad_id_and_attend_to_real_tokens_only(masked_samples):
    _, train, samples = masked_samples
    pad, mask = MOCK_SPECIALS["pad"], MOCK_SPECIALS["mask"]
    assert set(samples[0]) == set(MASKED_BATCH_KEYS)
    padded = 0
    for sample in samples:
        real = sample["padding_mask"].bool()
        length = int(real.sum())
        assert real[:length].all() and not real[length:].any()  # padding at the end only
        assert (sample["tokens"][~real] == pad).all() and (sample["tokens"][real] != pad).all()
        assert (sample["token_types"][~real] == 0).all()
        chosen = sample["loss_mask"].bool()
        assert not chosen[~real].any() and (sample["labels"][chosen] > mask).all()  # words, never specials
        padded += length < len(real)
    assert padded  # short samples were drawn (data.masking.short_sequence_probability)
    shares = [float(s["loss_mask"].sum() / s["padding_mask"].sum()) for s in samples]
    assert 0.1 < sum(shares) / len(shares) < 0.16  # data.masking.probability = 0.15 of the real tokens


def test_megatron_cores_own_sample_attends_to_padding_when_the_pad_id_is_not_0(masked_samples):
    """What MaskedLMDataset fixes: megatron-core's BERT sample marks padding where a token equals
    the pad id and writes the pad id into the mask, so with RoBERTa's pad id 1 every position,
    padding included, is attended to, and padding becomes token 0 (RoBERTa's <s>)."""
    _, train, samples = masked_samples
    short = next(i for i, sample in enumerate(samples) if not sample["padding_mask"].all())
    train._pad_token_id = MOCK_SPECIALS["pad"]  # as megatron-core sets it from the tokenizer
    try:
        theirs = BERTMaskedWordPieceDataset.__getitem__(train, short)
    finally:
        train._pad_token_id = NOT_A_TOKEN
    assert (theirs["padding_mask"] == 1).all()
    assert (theirs["text"][~samples[short]["padding_mask"].bool().numpy()] == 0).all()


def _tokenizer(tmp_path, pieces: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token=pieces[0])).save(str(path))
    return load_tokenizer(path)


SENTENCEPIECE_PIECES = ["<unk>", "<s>", "</s>", "<pad>", "<mask>", "\u2581un", "believ", "able", "\u2581a", "\u2581b"]


def test_whole_words_of_sentencepiece_pieces_are_masked_together(tmp_path):
    vocabulary = masked_vocabulary(_tokenizer(tmp_path, SENTENCEPIECE_PIECES), "tok", whole_word=True)
    assert (vocabulary.cls, vocabulary.sep, vocabulary.mask, vocabulary.pad) == (1, 2, 4, 3)
    assert [vocabulary.inv_vocab[i] for i in (5, 6, 7, 8)] == ["\u2581un", "##believ", "##able", "\u2581a"]
    words = [[5, 6, 7], [8], [9], [5, 7], [8]] * 4  # ▁un believ able | ▁a | ▁b | ▁un able | ▁a
    tokens = [1] + [piece for word in words for piece in word] + [2]
    config = SimpleNamespace(
        tokenizer=vocabulary,
        masking_do_full_word=True,
        masking_probability=0.3,
        masking_max_ngram=1,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False,
        masking_do_permutation=False,
    )
    dataset = SimpleNamespace(config=config, _get_token_mask=lambda rng: vocabulary.mask)
    _, positions, *_ = MaskedLMDataset._create_masked_lm_predictions(
        dataset, tokens, len(tokens), numpy.random.RandomState(0)
    )
    starts = numpy.cumsum([1] + [len(word) for word in words])[:-1]
    chosen = set(positions)
    assert chosen and any(len(word) > 1 and start in chosen for start, word in zip(starts, words))
    for start, word in zip(starts, words):
        assert {start + i in chosen for i in range(len(word))} in ({True}, {False})


def test_a_tokenizer_without_the_masking_tokens_or_word_marks_is_refused(tmp_path):
    with pytest.raises(BigptError, match=r"has no mask \(\[MASK\] or <mask>\) token"):
        masked_vocabulary(_tokenizer(tmp_path, ["<unk>", "<s>", "</s>", "<pad>", "a"]), "tok")
    plain = _tokenizer(tmp_path, ["<unk>", "<s>", "</s>", "<pad>", "<mask>", "a", "b"])
    with pytest.raises(BigptError, match="marks no word boundaries"):
        masked_vocabulary(plain, "tok", whole_word=True)
    assert masked_vocabulary(plain, "tok").inv_vocab[5] == "a"


def test_a_tokenizer_without_the_masking_tokens_is_refused_on_paper(tmp_path):
    """--dry-run checks the tokenizer as the encoder's datasets read it, not only as a tokenizer."""
    from bigpt.dryrun import describe

    _tokenizer(tmp_path, ["<unk>", "<s>", "</s>", "<pad>", "a"])
    overrides = ["data.source='indexed'", f"data.tokenizer='{tmp_path / 'tokenizer.json'}'", "data.blend=[{path='x'}]"]
    recipe = load_recipe(ENCODER_RECIPE, [f"run_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(BigptError, match=r"has no mask \(\[MASK\] or <mask>\) token"):
        describe(recipe, Layout.from_recipe(recipe, 1))


def test_the_planner_offers_no_context_parallelism_for_an_encoder():
    recipe = load_recipe(RECIPES / "bert_base.toml")
    with pytest.raises(BigptError, match='parallel.context=2 with model.family = "encoder"'):
        Layout.from_recipe(load_recipe(RECIPES / "bert_base.toml", ["parallel.context=2"]), 16)
    plan = make_plan(recipe, 16, "h100-80gb", mfu=0.4, headroom=0.1, gpus_per_node=8)
    assert plan.options and all(option.layout.cp == 1 for option in plan.options)


@pytest.mark.gpu
def test_transformer_engine_post_layernorm_layer_computes_the_local_one():
    """The Transformer Engine post-LN layer (its norms unfused from the linears) against the local
    one with the same weights. Written without a GPU at hand: not yet run."""
    pytest.importorskip("transformer_engine.pytorch")
    with world_of_one():
        _, local = build_encoder('precision.transformer_engine="off"')
        _, fused = build_encoder('precision.transformer_engine="on"')
        missing, unexpected = fused.load_state_dict(local.state_dict(), strict=False)
        assert not unexpected and all(name.endswith("_extra_state") for name in missing), (missing, unexpected)
        tokens = torch.randint(4, 512, (2, 24), device="cuda")
        padding = torch.ones(2, 24, dtype=torch.long, device="cuda")
        padding[1, 18:] = 0
        types = torch.zeros_like(tokens)
        with torch.no_grad():
            ours, _ = local.eval()(tokens, padding, tokentype_ids=types)
            theirs, _ = fused.eval()(tokens, padding, tokentype_ids=types)
    real = padding.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


SENTENCE_WORDS = [f"w{i}" for i in range(40)]
SENTENCE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>", ".", *SENTENCE_WORDS]


def sentence_corpus(directory, name: str, words: list[str], seed: int = 0) -> str:
    """40 documents of five sentences of 3 to 7 of ``words`` (of SENTENCE_WORDS) in
    ``directory``/``name``.jsonl, preprocessed by sentence with ``directory``/tokenizer.json (a
    word-level tokenizer of SENTENCE_VOCAB, written once); the dataset's prefix."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from bigpt.data.preprocess import preprocess

    if not (directory / "tokenizer.json").exists():
        tokenizer = Tokenizer(WordLevel({piece: i for i, piece in enumerate(SENTENCE_VOCAB)}, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = Whitespace()
        tokenizer.save(str(directory / "tokenizer.json"))
    rng = numpy.random.default_rng(seed)
    documents = [
        " ".join(" ".join(rng.choice(words, size=rng.integers(3, 8))) + "." for _ in range(5)) for _ in range(40)
    ]
    (directory / f"{name}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    prefix = str(directory / name)
    preprocess(directory / f"{name}.jsonl", prefix, directory / "tokenizer.json", sentences=True)
    return prefix


def test_sentences_of_preprocessed_documents_are_packed_into_masked_samples(tmp_path):
    """tools/preprocess_data.py --split-sentences writes a sequence per sentence; the encoder's
    indexed datasets pack the sentences of one document into a sample, framed by [CLS] and [SEP]."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from bigpt.data.datasets import build_datasets
    from bigpt.data.masked import masked_token_share
    from bigpt.data.phases import plan_tokens
    from bigpt.data.preprocess import preprocess

    vocab = SENTENCE_VOCAB
    prefix = sentence_corpus(tmp_path, "corpus", SENTENCE_WORDS)
    written = IndexedDataset(prefix)
    assert len(written.document_indices) - 1 == 40 and len(written) == 200  # five sentences each
    assert written[0][-1] == vocab.index(".")  # no end-of-document token
    overrides = [
        f"model.vocab_size={len(vocab)}",
        "data.source='indexed'",
        f"data.tokenizer='{tmp_path / 'tokenizer.json'}'",
        f"data.blend=[{{path='{prefix}'}}]",
        "data.split='100,0,0'",
        f"data.cache_dir='{tmp_path / 'cache'}'",
    ]
    recipe = load_recipe(ENCODER_RECIPE, overrides)
    train, _ = build_datasets(recipe, world_rank=0, train_samples=16, valid_samples=0)
    sample = train[0]
    real = sample["tokens"][sample["padding_mask"].bool()].tolist()
    assert real[0] == vocab.index("[CLS]") and real[-1] == vocab.index("[SEP]")
    assert len(real) > 2 + 8  # more than one sentence (at most 8 tokens each)
    # The dry run says how much of the data the samples hold: at 16 tokens a sample, a document
    # written as one sequence is cut to 13 tokens, its sentences are packed whole.
    preprocess(tmp_path / "corpus.jsonl", str(tmp_path / "whole"), tmp_path / "tokenizer.json")
    short = load_recipe(ENCODER_RECIPE, ["model.seq_length=16"])
    by_sentence = masked_token_share(IndexedDataset(prefix), short)
    by_document = masked_token_share(IndexedDataset(str(tmp_path / "whole")), short)
    assert by_document < 0.5 < 0.7 < by_sentence

    def planned(data: str) -> str:
        blend = [f"data.blend=[{{path='{data}'}}]" if key.startswith("data.blend=") else key for key in overrides]
        return plan_tokens(load_recipe(ENCODER_RECIPE, [*blend, "model.seq_length=16"]))

    assert f"masked samples hold {by_sentence:.0%} of {prefix}'s tokens in one pass" in planned(prefix)
    # --split-sentences is the advice only where documents were written whole
    assert "--split-sentences" in planned(str(tmp_path / "whole")) and "--split-sentences" not in planned(prefix)


def test_logits_of_an_encoder_are_its_masked_lm_logits_at_every_position():
    """bigpt.logits (tools/logits.py) runs the family's own forward: an encoder's MLM logits."""
    from bigpt.logits import compute_logits

    tokens = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with world_of_one():
        recipe, chunk = build_encoder()  # the weights compute_logits builds: random, of train.seed
        with torch.no_grad():
            expected, _ = chunk.eval()(tokens, torch.ones_like(tokens), tokentype_ids=torch.zeros_like(tokens))
        logits = compute_logits(recipe, Layout.from_recipe(recipe, 1), tokens)
    assert logits.shape == (2, 16, recipe.model.vocab_size)
    assert torch.equal(logits, expected[..., : recipe.model.vocab_size])
