"""The stage registry: each TOML stage name → the datatrove blocks that do it.

A *filter* stage is one block that looks at one document at a time; consecutive filter stages
run in one pass over the data. A *global* stage (deduplication, the perplexity band) must see
every document of the previous pass before it can drop any: it adds jobs of its own
(signatures and matching; scoring and the band) and then a block that opens the next pass.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.utils.hashing import HashConfig

from bigpt.curate import filters, recipe
from bigpt.curate.documents import documents_writer
from bigpt.curate.recipe import STAGE_NAMES


@dataclass
class FilterStage:
    block: BaseFilter
    default_reason: str
    """Drop reason counted when the block gives none."""


@dataclass
class Job:
    """One datatrove executor run: ``tasks`` copies of ``pipeline`` (each reads its shard)."""

    name: str
    pipeline: list
    tasks: int
    reads_previous_pass: bool = False
    """Prepend the reader of the previous pass's documents."""
    fresh_processes: bool = False
    """Run its local tasks in processes started afresh (a fork server), not forks of this one:
    a fork of a process whose torch has used its OpenMP threads hangs at its first matmul."""


@dataclass
class GlobalStage:
    jobs: list[Job]
    """Run after the previous pass, before ``block``."""
    block: PipelineStep
    """Opens the next pass; drops documents only."""
    reason: str
    """Drop reason counted when the block gives none."""
    documents: str | None = None
    """What the next pass reads, when the jobs wrote annotated copies of the previous pass's
    documents (None: the previous pass's documents)."""


def gopher_quality(p: recipe.GopherQualityStage, folder: str, tasks: int) -> FilterStage:
    return FilterStage(
        filters.GopherQuality(
            min_doc_words=p.min_doc_words,
            max_doc_words=p.max_doc_words,
            min_avg_word_length=p.min_avg_word_length,
            max_avg_word_length=p.max_avg_word_length,
            max_symbol_word_ratio=p.max_symbol_word_ratio,
            max_bullet_lines_ratio=p.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=p.max_ellipsis_lines_ratio,
            min_alpha_words_ratio=p.max_non_alpha_words_ratio,
            min_stop_words=p.min_stop_words,
            language=p.language,
        ),
        "gopher_quality",
    )


def gopher_repetition(p: recipe.GopherRepetitionStage, folder: str, tasks: int) -> FilterStage:
    return FilterStage(
        filters.GopherRepetition(
            dup_line_frac=p.dup_line_frac,
            dup_para_frac=p.dup_para_frac,
            dup_line_char_frac=p.dup_line_char_frac,
            dup_para_char_frac=p.dup_para_char_frac,
            top_n_grams=tuple(zip((2, 3, 4), p.top_n_gram_fracs)),
            dup_n_grams=tuple(zip(range(5, 11), p.dup_n_gram_fracs)),
            language=p.language,
        ),
        "gopher_repetition",
    )


def c4(p: recipe.C4Stage, folder: str, tasks: int) -> FilterStage:
    return FilterStage(
        filters.C4Quality(
            wrap_length=p.wrap_length,
            min_num_sentences=p.min_num_sentences,
            min_words_per_line=p.min_words_per_line,
            max_word_length=p.max_word_length,
            filter_no_terminal_punct=p.filter_no_terminal_punct,
            filter_lorem_ipsum=p.filter_lorem_ipsum,
            filter_javascript=p.filter_javascript,
            filter_curly_bracket=p.filter_curly_bracket,
            filter_policy=p.filter_policy,
            language=p.language,
        ),
        "c4",
    )


def fineweb_quality(p: recipe.FineWebQualityStage, folder: str, tasks: int) -> FilterStage:
    return FilterStage(
        filters.FineWebQuality(
            wrap_length=p.wrap_length,
            line_punct_thr=p.line_punct_thr,
            short_line_thr=p.short_line_thr,
            short_line_length=p.short_line_length,
            char_duplicates_ratio=p.char_duplicates_ratio,
            new_line_ratio=p.new_line_ratio,
            language=p.language,
        ),
        "fineweb_quality",
    )


def length(p: recipe.LengthStage, folder: str, tasks: int) -> FilterStage:
    return FilterStage(filters.LengthFilter(p.min_words, p.max_words), "length")


def language(p: recipe.LanguageStage, folder: str, tasks: int) -> FilterStage:
    assert p.model is not None, "checked before any work: the stages that need a model have one"
    return FilterStage(filters.LocalLanguageFilter(p.model, p.languages, p.min_score), "language_not_kept")


def keywords(p: recipe.KeywordsStage, folder: str, tasks: int) -> FilterStage:
    return FilterStage(filters.KeywordFilter(p.include, p.exclude, p.min_hits, p.case_sensitive), "keywords")


def urls(p: recipe.UrlsStage, folder: str, tasks: int) -> FilterStage:
    return FilterStage(
        filters.UrlDomainFilter(p.include_domains, p.exclude_domains, p.url_field, p.keep_without_url), "urls"
    )


def quality_classifier(p: recipe.QualityClassifierStage, folder: str, tasks: int) -> FilterStage:
    return FilterStage(
        filters.LocalFastTextClassifier(p.model, keep_labels=[(p.label, p.min_score)], newline_replacement=" "),
        "below_quality_score",
    )


# datatrove 0.10's default xxhash hashing fails on the str it is given; its sha1 does not.
HASHING = HashConfig(precision=64, hash_fc="sha1")


def normalized_text(doc: Document) -> str:
    return " ".join(doc.text.lower().split())


def exact_text(doc: Document) -> str:
    return doc.text


def exact_dedup(p: recipe.ExactDedupStage, folder: str, tasks: int) -> GlobalStage:
    config = ExactDedupConfig(content_getter=normalized_text if p.normalize else exact_text, hash_config=HASHING)
    signatures, duplicates = f"{folder}/signatures", f"{folder}/duplicates"
    return GlobalStage(
        jobs=[
            Job(
                "signatures",
                [filters.InputOrderExactSignature(signatures, config, finder_workers=tasks)],
                tasks,
                reads_previous_pass=True,
            ),
            Job("find", [ExactFindDedups(signatures, duplicates, config)], tasks),
        ],
        block=ExactDedupFilter(duplicates, config),
        reason="exact_duplicate",
    )


def minhash_dedup(p: recipe.MinhashDedupStage, folder: str, tasks: int) -> GlobalStage:
    config = MinhashConfig(
        n_grams=p.n_grams,
        num_buckets=p.num_buckets,
        hashes_per_bucket=p.hashes_per_bucket,
        seed=p.seed,
        hash_config=HASHING,
    )
    signatures, buckets, remove = f"{folder}/signatures", f"{folder}/buckets", f"{folder}/remove_ids"
    return GlobalStage(
        jobs=[
            Job("signatures", [filters.MinhashSignatures(signatures, config)], tasks, reads_previous_pass=True),
            Job("buckets", [MinhashDedupBuckets(signatures, buckets, config=config)], p.num_buckets),
            Job("cluster", [filters.InputOrderCluster(buckets, remove, config=config)], 1),
        ],
        block=MinhashDedupFilter(remove),
        reason="near_duplicate",
    )


def perplexity(p: recipe.PerplexityStage, folder: str, tasks: int) -> GlobalStage:
    from bigpt.curate.perplexity import PerplexityBand, PerplexityBandFilter, PerplexityScorer
    from bigpt.curate.reference import ReferenceFiles

    scores, band, scored = f"{folder}/scores", f"{folder}/band.json", f"{folder}/scored"
    assert p.checkpoint is not None and p.tokenizer is not None, "resolved by the run's checks"
    files = ReferenceFiles(Path(p.checkpoint), Path(p.tokenizer))
    scorer = PerplexityScorer(files, scores, max_tokens=p.max_tokens, batch_size=p.batch_size)
    return GlobalStage(
        jobs=[
            Job("score", [scorer, documents_writer(scored)], tasks, reads_previous_pass=True, fresh_processes=True),
            Job("band", [PerplexityBand(scores, tasks, band, p.min_percentile, p.max_percentile)], 1),
        ],
        block=PerplexityBandFilter(band),
        reason="perplexity_outside_band",
        documents=scored,
    )


STAGES: dict[str, Callable[..., FilterStage | GlobalStage]] = {
    "gopher_quality": gopher_quality,
    "gopher_repetition": gopher_repetition,
    "c4": c4,
    "fineweb_quality": fineweb_quality,
    "length": length,
    "language": language,
    "keywords": keywords,
    "urls": urls,
    "exact_dedup": exact_dedup,
    "minhash_dedup": minhash_dedup,
    "quality_classifier": quality_classifier,
    "perplexity": perplexity,
}
"""Stage name → builder(params, work folder of the stage, tasks per pass)."""

assert tuple(STAGES) == STAGE_NAMES, "the registry and recipe.StagesConfig must list the same stages"


def first_drop(curation: recipe.CurationRecipe, text: str) -> str:
    """The first filter rule of ``curation`` that drops ``text``, as ``STAGE:REASON`` ("" when
    none does): its filter stages in order on one document, each on the text the one before
    kept (C4 edits the lines of what it keeps). Global stages need the whole corpus: skipped."""
    for name in curation.stages:
        stage = STAGES[name](curation.params(name), "", 1)
        if not isinstance(stage, FilterStage):
            continue
        doc = Document(text=text, id="0")
        keep, reason = get_filter_result(stage.block.filter(doc))
        if not keep:
            return f"{name}:{reason or stage.default_reason}"
        text = doc.text
    return ""
