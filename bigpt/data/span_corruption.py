"""Span-corruption samples (model.family = "encoder_decoder", T5): megatron-core's T5 dataset, with
what it gets wrong for real tokenizers fixed here by subclassing, and T5's own choice of spans.

megatron-core's ``T5MaskedWordPieceDataset`` reads the same .bin/.idx as the masked-LM dataset
(``bigpt.data.masked``): whole sentences of one document make a sample of up to model.seq_length - 2
tokens. Each dropped span becomes a sentinel in the encoder's input; the decoder reads its start
token, then each sentinel and its span, and is trained to write the same shifted by one, then EOS:

    encoder  a b <extra_id_0> e <extra_id_1> </s>          (tokens a b c d e f g, spans c d and f g)
    decoder  <pad> <extra_id_0> c d <extra_id_1> f g        (T5's decoder starts with its pad id)
    labels   <extra_id_0> c d <extra_id_1> f g </s>

What it gets wrong, and ``SpanCorruptionDataset`` fixes:
- it marks padding where a token *equals the pad id*: T5's decoder starts with the pad id (0), so
  its first position was marked padding (Megatron-LM's local attention masks, from ``id >= 1``,
  hide it and any <unk> of id 0 as well). Here padding is found by position, and the family
  builds its attention masks from ``enc_mask`` and ``dec_mask``, never from token ids.
- it chooses spans as BERT chooses n-grams (lengths drawn ∝ 1/n, or geometric with p = 0.2, next
  to each other at times, each with a sentinel of its own), so no mean span length can be asked
  for. Here they are T5's (``random_spans_noise_mask``): round(L × noise_density) tokens in
  round(that / mean_span_length) spans of random lengths, a kept token before each.
- the encoder's input has no EOS, which T5's has (the sample leaves room for it).
- its labels pad with -1, no token's id; here padding holds the pad id everywhere.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from megatron.core.datasets.megatron_dataset import _PAD_TOKEN_ID as NOT_A_TOKEN
from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset, T5MaskedWordPieceDatasetConfig

from bigpt.data.masked import MockDocuments, OfMockDocuments, packed_token_share
from bigpt.data.tokenizer import SentencePieceTokenizer, Tokenizer
from bigpt.errors import BigptError
from bigpt.recipe.tables import SpanCorruptionConfig, sample_tokens

SPAN_BATCH_KEYS = ("text_enc", "text_dec", "labels", "loss_mask", "enc_mask", "dec_mask")
"""What a span-corruption sample holds (megatron-core's T5 keys): the encoder's tokens (model.
seq_length long), the decoder's input tokens and its labels, which of them the loss counts, and
1 at each real token of the encoder and of the decoder, 0 at padding (decoder positions:
``SpanCorruptionConfig.decoder_seq_length``). Padding holds the pad id."""


class SpanVocabulary:
    """The tokens megatron-core's T5 dataset reads from a tokenizer: pad (T5's decoder start, so
    ``bos`` too), eos, and the sentinels in order (``additional_special_tokens_ids``)."""

    def __init__(self, vocab_size: int, *, pad: int, eos: int, sentinels: list[int], pieces: dict[int, str]):
        self.vocab_size = vocab_size
        self.pad, self.eos, self.bos = pad, eos, pad
        self.additional_special_tokens_ids = sentinels
        self.inv_vocab = pieces  # megatron-core lists its ids (for BERT's random replacements)

    @property
    def unique_identifiers(self) -> dict:  # hashed into megatron-core's index-cache names
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "pad": self.pad, "eos": self.eos}


MOCK_SPECIALS = {"pad": 0, "eos": 1, "unk": 2}
"""The special ids of mock data: T5's (the pad id 0 is the decoder's start)."""


def mock_span_vocabulary(recipe) -> SpanVocabulary:
    """T5's layout: the specials first, the sentinels last (<extra_id_0> the highest id), words between."""
    vocab_size = recipe.model.vocab_size
    count = recipe.data.span_corruption.most_spans(recipe.model.seq_length)
    if vocab_size - count <= len(MOCK_SPECIALS):
        raise BigptError(
            f"model.vocab_size = {vocab_size} leaves mock data no word ids beside its {len(MOCK_SPECIALS)} special "
            f"tokens and the {count} sentinels a sample can need; raise model.vocab_size"
        )
    sentinels = list(range(vocab_size - 1, vocab_size - 1 - count, -1))
    pieces = {i: f"w{i}" for i in range(vocab_size)} | {i: f"<extra_id_{n}>" for n, i in enumerate(sentinels)}
    return SpanVocabulary(
        vocab_size, pad=MOCK_SPECIALS["pad"], eos=MOCK_SPECIALS["eos"], sentinels=sentinels, pieces=pieces
    )


PAD_NAMES = ("<pad>", "[PAD]")


def span_vocabulary(tokenizer: Tokenizer, recipe) -> SpanVocabulary:
    """A tokenizer's pad and EOS and T5's sentinels, as many as a sample can need."""
    path = recipe.data.tokenizer
    pieces = tokenizer.pieces()
    ids = {piece: i for i, piece in enumerate(pieces)}
    pad = next((ids[name] for name in PAD_NAMES if name in ids), None)
    if pad is None:
        raise BigptError(
            f"tokenizer {path} (data.tokenizer) has no pad token ({' or '.join(PAD_NAMES)}), which span "
            'corruption (model.family = "encoder_decoder") pads samples with and starts the decoder with '
            "(T5's decoder start is its pad id); use a T5 tokenizer or one that has it"
        )
    sentinels: list[int] = []
    while (sentinel := ids.get(f"<extra_id_{len(sentinels)}>")) is not None:
        sentinels.append(sentinel)
    if not sentinels and isinstance(tokenizer, SentencePieceTokenizer):  # T5's spiece.model: after its pieces
        extra = t5_extra_ids(Path(path).with_name("tokenizer_config.json"))
        sentinels = [len(pieces) + extra - 1 - n for n in range(extra)]  # <extra_id_0> the highest
        pieces += [f"<extra_id_{n}>" for n in reversed(range(extra))]
    needed = recipe.data.span_corruption.most_spans(recipe.model.seq_length)
    if len(sentinels) < needed:
        raise BigptError(
            f"tokenizer {path} (data.tokenizer) has {len(sentinels) or 'no'} T5 sentinel token(s) (<extra_id_0>, "
            f"<extra_id_1>, ... in order), but a sample of model.seq_length = {recipe.model.seq_length} can have "
            f"{needed} dropped spans (data.span_corruption), each replaced by a sentinel of its own; use a tokenizer "
            "with them (T5's tokenizer.json has 100; T5's spiece.model has them after its pieces when the "
            "tokenizer_config.json saved with it, whose extra_ids counts them, lies beside it), or fewer spans (a "
            "shorter model.seq_length or a longer data.span_corruption.mean_span_length)"
        )
    if len(pieces) > recipe.model.vocab_size:
        raise BigptError(
            f"tokenizer {path} (data.tokenizer) has its T5 sentinels up to id {len(pieces) - 1}, after its "
            f"SentencePiece pieces, but model.vocab_size is {recipe.model.vocab_size}; set model.vocab_size = "
            f"{len(pieces)} or more (T5's is 32128)"
        )
    return SpanVocabulary(len(pieces), pad=pad, eos=tokenizer.eod, sentinels=sentinels, pieces=dict(enumerate(pieces)))


def t5_extra_ids(config: Path) -> int:
    """How many sentinels T5's tokenizer puts after the pieces of its SentencePiece model: the
    ``extra_ids`` of the tokenizer_config.json beside it (transformers' T5Tokenizer); 0 without one."""
    if not config.is_file():
        return 0
    try:
        extra = json.loads(config.read_text()).get("extra_ids", 0)
    except (ValueError, AttributeError):
        extra = None
    if not isinstance(extra, int) or extra < 0:
        raise BigptError(
            f"{config}, beside data.tokenizer, is not a tokenizer config whose extra_ids is a count of T5 sentinels; "
            "fix or remove it"
        )
    return extra


@dataclass
class SpanCorruptionDatasetConfig(T5MaskedWordPieceDatasetConfig):
    span_corruption: SpanCorruptionConfig | None = None
    """How spans are chosen ([data.span_corruption]; its noise_density is masking_probability, hashed)."""


class SpanCorruptionDataset(T5MaskedWordPieceDataset):
    """megatron-core's T5 dataset with T5's spans, an EOS ending the encoder's input, and padding
    found by position whatever the pad id (see the module's docstring); samples ``SPAN_BATCH_KEYS``."""

    config: SpanCorruptionDatasetConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # megatron-core then pads with an id no token has, so its masks mark padding by position.
        self._pad_token_id = NOT_A_TOKEN

    def _create_masked_lm_predictions(self, token_ids, target_sequence_length, numpy_random_state):
        """T5's spans, in the form megatron-core's sample assembly reads: the tokens, then (the
        positions, the tokens) of each span in order (the three in between unused)."""
        assert self.config.span_corruption is not None
        noise, spans = self.config.span_corruption.noise_and_spans(len(token_ids))
        noise_lengths = _random_lengths(noise, spans, numpy_random_state)
        kept_lengths = _random_lengths(len(token_ids) - noise, spans, numpy_random_state)
        masked_spans, start = [], 0
        for kept, dropped in zip(kept_lengths, noise_lengths):  # kept, dropped, kept, ...: T5's order
            positions = list(range(start + kept, start + kept + dropped))
            masked_spans.append((positions, [token_ids[i] for i in positions]))
            start += kept + dropped
        return token_ids, [], [], [], masked_spans

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        tokenizer = self.config.tokenizer
        encoder_real, decoder_real = sample["enc_mask"].astype(bool), sample["dec_mask"].astype(bool)
        encoder = numpy.where(encoder_real, sample["text_enc"], tokenizer.pad)
        end = int(encoder_real.sum())  # room left by the sample (sample_tokens)
        encoder[end], encoder_real[end] = tokenizer.eos, True
        return {
            "text_enc": torch.from_numpy(encoder),
            "text_dec": torch.from_numpy(numpy.where(decoder_real, sample["text_dec"], tokenizer.pad)),
            "labels": torch.from_numpy(numpy.where(decoder_real, sample["labels"], tokenizer.pad)),
            "loss_mask": torch.from_numpy(sample["loss_mask"].astype(numpy.float32)),
            "enc_mask": torch.from_numpy(encoder_real.astype(numpy.int64)),
            "dec_mask": torch.from_numpy(decoder_real.astype(numpy.int64)),
        }


def _random_lengths(total: int, parts: int, rng: numpy.random.RandomState) -> numpy.ndarray:
    """``parts`` random lengths of at least 1 that sum to ``total`` (T5's ``_random_segmentation``)."""
    if not parts:
        return numpy.zeros(0, dtype=numpy.int64)
    cuts = numpy.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
    return numpy.diff(numpy.concatenate([[0], cuts, [total]]))


class MockSpanCorruptionDataset(OfMockDocuments, SpanCorruptionDataset):
    """``SpanCorruptionDataset`` over ``MockDocuments`` (data.source = "mock")."""

    @staticmethod
    def build_low_level_dataset(dataset_path, config) -> MockDocuments:
        first_sentinel = min(config.tokenizer.additional_special_tokens_ids)
        return MockDocuments(range(len(MOCK_SPECIALS), first_sentinel))


def span_config(recipe, vocabulary: SpanVocabulary, **fields) -> SpanCorruptionDatasetConfig:
    """megatron-core's T5 dataset config for the recipe; ``fields``: blend, split, cache, seed."""
    span = recipe.data.span_corruption
    return SpanCorruptionDatasetConfig(
        sequence_length=recipe.model.seq_length,
        sequence_length_decoder=span.decoder_seq_length(recipe.model.seq_length),
        tokenizer=vocabulary,
        span_corruption=span,
        masking_probability=span.noise_density,
        short_sequence_probability=0.0,  # T5 fills every sample
        # megatron-core's n-gram settings, which T5's spans (SpanCorruptionDataset) replace
        masking_max_ngram=1,
        masking_do_full_word=False,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False,
        **fields,
    )


def span_token_share(dataset, recipe) -> float:
    """``packed_token_share`` of span-corruption samples: up to model.seq_length - 2 tokens."""
    return packed_token_share(
        dataset, room=sample_tokens(recipe.model.seq_length), short_sequence_probability=0.0, seed=recipe.train.seed
    )
