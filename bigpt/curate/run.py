"""Run a curation recipe: check everything, run the jobs (resumably), then publish the result.

Layout of ``output.dir``:
    curated.jsonl   the curated corpus (one {"text", "id", "metadata"} object per line); it
                    appears last, by rename, so its presence means the run is complete
    report.json     per stage and rule: documents and words in, kept, dropped
    report.png      drop reasons and the document-length histogram before/after
    work/           datatrove's job folders: documents per pass, dedup signatures, logs and
                    completion markers (a re-run skips finished tasks), the per-task counts
    explain/        explain mode's run on a sample (``explain``), laid out the same way

A re-run with the same recipe and input resumes; with a different one it is refused (its
work files would mix two curations) unless started over with ``restart``.
"""

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from bigpt.curate.recipe import MODEL_FILES, CurationRecipe, InputConfig, OutputConfig
from bigpt.errors import BigptError
from bigpt.paths import check_writable, not_a_file, write_atomically
from bigpt.recipe.serialize import recipe_to_dict

CURATED = "curated.jsonl"
MAX_DEDUP_TASKS = 65534
"""Exact dedup ranks a document by its task in a 16-bit priority (filters.InputOrderExactSignature)."""
RESULT_FILES = (CURATED, "report.json", "report.png")


@dataclass
class CurationResult:
    output: Path
    report: dict | None
    """None when the jobs were submitted to SLURM (the report is written by the last job)."""


def curate(recipe: CurationRecipe, *, restart: bool = False) -> CurationResult:
    """Check the recipe's inputs and models, then run (or submit) every job and finalize."""
    from bigpt.curate.inputs import input_files

    files = input_files(recipe.input)
    _check_models(recipe)
    if recipe.report.png:
        _require("matplotlib", "report.png (set report.png = false to skip it)")
    _require("datatrove", "curation")
    out = Path(recipe.output.dir)
    _check_apart(recipe.input.path, files, out)
    check_writable(out, "output.dir")
    tasks = recipe.executor.tasks or _default_tasks(recipe, files, out / "work" / "fingerprint.json", restart)
    _check_executor(recipe, tasks)
    if recipe.executor.kind == "ray":
        from bigpt.curate.executors import ray_connection

        with ray_connection(recipe.executor.ray):
            return _run(recipe, files, tasks, restart)
    return _run(recipe, files, tasks, restart)


def _run(recipe: CurationRecipe, files: list[Path], tasks: int, restart: bool) -> CurationResult:
    out = Path(recipe.output.dir)
    work = out / "work"
    _claim(work, out, _fingerprint(recipe, files, tasks), restart)
    if (out / CURATED).exists():
        return CurationResult(out, json.loads((out / "report.json").read_text()))

    from bigpt.curate.audit import SKIPPED_LINES
    from bigpt.curate.inputs import input_reader
    from bigpt.curate.plan import plan_jobs

    read_input = input_reader(recipe.input, files, work / "input_files.txt", work / SKIPPED_LINES, tasks)
    jobs = plan_jobs(recipe, work, read_input, tasks)
    if recipe.executor.kind == "slurm":
        from bigpt.curate.executors import submit_slurm

        submit_slurm(recipe, jobs, work, Finalizer(recipe, out, tasks))
        return CurationResult(out, None)
    from bigpt.curate.executors import run_local, run_ray

    (run_ray if recipe.executor.kind == "ray" else run_local)(recipe, jobs, work)
    return CurationResult(out, Finalizer(recipe, out, tasks).finalize())


EXPLAIN = "explain"
EXPLAIN_EXCERPTS = 3


def explain(recipe: CurationRecipe, sample: int) -> CurationResult:
    """Run the recipe's stages on the first ``sample`` documents of its input (in input order),
    quoting what each rule drops: OUTPUT/explain/ gets sample.jsonl and that run's curated.jsonl,
    report.json (with excerpts) and report.png. Redone from scratch each time; the full
    curation's files are not touched."""
    from itertools import islice

    from bigpt.curate.inputs import input_files, input_reader

    folder = Path(recipe.output.dir) / EXPLAIN
    folder.mkdir(parents=True, exist_ok=True)
    files = input_files(recipe.input)
    reader = input_reader(recipe.input, files, folder / "sample_of.txt", folder / "sample_skipped_lines", 1)()
    with open(folder / "sample.jsonl", "w") as out:
        for doc in islice(reader.run(None, 0, 1), sample):
            out.write(json.dumps({**doc.metadata, "id": doc.id, "text": doc.text}) + "\n")
    sampled = dataclasses.replace(
        recipe,
        input=InputConfig(path=str(folder / "sample.jsonl")),
        output=OutputConfig(dir=str(folder)),
        executor=dataclasses.replace(recipe.executor, kind="local", tasks=0),
        report=dataclasses.replace(recipe.report, excerpts=EXPLAIN_EXCERPTS),
    )
    return curate(sampled, restart=True)


class Finalizer:
    """Report + merge of the last pass's shards into curated.jsonl (a job of its own on SLURM)."""

    def __init__(self, recipe: CurationRecipe, out: Path, tasks: int):
        self.recipe, self.out, self.tasks = recipe, out, tasks

    def finalize(self) -> dict:
        from bigpt.curate.plan import FINAL_DOCS
        from bigpt.curate.report import build_report, draw_report

        work = self.out / "work"
        report = build_report(self.recipe, work, self.tasks)
        write_atomically(self.out / "report.json", lambda f: json.dump(report, f, indent=2), key="output.dir's report")
        if self.recipe.report.png:
            draw_report(report, self.out / "report.png")
        shards = sorted((work / FINAL_DOCS).glob("*.jsonl"))
        write_atomically(self.out / CURATED, lambda f: _concatenate(shards, f), key="output.dir's curated corpus")
        return report

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        """As a datatrove pipeline step (the last SLURM job)."""
        self.finalize()
        return iter(())


def _concatenate(shards: list[Path], out) -> None:
    for shard in shards:
        with open(shard) as f:
            shutil.copyfileobj(f, out)


def _check_apart(input_path: str, files: list[Path], out: Path) -> None:
    """The input and the output do not overlap: an output folder inside the input folder would be
    read back as input by the next run, and input inside the folders a run rewrites (work/, its
    results; --restart empties them) would be lost."""
    source, target = Path(input_path).resolve(), out.resolve()
    if source.is_dir() and (target == source or source in target.parents):
        raise BigptError(
            f"output.dir = {out} is {'the input folder' if target == source else 'inside the input folder'} "
            f"input.path = {input_path}: the next run would read its curated corpus and work files as input. "
            "Set output.dir outside the input folder."
        )
    rewritten = [target / "work", *(target / name for name in RESULT_FILES)]
    for file in files:
        resolved = file.resolve()
        if any(resolved == place or place in resolved.parents for place in rewritten):
            raise BigptError(
                f"input file {file} is among what output.dir = {out} holds for the curation itself (work/, "
                f"{', '.join(RESULT_FILES)}), which a run rewrites and --restart deletes. Copy it elsewhere "
                "and name the copy in input.path, or set output.dir elsewhere."
            )


def _check_models(recipe: CurationRecipe) -> None:
    for stage in recipe.stages:
        if stage == "perplexity":
            _check_reference(recipe)
        elif stage in MODEL_FILES:
            _check_fasttext(recipe, stage)


def _check_reference(recipe: CurationRecipe) -> None:
    """Check the reference model's files and pin them in the recipe (so in the fingerprint): a
    run's checkpoint directory that gains a newer checkpoint cannot change a resumed curation."""
    from bigpt.curate.reference import check_reference

    params = recipe.stage.perplexity
    assert params.checkpoint is not None, "refused unset when the recipe loaded (MODEL_FILES)"
    files = check_reference(params.checkpoint, params.tokenizer)
    params.checkpoint, params.tokenizer = str(files.checkpoint.resolve()), str(files.tokenizer.resolve())


def _check_fasttext(recipe: CurationRecipe, stage: str) -> None:
    key = MODEL_FILES[stage]
    path = getattr(recipe.params(stage), key)
    hint = (
        "train one with tools/train_quality_classifier.py"
        if stage == "quality_classifier"
        else "download a fastText language-ID model (e.g. lid.176.bin) and name it there"
    )
    if why := not_a_file(path):
        raise BigptError(f"stage.{stage}.{key} {path} {why}; {hint}.")
    _require("fasttext", f"stage {stage!r}")
    from bigpt.curate.filters import load_fasttext

    try:
        model = load_fasttext(path)
    except ValueError as err:
        raise BigptError(f"stage.{stage}.{key} {path} is not a fastText model ({err}); {hint}.") from None
    if stage == "quality_classifier":
        labels = [label.removeprefix("__label__") for label in model.labels]
        label = recipe.stage.quality_classifier.label
        if label not in labels:
            raise BigptError(
                f"stage.quality_classifier.label {label!r} is not a label of {path}; its labels: {', '.join(labels)}."
            )


def _default_tasks(recipe: CurationRecipe, files: list[Path], fingerprint: Path, restart: bool) -> int:
    """executor.tasks = 0: a task per input file and, for JSONL (split by bytes), at least one
    per worker, so one large file keeps every worker busy; a resumed run keeps the count it was
    started with (the work files are per task), whatever workers it is given now."""
    recorded = None if restart else _recorded(fingerprint)
    if recorded and isinstance(recorded.get("tasks"), int):
        return recorded["tasks"]
    return max(len(files), recipe.executor.workers if recipe.input.format == "jsonl" else 1)


def _check_executor(recipe: CurationRecipe, tasks: int) -> None:
    if recipe.executor.kind == "slurm" and shutil.which("sbatch") is None:
        raise BigptError(
            'executor.kind = "slurm" but there is no sbatch command on this machine\'s '
            'PATH; run on a SLURM login node, or set executor.kind = "local".'
        )
    if "exact_dedup" in recipe.stages and tasks > MAX_DEDUP_TASKS:
        raise BigptError(
            f"exact_dedup ranks copies by task and takes at most {MAX_DEDUP_TASKS} tasks, "
            f"got {tasks}; set executor.tasks lower or merge input files."
        )


def _require(module: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise BigptError(
            f"{what} needs the Python package {module!r}, which is not installed; "
            f"install bigpt's curation extra: pip install -e '.[curate]'."
        ) from None


def _fingerprint(recipe: CurationRecipe, files: list[Path], tasks: int) -> dict:
    """What decides the result: the recipe less how it is executed, the inputs, the sharding."""
    settings = recipe_to_dict(recipe)
    settings.pop("executor")
    settings.pop("report")
    inputs = [[str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns] for file in files]
    return {"recipe": settings, "tasks": tasks, "inputs": inputs}


def _claim(work: Path, out: Path, fingerprint: dict, restart: bool) -> None:
    """Make ``work`` ours: new, or left by the same curation; else refuse or start over."""
    marker = work / "fingerprint.json"
    if restart:
        shutil.rmtree(work, ignore_errors=True)
        for name in RESULT_FILES:
            (out / name).unlink(missing_ok=True)
    elif marker.exists():
        recorded = _recorded(marker)
        if recorded == fingerprint:
            return
        what = (
            "a curation made with another recipe, input or task count"
            if recorded
            else f"a curation whose record {marker} cannot be read (a run stopped while writing it)"
        )
        raise BigptError(f"{out} holds {what}; re-run with --restart to discard it, or set output.dir elsewhere.")
    elif (out / CURATED).exists() or work.exists():
        raise BigptError(
            f"{out} holds files bigpt did not record as this curation's; re-run with "
            f"--restart to discard them, or set output.dir elsewhere."
        )
    work.mkdir(parents=True, exist_ok=True)
    write_atomically(marker, json.dumps(fingerprint, indent=1), key="output.dir's work/fingerprint.json")


def _recorded(marker: Path) -> dict | None:
    """The fingerprint a run recorded in ``marker``; None when there is none or it is unreadable."""
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None
