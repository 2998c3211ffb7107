"""Masked-language-model samples (model.family = "encoder"): megatron-core's BERT dataset, with what
it gets wrong for real tokenizers fixed here by subclassing.

megatron-core's ``BERTMaskedWordPieceDataset`` reads the same .bin/.idx as the GPT datasets, treats
each sequence of a document as a sentence, packs whole sentences of one document into a sample
([cls] A [sep]) and masks it (80% [mask], 10% a random token, 10% kept) seeded by the sample's
index, so a sentence met again in a later epoch is masked anew (RoBERTa's dynamic masking). What
it gets wrong, and ``MaskedLMDataset`` fixes: it pads with the tokenizer's pad id and then marks
padding where a token *equals the pad id*, writing the pad id into the padding mask (right only
when the pad id is 0: RoBERTa's is 1, so its padding was attended to); it pads the token types
with the pad id too; and it turns the padding into token 0 (RoBERTa's <s>), not the pad id.
"""

import tempfile

import numpy
import torch
from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig
from megatron.core.datasets.megatron_dataset import _PAD_TOKEN_ID as NOT_A_TOKEN

from bigpt.data.tokenizer import Tokenizer
from bigpt.errors import BigptError

MASKED_BATCH_KEYS = ("tokens", "labels", "loss_mask", "padding_mask", "token_types")
"""What a masked-LM sample holds, each ``seq_length`` long: the masked tokens, the original tokens
at the masked positions (0 elsewhere), which positions the loss counts, 1 at real tokens and 0 at
padding, and the segment of each token (0; padding 0)."""


class MaskedVocabulary:
    """The special tokens megatron-core's masked datasets read from a tokenizer, and ``inv_vocab``:
    every id's piece, continuation pieces of a word written "##piece" as WordPiece writes them (the
    only form of word boundary megatron-core's whole-word masking reads)."""

    def __init__(self, vocab_size: int, *, cls: int, sep: int, mask: int, pad: int, pieces: dict[int, str]):
        self.vocab_size = vocab_size
        self.cls, self.sep, self.mask, self.pad = cls, sep, mask, pad
        self.inv_vocab = pieces

    @property
    def unique_identifiers(self) -> dict:  # hashed into megatron-core's index-cache names
        specials = {"cls": self.cls, "sep": self.sep, "mask": self.mask, "pad": self.pad}
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, **specials}


MOCK_SPECIALS = {"cls": 0, "pad": 1, "sep": 2, "mask": 3}
"""The special ids of mock data: RoBERTa's order (<s>, <pad>, </s>), so the pad id is not 0."""


def mock_vocabulary(vocab_size: int) -> MaskedVocabulary:
    """Every id a word of its own (no continuation pieces)."""
    return MaskedVocabulary(vocab_size, **MOCK_SPECIALS, pieces={i: f"w{i}" for i in range(vocab_size)})


SPECIAL_NAMES = {
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
    "pad": ("[PAD]", "<pad>"),
}
"""The pieces BERT (WordPiece), RoBERTa (byte-level BPE) and SentencePiece vocabularies name them by."""

WORD_STARTS = ("\u2581", "\u0120")
"""How a piece that begins a word is marked: SentencePiece's "▁", byte-level BPE's "Ġ" (WordPiece
marks the others, "##")."""


def masked_vocabulary(tokenizer: Tokenizer, path, *, whole_word: bool = False) -> MaskedVocabulary:
    """A tokenizer's special tokens and word boundaries, as megatron-core's masked datasets read them."""
    pieces = tokenizer.pieces()
    ids = {piece: i for i, piece in enumerate(pieces)}
    specials = {role: next((ids[name] for name in names if name in ids), None) for role, names in SPECIAL_NAMES.items()}
    missing = [f"{role} ({' or '.join(SPECIAL_NAMES[role])})" for role, found in specials.items() if found is None]
    if missing:
        raise BigptError(
            f"tokenizer {path} (data.tokenizer) has no {', '.join(missing)} token, which masked language "
            'modelling (model.family = "encoder") needs to frame and mask samples; use a BERT, RoBERTa or '
            "SentencePiece tokenizer that has them (tools/train_tokenizer.py --mask-tokens trains one)"
        )
    marked = next((mark for mark in WORD_STARTS if any(piece.startswith(mark) for piece in pieces)), None)
    if whole_word and not marked and not any(piece.startswith("##") for piece in pieces):
        raise BigptError(
            f"data.masking.whole_word = true, but tokenizer {path} (data.tokenizer) marks no word boundaries "
            '(WordPiece\'s "##", SentencePiece\'s "▁" or byte-level BPE\'s "Ġ"), so no word can be told from its '
            "pieces; set whole_word = false"
        )
    if marked:  # the pieces that do not begin a word continue one
        special = set(specials.values())
        pieces = [piece if i in special or piece.startswith(marked) else f"##{piece}" for i, piece in enumerate(pieces)]
    return MaskedVocabulary(len(pieces), **specials, pieces=dict(enumerate(pieces)))  # type: ignore[arg-type]


class MaskedLMDataset(BERTMaskedWordPieceDataset):
    """megatron-core's BERT dataset, with padding, token types and the padding mask right for any
    pad id (see the module's docstring), and samples in bigpt's form (``MASKED_BATCH_KEYS``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # megatron-core then pads with an id no token has (its own choice when the pad id is
        # ambiguous), so the padding is found by position, whatever the tokenizer's pad id.
        self._pad_token_id = NOT_A_TOKEN

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        padding = sample["padding_mask"] == NOT_A_TOKEN
        tokens = numpy.where(padding, self.config.tokenizer.pad, sample["text"])
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(sample["labels"]),
            "loss_mask": torch.from_numpy(sample["loss_mask"].astype(numpy.float32)),
            "padding_mask": torch.from_numpy((~padding).astype(numpy.int64)),
            "token_types": torch.from_numpy(numpy.where(padding, 0, sample["types"])),
        }


class MockDocuments:
    """megatron-core's indexed dataset as the masked datasets read it, of random documents made of
    random sentences (3 to 40 tokens of ``words``, no special ids), the same for every seed and process."""

    documents = 20000
    seed = 0

    def __init__(self, words: range):
        rng = numpy.random.default_rng(self.seed)
        sentences_per_document = rng.integers(1, 8, size=self.documents)
        self.document_indices = numpy.concatenate([[0], numpy.cumsum(sentences_per_document)]).astype(numpy.int64)
        self.sequence_lengths = rng.integers(3, 41, size=int(self.document_indices[-1])).astype(numpy.int32)
        self.offsets = numpy.concatenate([[0], numpy.cumsum(self.sequence_lengths)])
        self.tokens = rng.integers(words.start, words.stop, size=int(self.offsets[-1]))
        self.path_prefix = None

    def __getitem__(self, sentence: int) -> numpy.ndarray:
        return self.tokens[self.offsets[sentence] : self.offsets[sentence + 1]]


class OfMockDocuments:
    """Makes a masked dataset read ``MockDocuments`` (data.source = "mock"): put it first among the
    bases and give ``build_low_level_dataset``."""

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: MockDocuments) -> int:
        return MockDocuments.documents

    def _build_sample_index(self, sequence_length: int, min_sentences_per_sample: int) -> numpy.ndarray:
        # Every rank builds mock data alone: megatron-core's index is built in memory; its cache
        # file goes to a directory of this process's own, gone after.
        cache = self.config.path_to_cache  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory() as self.config.path_to_cache:  # type: ignore[attr-defined]
            index = super()._build_sample_index(sequence_length, min_sentences_per_sample)  # type: ignore[misc]
        self.config.path_to_cache = cache  # type: ignore[attr-defined]
        return index


class MockMaskedLMDataset(OfMockDocuments, MaskedLMDataset):
    """``MaskedLMDataset`` over ``MockDocuments`` (data.source = "mock")."""

    @staticmethod
    def build_low_level_dataset(dataset_path, config) -> MockDocuments:
        return MockDocuments(range(max(MOCK_SPECIALS.values()) + 1, config.tokenizer.vocab_size))


def packed_token_share(dataset, *, room: int, short_sequence_probability: float, seed: int) -> float:
    """The share of an indexed dataset's tokens that one pass of megatron-core's masked samples
    holds: whole sentences of one document, up to ``room`` tokens, some shorter on purpose (its own
    sample map), what a truncated sample leaves out not counted."""
    from megatron.core.datasets import helpers

    sizes = dataset.sequence_lengths
    if not len(sizes):
        return 0.0
    samples = helpers.build_mapping(
        dataset.document_indices,
        sizes,
        1,  # one pass
        2**63,  # as many samples as it makes
        room,
        short_sequence_probability,
        seed,
        False,
        1,
    )
    ends = numpy.concatenate([[0], numpy.cumsum(sizes, dtype=numpy.int64)])
    held = numpy.minimum(ends[samples[:, 1]] - ends[samples[:, 0]], samples[:, 2]).sum()
    return float(held / ends[-1])


def masked_token_share(dataset, recipe) -> float:
    """``packed_token_share`` of masked-LM samples: up to model.seq_length - 3 tokens (the room
    megatron-core's BERT dataset leaves: [CLS], two [SEP])."""
    return packed_token_share(
        dataset,
        room=recipe.model.seq_length - 3,
        short_sequence_probability=recipe.data.masking.short_sequence_probability,
        seed=recipe.train.seed,
    )


def masked_config(recipe, vocabulary: MaskedVocabulary, **fields) -> BERTMaskedWordPieceDatasetConfig:
    """megatron-core's BERT dataset config for the recipe; ``fields``: blend, split, cache, seed."""
    masking = recipe.data.masking
    return BERTMaskedWordPieceDatasetConfig(
        sequence_length=recipe.model.seq_length,
        tokenizer=vocabulary,
        masking_probability=masking.probability,
        short_sequence_probability=masking.short_sequence_probability,
        masking_max_ngram=masking.max_span,
        masking_do_full_word=masking.whole_word,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=masking.span_lengths == "geometric",
        classification_head=False,
        **fields,
    )
