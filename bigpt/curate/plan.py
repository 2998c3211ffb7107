"""Ordered stages → datatrove jobs.

Consecutive filter stages share one pass: read → filters → write ``work/docs/NN``. A global
stage (dedup, perplexity) ends the pass; its own jobs read the pass's documents, and its
dropping block opens the next pass, which reads the same documents with the same sharding (so
the dedup block sees each task's documents in the order the signatures were computed), or the
annotated copies its jobs wrote (the perplexity scores). The last pass writes
``work/docs/final``. Every stage is wrapped to count what it keeps and drops.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

from datatrove.pipeline.filters.base_filter import BaseFilter

from bigpt.curate.audit import AuditedFilter, AuditedStep
from bigpt.curate.documents import documents_reader, documents_writer
from bigpt.curate.recipe import CurationRecipe
from bigpt.curate.stages import STAGES, FilterStage, Job

FINAL_DOCS = "docs/final"


def stage_folder(index: int, name: str) -> str:
    return f"{index:02d}_{name}"


def plan_jobs(recipe: CurationRecipe, work: Path, read_input: Callable, tasks: int) -> list[Job]:
    """The jobs in run order; ``read_input()`` makes a fresh reader of the raw corpus."""
    jobs: list[Job] = []
    read_previous = read_input
    blocks: list = []  # of the pass being built
    passes = 0
    for index, name in enumerate(recipe.stages):
        folder = stage_folder(index, name)
        stage = STAGES[name](recipe.params(name), str(work / "stages" / folder), tasks)
        audit = str(work / "audit" / folder)
        if isinstance(stage, FilterStage):
            blocks.append(AuditedFilter(stage.block, audit, stage.default_reason, recipe.report.excerpts))
            continue
        if blocks:
            docs = f"docs/{passes:02d}"
            jobs.append(_pass(f"{passes:02d}_pass", read_previous(), blocks, work / docs, tasks))
            read_previous, blocks, passes = documents_reader(work / docs), [], passes + 1
        for job in stage.jobs:
            pipeline = [read_previous(), *job.pipeline] if job.reads_previous_pass else job.pipeline
            jobs.append(
                dataclasses.replace(job, name=f"{folder}_{job.name}", pipeline=pipeline, reads_previous_pass=False)
            )
        if stage.documents:
            read_previous = documents_reader(stage.documents)
        audited = AuditedFilter if isinstance(stage.block, BaseFilter) else AuditedStep
        blocks.append(audited(stage.block, audit, stage.reason, recipe.report.excerpts))
    jobs.append(_pass(f"{passes:02d}_pass_final", read_previous(), blocks, work / FINAL_DOCS, tasks))
    return jobs


def _pass(name: str, reader, blocks: list, docs: Path, tasks: int) -> Job:
    return Job(name, [reader, *blocks, documents_writer(docs)], tasks)
