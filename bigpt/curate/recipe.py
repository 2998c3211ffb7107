"""Curation recipes: one dataclass per TOML table; the docstring under each field is its reference.

A recipe lists its stages in order (``stages = ["gopher_repetition", "minhash_dedup", ...]``)
and sets their parameters in ``[stage.NAME]`` tables, so a child recipe (``base = ...``) or a
``stage.NAME.key=value`` override changes one threshold without restating the list. Loading
reuses the training-recipe machinery (``bigpt.recipe.loader``/``build``): base chains, dotted
overrides, strict keys with did-you-mean, types and ranges, recipe-relative paths.
"""

import dataclasses
import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from bigpt.errors import BigptError
from bigpt.recipe.build import build_dataclass
from bigpt.recipe.fields import NOT_A_KEY, fraction, non_negative, output_path, percentile, positive, recipe_path
from bigpt.recipe.loader import merge_layers


@dataclass(kw_only=True)
class InputConfig:
    """[input]: the raw corpus."""

    path: str = recipe_path()
    """A file, or a directory read recursively (relative to the recipe file)."""
    format: Literal["jsonl", "parquet", "text"] = "jsonl"
    """jsonl (one JSON object per line, .gz/.zst too), parquet, or text (one document per line)."""
    glob: str = ""
    """Files of a directory to read; empty = by format: *.jsonl*, *.parquet, *.txt."""
    text_field: str = "text"
    """The JSONL key or Parquet column holding the text."""
    id_field: str = "id"
    """The key holding a document id; documents without one get FILE/LINE."""


@dataclass(kw_only=True)
class OutputConfig:
    """[output]: where the curated corpus, the report and the resumable work files go."""

    dir: str = output_path()
    """Output directory, relative to the working directory (like a training run_dir). It gets
    curated.jsonl (feed it to tools/preprocess_data.py), report.json, report.png and work/."""


@dataclass(kw_only=True)
class SlurmConfig:
    """[executor.slurm]: datatrove's SLURM executor (one job array per step, chained)."""

    partition: str = ""
    """SLURM partition (required for kind = "slurm")."""
    time: str = "24:00:00"
    """Time limit of each job."""
    cpus_per_task: int = positive(1)
    """CPUs of each task."""
    mem_per_cpu_gb: int = positive(2)
    """Memory per CPU in GB."""
    qos: str = "normal"
    """Quality of service."""
    venv_path: str = ""
    """A virtual environment's activate script sourced by each job; empty = none."""


@dataclass(kw_only=True)
class RayConfig:
    """[executor.ray]: datatrove's Ray executor (each step's tasks as Ray actors, steps in order;
    output.dir must be on a filesystem every Ray node mounts at the same path)."""

    address: str = "auto"
    """The Ray cluster: auto = the one this machine belongs to (``ray start``, or RAY_ADDRESS);
    HOST:PORT = its head node; local = a Ray instance started on this machine for the run."""
    cpus_per_task: int = positive(1)
    """CPUs Ray reserves for each task."""
    mem_per_cpu_gb: float = non_negative(2.0)
    """Memory in GB Ray reserves per CPU of a task; 0 = none."""


@dataclass(kw_only=True)
class ExecutorConfig:
    """[executor]: how the stages run."""

    kind: Literal["local", "slurm", "ray"] = "local"
    """local: processes on this machine; slurm: job arrays submitted with sbatch; ray: tasks on
    a Ray cluster (needs the ray extra)."""
    tasks: int = non_negative(0)
    """Shards of work per step; 0 = one per input file and, for JSONL, at least one per worker
    (a resumed run keeps the count it started with). Each task reads the next part of the input
    in order (JSONL split by bytes, so one large file can feed many workers; Parquet and text
    by whole files). A resumed run must keep it."""
    workers: int = positive(1)
    """Tasks run at once (local processes, the job array's concurrency on SLURM, Ray actors)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """[executor.slurm]"""
    ray: RayConfig = field(default_factory=RayConfig)
    """[executor.ray]"""


@dataclass(kw_only=True)
class ReportConfig:
    """[report]: per stage and rule, documents and tokens kept and dropped."""

    png: bool = True
    """Also draw report.png (drop reasons, document length before/after); needs matplotlib."""
    excerpts: int = non_negative(0)
    """Dropped documents quoted per stage and rule in report.json (the first ones of each task);
    tools/curate.py --sample sets 3."""


# ------------------------------------------------------------------ stage parameter tables
# Each is a [stage.NAME] table; the defaults are datatrove's (the published recipes' values).

WRAP_LENGTH = 40
"""The line rules of C4 and FineWeb read a line as a paragraph (as web pages break them); a line
of this many characters or more that does not end in terminal punctuation and is followed by
a non-blank line is read as hard-wrapped (manuals, licenses, docstrings) and joined to the
next. 0 = every line stands alone, as in datatrove."""


@dataclass(kw_only=True)
class GopherQualityStage:
    """[stage.gopher_quality]: Gopher (Rae et al. 2021) quality heuristics, datatrove's
    GopherQualityFilter. Drop reasons: gopher_short_doc, gopher_below_avg_threshold, ..."""

    min_doc_words: int = non_negative(50)
    """Fewer words than this is dropped."""
    max_doc_words: int = positive(100000)
    """More words than this is dropped."""
    min_avg_word_length: float = non_negative(3.0)
    """Mean word length (characters) below this is dropped."""
    max_avg_word_length: float = positive(10.0)
    """Mean word length above this is dropped."""
    max_symbol_word_ratio: float = fraction(0.1)
    """Share of '#' and '...' per word above this is dropped."""
    max_bullet_lines_ratio: float = fraction(0.9)
    """Share of lines starting with a bullet above this is dropped."""
    max_ellipsis_lines_ratio: float = fraction(0.3)
    """Share of lines ending with an ellipsis above this is dropped."""
    max_non_alpha_words_ratio: float = fraction(0.8)
    """Minimum share of words with an alphabetic character (named max_ in datatrove); words are
    tokens that are not only punctuation (datatrove also counted commas and brackets)."""
    min_stop_words: int = non_negative(2)
    """Fewer English stop words (the, be, to, of, and, that, have, with) is dropped."""
    language: str = "en"
    """Language of the word tokenizer."""


@dataclass(kw_only=True)
class GopherRepetitionStage:
    """[stage.gopher_repetition]: Gopher repetition removal (repeated lines, paragraphs and
    n-grams), datatrove's GopherRepetitionFilter."""

    dup_line_frac: float = fraction(0.3)
    """Share of lines that are duplicates above this is dropped."""
    dup_para_frac: float = fraction(0.3)
    """Share of paragraphs that are duplicates above this is dropped."""
    dup_line_char_frac: float = fraction(0.2)
    """Share of characters in duplicate lines above this is dropped."""
    dup_para_char_frac: float = fraction(0.2)
    """Share of characters in duplicate paragraphs above this is dropped."""
    top_n_gram_fracs: list[float] = field(default_factory=lambda: [0.2, 0.18, 0.16], metadata=fraction().metadata)
    """For n = 2, 3, 4: the most frequent n-gram covering more than this share of characters
    is dropped."""
    dup_n_gram_fracs: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.1], metadata=fraction().metadata
    )
    """For n = 5..10: duplicated n-grams covering more than this share of characters is dropped."""
    language: str = "en"
    """Language of the word tokenizer."""


@dataclass(kw_only=True)
class C4Stage:
    """[stage.c4]: the C4 (Raffel et al. 2020) line and document rules, datatrove's
    C4QualityFilter. It also removes offending lines from kept documents."""

    min_num_sentences: int = non_negative(5)
    """Fewer sentences than this is dropped."""
    min_words_per_line: int = non_negative(3)
    """Lines with fewer words are removed."""
    max_word_length: int = positive(1000)
    """Lines with a longer word are removed."""
    filter_no_terminal_punct: bool = True
    """Remove lines not ending a sentence (. ? ! a closing quote or a colon, also before closing
    brackets and emphasis: filters.ends_sentence)."""
    wrap_length: int = non_negative(WRAP_LENGTH)
    """Lines this long or longer not ending a sentence continue on the next (WRAP_LENGTH)."""
    filter_lorem_ipsum: bool = True
    """Drop documents containing 'lorem ipsum'."""
    filter_javascript: bool = True
    """Remove lines mentioning javascript."""
    filter_curly_bracket: bool = True
    """Drop documents with a curly bracket (code)."""
    filter_policy: bool = True
    """Remove lines about cookies, terms of use and privacy policies (boilerplate)."""
    language: str = "en"
    """Language of the sentence splitter."""


@dataclass(kw_only=True)
class FineWebQualityStage:
    """[stage.fineweb_quality]: FineWeb's line-level quality rules, datatrove's
    FineWebQualityFilter."""

    line_punct_thr: float = fraction(0.12)
    """Share of lines ending in punctuation below this is dropped."""
    short_line_thr: float = fraction(0.67)
    """Share of short lines above this is dropped."""
    short_line_length: int = positive(30)
    """A line shorter than this many characters is short."""
    char_duplicates_ratio: float = fraction(0.01)
    """Share of characters in duplicated lines above this is dropped."""
    new_line_ratio: float = fraction(0.3)
    """Line breaks per word above this is dropped."""
    wrap_length: int = non_negative(WRAP_LENGTH)
    """Lines this long or longer not ending a sentence continue on the next (WRAP_LENGTH)."""
    language: str = "en"
    """Language of the word tokenizer."""


@dataclass(kw_only=True)
class LengthStage:
    """[stage.length]: documents outside a word-count range are dropped (too_short, too_long)."""

    min_words: int = non_negative(0)
    """Fewer whitespace-separated words than this is dropped."""
    max_words: int = positive(1_000_000)
    """More words than this is dropped."""


@dataclass(kw_only=True)
class LanguageStage:
    """[stage.language]: fastText language identification (datatrove's LanguageFilter) with a
    model file on disk, e.g. lid.176.bin (bigpt never downloads it)."""

    model: str | None = recipe_path()
    """The fastText language-ID model (labels __label__en, ...), relative to the recipe."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Languages to keep."""
    min_score: float = fraction(0.65)
    """A document whose best language scores below this is dropped."""


@dataclass(kw_only=True)
class KeywordsStage:
    """[stage.keywords]: domain selection by keyword lists (whole words)."""

    include: list[str] = field(default_factory=list)
    """Keep only documents with at least min_hits occurrences of these (empty = no include rule)."""
    exclude: list[str] = field(default_factory=list)
    """Drop documents containing any of these."""
    min_hits: int = positive(1)
    """Occurrences of include keywords needed to keep a document."""
    case_sensitive: bool = False
    """Match case exactly."""


@dataclass(kw_only=True)
class UrlsStage:
    """[stage.urls]: domain selection by the document's URL (a domain matches its subdomains)."""

    include_domains: list[str] = field(default_factory=list)
    """Keep only documents from these domains (empty = no include rule)."""
    exclude_domains: list[str] = field(default_factory=list)
    """Drop documents from these domains."""
    url_field: str = "url"
    """The input key holding the URL."""
    keep_without_url: bool = False
    """Keep documents that have no URL (else they are dropped as no_url)."""


@dataclass(kw_only=True)
class ExactDedupStage:
    """[stage.exact_dedup]: keep one copy of documents with identical text (datatrove's
    ExactDedupSignature / ExactFindDedups / ExactDedupFilter); the first copy in input order
    is kept."""

    normalize: bool = True
    """Compare text lower-cased with runs of whitespace collapsed."""


@dataclass(kw_only=True)
class MinhashDedupStage:
    """[stage.minhash_dedup]: near-duplicate removal with MinHash LSH (datatrove's four MinHash
    steps); the first document in input order of each cluster of near duplicates is kept. Two
    documents are caught with high probability above a word n-gram Jaccard similarity of about
    (1 / num_buckets) ** (1 / hashes_per_bucket) (0.72 with the defaults)."""

    n_grams: int = positive(5)
    """Word n-gram size of the shingles."""
    num_buckets: int = positive(14)
    """LSH bands; more catches less similar pairs."""
    hashes_per_bucket: int = positive(8)
    """Hashes per band; more needs higher similarity."""
    seed: int = non_negative(1)
    """Seed of the hash functions."""


@dataclass(kw_only=True)
class QualityClassifierStage:
    """[stage.quality_classifier]: a fastText classifier (tools/train_quality_classifier.py)
    keeps documents whose score for ``label`` is at least min_score."""

    model: str | None = recipe_path()
    """The fastText model file, relative to the recipe."""
    label: str = "hq"
    """The label of good documents (without __label__)."""
    min_score: float = fraction(0.5)
    """Documents scoring lower on label are dropped."""


@dataclass(kw_only=True)
class PerplexityStage:
    """[stage.perplexity]: perplexity filtering (CCNet, Wenzek et al. 2020): a reference model
    trained on trusted text scores every document, and documents outside a percentile band of
    the scores are dropped (perplexity_above_band / perplexity_below_band). The band is taken
    over all documents reaching the stage, so the stage scores them in a pass of its own first.
    Kept documents carry their score as metadata.perplexity."""

    checkpoint: str | None = recipe_path()
    """The reference model: a bigpt checkpoint (an iter_* directory, a run's checkpoint
    directory = its newest intact checkpoint, or the output of tools/convert_hf.py import),
    relative to the recipe. Resolved once when the run starts."""
    tokenizer: str | None = recipe_path()
    """Its tokenizer; unset = data.tokenizer of the checkpoint's recipe.toml (or an import's
    tokenizer.json)."""
    min_percentile: float = percentile(0.0)
    """Documents scoring below this percentile of all scores are dropped (0 = none; repetitive,
    templated text scores very low)."""
    max_percentile: float = percentile(90.0)
    """Documents scoring above this percentile are dropped (100 = none; gibberish and text
    unlike the trusted text score high)."""
    max_tokens: int = positive(2048)
    """Predicted tokens scored per document (its beginning), in windows of the model's
    seq_length."""
    batch_size: int = positive(4)
    """Windows per forward pass (its logits take batch_size x seq_length x vocabulary floats)."""


@dataclass(kw_only=True)
class StagesConfig:
    """[stage]: parameters of each stage; only the stages named in ``stages`` run."""

    gopher_quality: GopherQualityStage = field(default_factory=GopherQualityStage)
    """[stage.gopher_quality]"""
    gopher_repetition: GopherRepetitionStage = field(default_factory=GopherRepetitionStage)
    """[stage.gopher_repetition]"""
    c4: C4Stage = field(default_factory=C4Stage)
    """[stage.c4]"""
    fineweb_quality: FineWebQualityStage = field(default_factory=FineWebQualityStage)
    """[stage.fineweb_quality]"""
    length: LengthStage = field(default_factory=LengthStage)
    """[stage.length]"""
    language: LanguageStage = field(default_factory=LanguageStage)
    """[stage.language]"""
    keywords: KeywordsStage = field(default_factory=KeywordsStage)
    """[stage.keywords]"""
    urls: UrlsStage = field(default_factory=UrlsStage)
    """[stage.urls]"""
    exact_dedup: ExactDedupStage = field(default_factory=ExactDedupStage)
    """[stage.exact_dedup]"""
    minhash_dedup: MinhashDedupStage = field(default_factory=MinhashDedupStage)
    """[stage.minhash_dedup]"""
    quality_classifier: QualityClassifierStage = field(default_factory=QualityClassifierStage)
    """[stage.quality_classifier]"""
    perplexity: PerplexityStage = field(default_factory=PerplexityStage)
    """[stage.perplexity]"""


STAGE_NAMES = tuple(f.name for f in dataclasses.fields(StagesConfig))
"""Every stage a recipe can name, in the order of the reference above."""

MODEL_FILES = {"language": "model", "quality_classifier": "model", "perplexity": "checkpoint"}
"""Stages that need a model, and the key naming it."""


@dataclass(kw_only=True)
class CurationRecipe:
    """A whole curation recipe file."""

    name: str
    """Name of the curation, shown in the report."""
    input: InputConfig
    """[input]"""
    output: OutputConfig
    """[output]"""
    stages: list[str]
    """Stage names in the order they run (see [stage]); a stage appears at most once."""
    stage: StagesConfig = field(default_factory=StagesConfig)
    """[stage]"""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """[executor]"""
    report: ReportConfig = field(default_factory=ReportConfig)
    """[report]"""
    source: str = field(default="", compare=False, metadata={NOT_A_KEY: True})
    """Path of the recipe file (not a TOML key)."""

    def params(self, stage: str):
        """The [stage.NAME] table of a stage."""
        return getattr(self.stage, stage)


def load_curation_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> CurationRecipe:
    """Load, merge, type-check and cross-check a curation recipe; BigptError on any mistake."""
    merged, origins = merge_layers(path, overrides)
    recipe = build_dataclass(CurationRecipe, merged, origins, source=str(path))
    _check_stages(recipe, origins)
    return recipe


def _check_stages(recipe: CurationRecipe, origins) -> None:
    where = origins.of("stages").label
    if not recipe.stages:
        raise BigptError(f"stages is empty in {where}; name at least one of: {', '.join(STAGE_NAMES)}.")
    for name in recipe.stages:
        if name not in STAGE_NAMES:
            close = difflib.get_close_matches(name, STAGE_NAMES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known stages: {', '.join(STAGE_NAMES)}."
            raise BigptError(f"unknown stage {name!r} in stages in {where}; {hint}")
        if recipe.stages.count(name) > 1:
            raise BigptError(
                f"stage {name!r} is named twice in stages in {where}; a stage runs once "
                f"(put all its settings in [stage.{name}])."
            )
        key = MODEL_FILES.get(name)
        if key and getattr(recipe.params(name), key) is None:
            raise BigptError(
                f"stage.{name}.{key} is not set but {name!r} is in stages in {where}; "
                f"name the model file in [stage.{name}]."
            )
    band = recipe.stage.perplexity
    if band.min_percentile >= band.max_percentile:
        raise BigptError(
            f"stage.perplexity.min_percentile ({band.min_percentile}) must be below "
            f"stage.perplexity.max_percentile ({band.max_percentile}) in "
            f"{origins.of('stage.perplexity.max_percentile').label}; they bound the band of "
            "scores that is kept."
        )
    slurm = recipe.executor.slurm
    if recipe.executor.kind == "slurm" and not slurm.partition:
        raise BigptError(
            'executor.slurm.partition is required for executor.kind = "slurm"; '
            f"set it in {origins.of('executor.kind').label}."
        )
    gopher = recipe.stage.gopher_repetition
    for key, fracs, count in (
        ("top_n_gram_fracs", gopher.top_n_gram_fracs, 3),
        ("dup_n_gram_fracs", gopher.dup_n_gram_fracs, 6),
    ):
        if len(fracs) != count:
            raise BigptError(
                f"stage.gopher_repetition.{key} needs {count} values (one per n), "
                f"got {len(fracs)} in {origins.of('stage.gopher_repetition.' + key).label}."
            )
