"""tools/curate.py on a corpus with planted defects: what is removed, what is kept, the report,
determinism, resume after a kill, the hand-off to preprocessing, and every bad input.

The corpus (tests/curate_corpus.py) is generated; each document's id names its class. The main
run uses the shipped recipes/data/astronomy.toml with overrides, 4 input files = 4 tasks.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("datatrove", reason="the curation extra is not installed: pip install -e '.[curate]'")

import slurm_cluster  # noqa: E402
from bigpt.curate import load_curation_recipe  # noqa: E402
from bigpt.curate.run import curate  # noqa: E402
from bigpt.errors import EXIT_USER_ERROR, BigptError  # noqa: E402
from curate_corpus import (  # noqa: E402
    ASTRONOMY_NOUNS,
    COOKING_NOUNS,
    article,
    exact_copy,
    group,
    kind,
    near_copy,
    planted_corpus,
    write_corpus,
)

ROOT = Path(__file__).resolve().parent.parent
ASTRONOMY = ROOT / "recipes/data/astronomy.toml"
# The planted documents are short (~130 words), so two word edits move the 5-gram Jaccard
# similarity to ~0.85; these LSH settings catch that reliably (threshold ~0.55).
SHORT_DOC_MINHASH = ["stage.minhash_dedup.num_buckets=20", "stage.minhash_dedup.hashes_per_bucket=5"]
PLANTED_JUNK = ("boilerplate", "spam", "gibberish", "offtopic")


def overrides(raw: Path, out: Path, *extra: str) -> list[str]:
    return [f"input.path={raw}", f"output.dir={out}", *SHORT_DOC_MINHASH, *extra]


def kept_ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (out / "curated.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    documents = planted_corpus()
    write_corpus(folder / "raw", documents, files=4)
    out = folder / "out"
    result = curate(load_curation_recipe(ASTRONOMY, overrides(folder / "raw", out, "executor.workers=2")))
    return SimpleNamespace(raw=folder / "raw", out=out, documents=documents, report=result.report)


def test_each_planted_defect_is_removed_and_every_clean_document_kept(planted):
    kept = kept_ids(planted.out)
    planted_by_kind = Counter(kind(doc["id"]) for doc in planted.documents)
    kept_by_kind = Counter(kind(doc_id) for doc_id in kept)
    for junk in PLANTED_JUNK:  # recall of the removal, per planted class
        assert planted_by_kind[junk] > 0 and kept_by_kind[junk] == 0, (junk, kept_by_kind)
    # Exact and near copies: exactly one document of each original's group survives.
    copies_per_group = Counter(group(doc_id) for doc_id in kept)
    clean_groups = {group(doc["id"]) for doc in planted.documents if kind(doc["id"]) == "clean"}
    survivors = set(copies_per_group)
    recall_of_clean = len(survivors & clean_groups) / len(clean_groups)
    precision_of_kept = sum(1 for g in survivors if copies_per_group[g] == 1) / len(kept)
    assert (recall_of_clean, precision_of_kept) == (1.0, 1.0), copies_per_group
    assert len(kept) == len(clean_groups) == 48


def test_report_counts_documents_and_words_per_stage_and_rule(planted):
    report = json.loads((planted.out / "report.json").read_text())
    assert report == planted.report
    stages = {stage["stage"]: stage for stage in report["stages"]}
    assert list(stages) == [
        "gopher_repetition",
        "gopher_quality",
        "c4",
        "fineweb_quality",
        "keywords",
        "exact_dedup",
        "minhash_dedup",
    ]
    rules = {
        (name, rule): counts["documents"]
        for name, stage in stages.items()
        for rule, counts in stage["dropped_by_rule"].items()
    }
    assert rules == {
        ("gopher_repetition", "dup_line_frac"): 8,  # the spam pages
        ("gopher_quality", "gopher_short_doc"): 8,  # the boilerplate pages
        ("gopher_quality", "gopher_too_many_hashes"): 8,  # the gibberish
        ("keywords", "no_included_keyword"): 10,  # the cooking articles
        ("exact_dedup", "exact_duplicate"): 10,
        ("minhash_dedup", "near_duplicate"): 10,
    }
    words = {doc["id"]: len(doc["text"].split()) for doc in planted.documents}
    assert report["total"]["in"] == {"documents": 102, "words": sum(words.values())}
    assert report["total"]["kept"]["words"] == sum(words[i] for i in kept_ids(planted.out))
    spam_words = sum(n for doc_id, n in words.items() if kind(doc_id) == "spam")
    assert stages["gopher_repetition"]["dropped_by_rule"]["dup_line_frac"]["words"] == spam_words
    for before, after in zip(report["stages"], report["stages"][1:]):
        assert after["in"] == before["kept"]
        for key in ("documents", "words"):
            assert before["in"][key] == before["kept"][key] + before["dropped"][key]
    histogram = report["length_histogram"]
    assert (sum(histogram["before"]), sum(histogram["after"])) == (102, 48)
    assert (planted.out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curated_output_feeds_preprocess_data(planted, tmp_path):
    from bigpt.data.preprocess import preprocess
    from test_data_support import make_tokenizer

    summary = preprocess(planted.out / "curated.jsonl", str(tmp_path / "curated"), make_tokenizer(tmp_path))
    assert summary.documents == 48 and summary.bad_lines == 0


def test_a_killed_run_resumes_without_redoing_finished_shards_to_the_same_output(planted, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "tools/curate.py", str(ASTRONOMY), *overrides(planted.raw, out, "executor.workers=2")]
    process = subprocess.Popen(
        command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    completions = out / "work/logs/00_pass/completions"
    deadline = time.monotonic() + 120
    while not (completions.is_dir() and any(completions.iterdir())):  # some first-pass shards done
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "curated.jsonl").exists()
    finished = {
        path.name: (out / "work/docs/00" / f"{path.name}.jsonl").stat().st_mtime_ns for path in completions.iterdir()
    }

    # Resume with one worker: how it is executed is not part of the result.
    curate(load_curation_recipe(ASTRONOMY, overrides(planted.raw, out, "executor.workers=1")))
    assert (out / "curated.jsonl").read_bytes() == (planted.out / "curated.jsonl").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report.pop("output") == str(out / "curated.jsonl")
    assert report == {key: value for key, value in planted.report.items() if key != "output"}
    for rank, mtime in finished.items():
        assert (out / "work/docs/00" / f"{rank}.jsonl").stat().st_mtime_ns == mtime, rank


def test_fasttext_classifier_and_language_stages_with_local_models(tmp_path):
    import random

    import fasttext

    rng = random.Random(7)
    astronomy = [article(rng, ASTRONOMY_NOUNS) for _ in range(60)]
    cooking = [article(rng, COOKING_NOUNS) for _ in range(60)]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in astronomy[:40]))
    (tmp_path / "bad.txt").write_text("".join(" ".join(t.split()) + "\n" for t in cooking[:40]))
    result = subprocess.run(
        [
            sys.executable,
            "tools/train_quality_classifier.py",
            "--positive",
            tmp_path / "good.jsonl",
            "--negative",
            tmp_path / "bad.txt",
            "--out",
            tmp_path / "quality.bin",
            "--epochs",
            "50",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "precision 1.000, recall 1.000" in result.stdout
    # A toy language-ID model in lid.176.bin's label format (no download here).
    french_words = (
        "le la les un une des et dans sur sous avec pour chat chien maison rouge vert petit grand mange dort voit aime"
    ).split()
    french = [" ".join(rng.choice(french_words) for _ in range(80)) for _ in range(60)]
    (tmp_path / "lid.txt").write_text(
        "".join(f"__label__en {' '.join(t.split())}\n" for t in astronomy[:40] + cooking[:40])
        + "".join(f"__label__fr {t}\n" for t in french[:40])
    )
    fasttext.train_supervised(
        str(tmp_path / "lid.txt"), epoch=20, lr=0.5, dim=16, bucket=10_000, thread=1, seed=0, verbose=0
    ).save_model(str(tmp_path / "lid.bin"))
    documents = (
        [{"id": f"astronomy-{i}", "text": t} for i, t in enumerate(astronomy[40:])]
        + [{"id": f"cooking-{i}", "text": t} for i, t in enumerate(cooking[40:])]
        + [{"id": f"french-{i}", "text": t} for i, t in enumerate(french[40:])]
    )
    write_corpus(tmp_path / "raw", documents, files=1)
    recipe = tmp_path / "models.toml"
    recipe.write_text(
        f'base = "{ASTRONOMY}"\nstages = ["language", "quality_classifier"]\n'
        '[stage.language]\nmodel = "lid.bin"\n'
        '[stage.quality_classifier]\nmodel = "quality.bin"\n'
    )
    report = curate(
        load_curation_recipe(
            recipe, [f"input.path={tmp_path / 'raw'}", f"output.dir={tmp_path / 'out'}", "report.png=false"]
        )
    ).report
    assert Counter(kind(i) for i in kept_ids(tmp_path / "out")) == {"astronomy": 20}
    dropped = {stage["stage"]: stage["dropped"]["documents"] for stage in report["stages"]}
    assert dropped == {"language": 20, "quality_classifier": 20}


# ------------------------------------------------------------------------------- bad input


def bad_recipe(tmp_path, text: str = "", raw: Path | None = None) -> Path:
    if raw is None:
        raw = tmp_path / "raw"
        write_corpus(raw, planted_corpus()[:5], files=1)
    path = tmp_path / "bad.toml"
    path.write_text(f'base = "{ASTRONOMY}"\n{text}\n[input]\npath = "{raw}"\n[output]\ndir = "{tmp_path / "out"}"\n')
    return path


def refused(path: Path, *extra: str) -> str:
    """The BigptError message; nothing was written."""
    with pytest.raises(BigptError) as info:
        curate(load_curation_recipe(path, extra))
    assert not (path.parent / "out").exists()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unknown_stage_name_suggests_the_right_one(tmp_path):
    message = refused(bad_recipe(tmp_path, 'stages = ["gopher_qualty"]'))
    assert "unknown stage 'gopher_qualty' in stages in" in message and "bad.toml" in message
    assert "did you mean 'gopher_quality'?" in message


def test_out_of_range_threshold_names_the_key(tmp_path):
    message = refused(bad_recipe(tmp_path), "stage.gopher_repetition.dup_line_frac=1.5")
    assert "stage.gopher_repetition.dup_line_frac must be between 0 and 1, got 1.5" in message
    message = refused(bad_recipe(tmp_path, "[stage.gopher_quality]\nmin_doc_wrds = 3"))
    assert "did you mean stage.gopher_quality.min_doc_words?" in message


def test_missing_or_broken_classifier_model_is_refused(tmp_path):
    path = bad_recipe(tmp_path, 'stages = ["quality_classifier"]')
    assert "stage.quality_classifier.model is not set" in refused(path)
    message = refused(path, f"stage.quality_classifier.model={tmp_path / 'none.bin'}")
    assert "none.bin does not exist; train one with tools/train_quality_classifier.py" in message
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    message = refused(path, f"stage.quality_classifier.model={tmp_path / 'junk.bin'}")
    assert "junk.bin is not a fastText model" in message


def test_missing_language_model_is_refused(tmp_path):
    path = bad_recipe(tmp_path, 'stages = ["language"]')
    message = refused(path, f"stage.language.model={tmp_path / 'lid.176.bin'}")
    assert "lid.176.bin does not exist; download a fastText language-ID model" in message


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("a.jsonl", "this is not json\n", "a.jsonl:1 is not JSON"),
        ("a.jsonl", '{"body": "no text field"}\n', "a.jsonl:1 has no string field 'text'"),
        ("a.jsonl.gz", "not gzip at all", "cannot be read as jsonl"),
    ],
)
def test_unreadable_input_is_refused_before_any_work(tmp_path, name, content, expected):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / name).write_text(content)
    assert expected in refused(bad_recipe(tmp_path, raw=raw))


def test_missing_input_and_empty_input_folder_are_refused(tmp_path):
    assert "does not exist" in refused(bad_recipe(tmp_path, raw=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "has no file matching '*.jsonl*'" in refused(bad_recipe(tmp_path, raw=tmp_path / "empty"))


def test_another_recipe_on_the_same_output_is_refused_and_restart_starts_over(tmp_path):
    path = bad_recipe(tmp_path, 'stages = ["length"]')
    curate(load_curation_recipe(path, ["report.png=false"]))
    before = (tmp_path / "out/curated.jsonl").read_bytes()
    with pytest.raises(BigptError, match="holds a curation made with another recipe.*--restart"):
        curate(load_curation_recipe(path, ["report.png=false", "stage.length.min_words=150"]))
    assert (tmp_path / "out/curated.jsonl").read_bytes() == before
    changed = load_curation_recipe(path, ["report.png=false", "stage.length.min_words=150"])
    assert curate(changed, restart=True).report["total"]["kept"]["documents"] < 5


def test_cli_error_is_one_paragraph_with_exit_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "tools/curate.py", bad_recipe(tmp_path), "stage.c4.min_num_sentences=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_USER_ERROR
    assert "Traceback" not in result.stderr
    assert "stage.c4.min_num_sentences must be zero or more, got -1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_slurm_executor_runs_its_chain_of_job_arrays_on_a_real_cluster_to_the_local_result(slurm, tmp_path):
    """executor.kind = "slurm" on the test cluster (tests/slurm_cluster.py): datatrove submits one
    job array per step, each depending on the one before, and the last job writes the report."""
    raw = tmp_path / "raw"
    write_corpus(raw, planted_corpus(clean=6, copies=3, junk=1, offtopic=1), files=2)
    path = tmp_path / "small.toml"
    path.write_text(
        f'base = "{ASTRONOMY}"\nstages = ["length", "exact_dedup"]\n'
        "[stage.length]\nmin_words = 20\n[report]\npng = false\n"
    )
    local = curate(load_curation_recipe(path, [f"input.path={raw}", f"output.dir={tmp_path / 'local'}"]))
    recipe = load_curation_recipe(
        path,
        [
            f"input.path={raw}",
            f"output.dir={tmp_path / 'slurm'}",
            "executor.kind=slurm",
            f"executor.slurm.partition={slurm_cluster.PARTITION}",
            "executor.slurm.mem_per_cpu_gb=1",
            f"executor.slurm.venv_path={Path(sys.executable).parent / 'activate'}",
        ],
    )
    assert curate(recipe).report is None  # submitted; the last job writes the report
    slurm.wait_until_no_jobs(timeout_s=300)

    # Each step is a job array (then a one-task job of datatrove's merging its stats), submitted
    # in order to the partition asked for, and every one completed.
    arrays = [job for job in slurm.jobs() if job["JobName"].startswith("astronomy_") and "ArrayTaskId" in job]
    assert list(dict.fromkeys(job["JobName"] for job in arrays)) == [
        "astronomy_00_pass",
        "astronomy_01_exact_dedup_signatures",
        "astronomy_01_exact_dedup_find",
        "astronomy_01_pass_final",
        "astronomy_finalize",
    ]
    assert {(job["JobState"], job["Partition"]) for job in arrays} == {("COMPLETED", slurm_cluster.PARTITION)}
    assert (tmp_path / "slurm/curated.jsonl").read_bytes() == (tmp_path / "local/curated.jsonl").read_bytes()
    slurm_report = json.loads((tmp_path / "slurm/report.json").read_text())
    assert slurm_report["stages"] == local.report["stages"]


def test_url_and_keyword_selection_rules():
    from datatrove.data import Document

    from bigpt.curate.filters import KeywordFilter, UrlDomainFilter

    urls = UrlDomainFilter(
        include=["example.org"], exclude=["spam.example.org"], url_field="url", keep_without_url=False
    )

    def url_result(url):
        return urls.filter(Document(text="x", id="0", metadata={"url": url} if url else {}))

    assert url_result("https://astro.example.org/a") is True  # a subdomain matches
    assert url_result("https://spam.example.org/a") == (False, "excluded_domain")
    assert url_result("https://example.com/a") == (False, "domain_not_included")
    assert url_result("https://notexample.org/a") == (False, "domain_not_included")
    assert url_result(None) == (False, "no_url")
    words = KeywordFilter(include=["star"], exclude=["casino"], min_hits=2, case_sensitive=False)
    assert words.filter(Document(text="A Star and a star.", id="0")) is True
    assert words.filter(Document(text="A star and a starfish.", id="0")) == (False, "no_included_keyword")
    assert words.filter(Document(text="star star CASINO", id="0")) == (False, "excluded_keyword")


@pytest.mark.parametrize("format", ["text", "parquet"])
def test_text_and_parquet_inputs(tmp_path, format):
    texts = ["one two three four five", "short", "six seven eight nine ten eleven"]
    raw = tmp_path / "raw"
    raw.mkdir()
    if format == "text":
        (raw / "a.txt").write_text("\n".join(texts) + "\n")
    else:
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.table({"body": texts}), raw / "a.parquet")
    path = tmp_path / "small.toml"
    path.write_text(f'base = "{ASTRONOMY}"\nstages = ["length"]\n[stage.length]\nmin_words = 3\n')
    curate(
        load_curation_recipe(
            path,
            [
                f"input.path={raw}",
                f"output.dir={tmp_path / 'out'}",
                f"input.format={format}",
                "input.text_field=body",
                "report.png=false",
            ],
        )
    )
    kept = [json.loads(line)["text"] for line in (tmp_path / "out/curated.jsonl").read_text().splitlines()]
    assert kept == [texts[0], texts[2]]


@pytest.mark.parametrize("tasks", [[], ["executor.tasks=2"]], ids=["a task per file", "2 tasks"])
def test_the_first_copy_in_input_order_survives_across_files(tmp_path, tasks):
    """datatrove alone keeps the copy with the smallest position inside its task's shard (here
    the later files' copies), for exact and for near duplicates; and it deals files to tasks
    round-robin (with 2 tasks, the third file would come before the second)."""
    import random

    rng = random.Random(3)
    texts = [article(rng, ASTRONOMY_NOUNS) for _ in range(6)]
    exact, near, late = texts[3], texts[4], texts[5]
    files = [
        [("a-0", texts[0]), ("a-1", texts[1]), ("a-2", texts[2]), ("exact-first", exact), ("near-first", near)],
        [("exact-second", exact), ("near-second", near_copy(near, rng)), ("late-second", late)],
        [("near-third", near_copy(near, rng)), ("late-third", late), ("exact-third", exact_copy(exact, rng))],
    ]
    raw = tmp_path / "raw"
    raw.mkdir()
    for number, documents in enumerate(files):
        lines = [json.dumps({"id": doc_id, "text": text}) + "\n" for doc_id, text in documents]
        (raw / f"part-{number}.jsonl").write_text("".join(lines))
    path = tmp_path / "dedup.toml"
    path.write_text(f'base = "{ASTRONOMY}"\nstages = ["exact_dedup", "minhash_dedup"]\n[report]\npng = false\n')
    report = curate(load_curation_recipe(path, overrides(raw, tmp_path / "out", *tasks))).report
    assert kept_ids(tmp_path / "out") == ["a-0", "a-1", "a-2", "exact-first", "near-first", "late-second"]
    dropped = {stage["stage"]: stage["dropped"]["documents"] for stage in report["stages"]}
    assert dropped == {"exact_dedup": 3, "minhash_dedup": 2}


# ------------------------------------------------------------------------------- edges


def two_pass_recipe(tmp_path, raw: Path, *extra: str):
    """Length filter, then exact dedup: the second pass reads what the first one kept."""
    path = tmp_path / "edges.toml"
    path.write_text(f'base = "{ASTRONOMY}"\nstages = ["length", "exact_dedup"]\n[report]\npng = false\n')
    return load_curation_recipe(path, [f"input.path={raw}", f"output.dir={tmp_path / 'out'}", *extra])


@pytest.mark.parametrize(
    "content, extra, skipped",
    [
        ("", [], {}),  # an empty file
        ("\n  \n\n", [], {"blank_line": 3}),  # blank lines only
        ('{"text": "too short"}\n' * 3, ["stage.length.min_words=5"], {}),  # every document dropped
    ],
)
def test_nothing_to_keep_gives_an_empty_result_with_a_report(tmp_path, content, extra, skipped):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(content)
    report = curate(two_pass_recipe(tmp_path, raw, *extra)).report
    assert (tmp_path / "out/curated.jsonl").read_text() == ""
    assert report["total"]["kept"]["documents"] == 0
    assert report["read"] == {"documents": content.count("too short"), "skipped_lines": skipped}


def test_malformed_lines_are_counted_in_the_report(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = [json.dumps({"id": f"good-{i}", "text": f"document number {i} is fine"}) for i in range(3)]
    (raw / "a.jsonl").write_text(
        "\n".join([good[0], "{not json", good[1], "", '{"body": "no text"}', '{"text": ""}', good[2], "[1, 2]"]) + "\n"
    )
    report = curate(two_pass_recipe(tmp_path, raw)).report
    assert kept_ids(tmp_path / "out") == ["good-0", "good-1", "good-2"]
    assert report["read"] == {"documents": 3, "skipped_lines": {"blank_line": 1, "no_text": 3, "not_json": 1}}


def test_slurm_without_sbatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    message = refused(bad_recipe(tmp_path), "executor.kind=slurm", "executor.slurm.partition=cpu")
    assert 'executor.kind = "slurm" but there is no sbatch command' in message


@pytest.mark.slow
def test_ray_executor_gives_the_local_result_on_a_local_ray_instance(tmp_path, monkeypatch):
    """executor.kind = "ray" on a Ray instance this test starts: the local executor's output and
    report byte for byte (exact dedup over two tasks: the first copy in input order survives on
    Ray too); refused in one paragraph, before any work, without ray or without a cluster."""
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
    raw = tmp_path / "raw"
    write_corpus(raw, planted_corpus(), files=2)
    path = bad_recipe(tmp_path, 'stages = ["exact_dedup"]\n[report]\npng = false', raw)
    ray = ["executor.kind=ray", "executor.ray.mem_per_cpu_gb=0"]
    assert "is not a reachable Ray head node" in refused(path, *ray, "executor.ray.address=127.0.0.1:1")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "ray", None)
        assert "pip install -e '.[ray]'" in refused(path, *ray)
    results = {}
    for executor, extra in (("local", []), ("ray", [*ray, "executor.ray.address=local"])):
        out = tmp_path / executor
        report = curate(load_curation_recipe(path, [f"output.dir={out}", "executor.workers=2", *extra])).report
        results[executor] = (out / "curated.jsonl").read_bytes(), {**report, "output": None}
    assert results["ray"] == results["local"]
    assert results["local"][1]["stages"][0]["dropped_by_rule"]["exact_duplicate"]["documents"] > 0


def start_curation(planted, out: Path, **popen):
    command = [sys.executable, "tools/curate.py", str(ASTRONOMY), *overrides(planted.raw, out, "executor.workers=2")]
    return subprocess.Popen(command, cwd=ROOT, start_new_session=True, text=True, **popen)


def wait_for_workers(process) -> list:
    """The processes datatrove forked (a pool's workers and its manager), once there are some."""
    import psutil

    deadline = time.monotonic() + 120
    while len(children := psutil.Process(process.pid).children(recursive=True)) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "no worker pool started"
        time.sleep(0.02)
    return children


def test_ctrl_c_says_how_to_resume_without_tracebacks(planted, tmp_path):
    process = start_curation(planted, tmp_path / "out", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_workers(process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "bigpt: interrupted; run the same command again to resume (finished shards are kept)."
    )


def test_killing_the_main_process_ends_its_workers(planted, tmp_path):
    import psutil

    process = start_curation(planted, tmp_path / "out", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = wait_for_workers(process)
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=60)
    for child in alive:
        child.kill()
    assert not alive, [child.cmdline() for child in alive]


def test_explain_mode_quotes_what_each_rule_drops_quietly(planted, tmp_path):
    """--sample N runs the stages on the first N documents only, into OUTPUT/explain/; datatrove's
    log lines stay out of the terminal."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "tools/curate.py", str(ASTRONOMY), *overrides(planted.raw, out), "--sample", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json.loads((out / "explain/report.json").read_text())
    assert report["total"]["in"]["documents"] == 40
    for stage in report["stages"]:
        dropping = {rule for rule, counts in stage["dropped_by_rule"].items() if counts["documents"]}
        assert set(stage["excerpts"]) == dropping
        for rule, excerpts in stage["excerpts"].items():
            assert 0 < len(excerpts) <= min(3, stage["dropped_by_rule"][rule]["documents"])
            for excerpt in excerpts:
                assert f"{excerpt['id']} ({excerpt['words']:,} words): {excerpt['text'][:100]}" in result.stdout
    assert "gopher_short_doc: " in result.stdout and "boilerplate-" in result.stdout
    assert not (out / "curated.jsonl").exists() and not (out / "work").exists()


# ------------------------------------------------------------------------------- rule fixes

WRAPPED_MANUAL = """The open() call returns a file object (see io.open), e.g. f = open(path, "rb");
its mode defaults to "r", and -1 means the default buffer size [see below].  When the file
cannot be opened, an OSError is raised (errno, strerror) to the caller of the function.

Text read from the file is decoded with the locale's encoding, unless encoding= is given; in
binary mode, bytes are returned as they are, with no decoding and no newline translation at
all.  The file is closed by close(), or when the object is collected by the runtime again.
Home
About us
Contact"""


def test_word_rules_count_words_not_punctuation_and_wrapped_lines_are_read_as_paragraphs():
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter

    from bigpt.curate import stages
    from bigpt.curate.recipe import C4Stage, FineWebQualityStage, GopherQualityStage, GopherRepetitionStage

    def verdict(block, text=WRAPPED_MANUAL):
        doc = Document(text=text, id="0")
        return block.filter(doc), doc.text

    # datatrove counts "(", "," and "." as words: under 80% alphabetic "words"; Gopher's words pass
    assert verdict(GopherQualityFilter(min_doc_words=10))[0] == (False, "gopher_below_alpha_threshold")
    assert verdict(stages.gopher_quality(GopherQualityStage(min_doc_words=10), "", 1).block)[0] is True
    assert verdict(stages.gopher_repetition(GopherRepetitionStage(), "", 1).block)[0] is True
    # C4 keeps only lines ending a sentence: datatrove keeps 2 of 6 wrapped lines, too few sentences
    assert verdict(C4QualityFilter(min_num_sentences=4))[0] == (False, "too_few_sentences")
    kept, text = verdict(stages.c4(C4Stage(min_num_sentences=4), "", 1).block)
    # the wrapped lines kept as they were; the blank line and the menu removed (C4's own rules)
    assert kept is True and text == WRAPPED_MANUAL.rsplit("\nHome", 1)[0].replace("\n\n", "\n")
    # FineWeb wants 12% of lines to end in punctuation: one paragraph wrapped over 12 lines has 8%
    paragraph = textwrap.fill(" ".join(f"the file object number {n} is read and decoded" for n in range(20)), 72) + "."
    for wrap_length, expected in ((0, (False, "line_punct_ratio")), (40, True)):
        fineweb = stages.fineweb_quality(FineWebQualityStage(wrap_length=wrap_length), "", 1).block
        assert verdict(fineweb, paragraph)[0] == expected


def test_one_jsonl_file_is_split_over_the_tasks_in_input_order(tmp_path):
    """Every task gets lines of the one file (datatrove gives a whole file to one task), the
    output keeps input order and ids (FILE/LINE for lines without an id), whatever the tasks."""
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps({"text": f"document {n} " + "word " * (n % 7)}) for n in range(40)]
    lines[13] = "{broken"
    (raw / "big.jsonl").write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    path = tmp_path / "split.toml"
    path.write_text(f'base = "{ASTRONOMY}"\nstages = ["length"]\n[report]\npng = false\n')
    kept = {}
    for tasks, executor in ((1, "executor.tasks=1"), (3, "executor.workers=3")):  # default: a task a worker
        out = tmp_path / f"out{tasks}"
        report = curate(load_curation_recipe(path, [f"input.path={raw}", f"output.dir={out}", executor])).report
        assert report["read"] == {"documents": 39, "skipped_lines": {"blank_line": 1, "not_json": 1}}
        kept[tasks] = kept_ids(out)
        per_task = [json.loads(p.read_text())["in"][0] for p in sorted((out / "work/audit/00_length").glob("*.json"))]
        assert len(per_task) == tasks and min(per_task) > 10
    assert kept[3] == kept[1]
    assert kept[1][:3] == ["big.jsonl/0", "big.jsonl/1", "big.jsonl/2"] and kept[1][-1] == "big.jsonl/40"
    # the same curation with fewer workers keeps the task count it was started with: not refused
    again = [f"input.path={raw}", f"output.dir={tmp_path / 'out3'}", "executor.workers=1"]
    assert curate(load_curation_recipe(path, again)).report == report


def test_layout_lines_closing_marks_and_capitals_do_not_drop_prose():
    """Table rules repeat but are no repeated content, a sentence ends inside a bracket or a box
    frame or introduces a table with a colon, and a warranty in capitals has its stop words;
    datatrove's rules dropped each."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    from bigpt.curate import stages
    from bigpt.curate.recipe import C4Stage, FineWebQualityStage, GopherQualityStage, GopherRepetitionStage

    rule = "+" + "-" * 30 + "+" + "-" * 40 + "+"
    rows = [
        f"| {name:<28} | {meaning:<38} |"
        for name, meaning in (
            ("x[index]", "Subscription of a sequence"),
            ("x.attribute", "Attribute reference"),
            ("await x", "Await expression"),
            ("-x, +x", "Negative, positive"),
            ("x ** y", "Exponentiation"),
        )
    ]
    table = (
        "The table lists the operators of the language. They go from the highest precedence to the lowest:\n\n"
        + "\n".join(line for row in rows for line in (rule, row))
        + "\n"
        + rule
    )
    boxed = "\n".join(f"*  {line:<68}*" for line in textwrap.wrap(WRAPPED_MANUAL.split("\n\n")[0], 66))
    boxed = f"{'*' * 72}\n{boxed}\n{'*' * 72}"
    capitals = " ".join(
        [
            "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, AND THE AUTHORS "
            "SHALL NOT BE LIABLE FOR ANY CLAIM OR DAMAGES ARISING FROM ITS USE."
        ]
        * 2
    )

    def kept(block, text):
        return block.filter(Document(text=text, id="0"))

    repetition = stages.gopher_repetition(GopherRepetitionStage(), "", 1).block
    assert kept(GopherRepetitionFilter(), table) == (False, "dup_line_frac")
    assert kept(repetition, table) is True
    fineweb = stages.fineweb_quality(FineWebQualityStage(char_duplicates_ratio=0.1), "", 1).block
    assert kept(FineWebQualityFilter(char_duplicates_ratio=0.1), boxed) == (False, "line_punct_ratio")
    assert kept(fineweb, boxed) is True
    c4 = stages.c4(C4Stage(min_num_sentences=2), "", 1).block
    assert kept(c4, boxed) is True and kept(c4, boxed.replace(".", ";")) == (False, "too_few_sentences")
    assert kept(C4QualityFilter(min_num_sentences=2), table) == (False, "too_few_sentences")
    assert kept(c4, table) is True
    assert kept(GopherQualityFilter(min_doc_words=10), capitals) == (False, "gopher_enough_stop_words")
    assert kept(stages.gopher_quality(GopherQualityStage(min_doc_words=10), "", 1).block, capitals) is True


API_REFERENCE = """Worker objects run a callable in a separate thread of control and report its result.

Return whether this worker is a daemon. A daemon worker does not keep the program alive.

This method is deprecated, use the daemon attribute instead.

Set whether this worker is a daemon. It must be set before the worker is started.

This method is deprecated, use the daemon attribute instead.

Return the name of this worker, a string used for identification only.

This method is deprecated, use the name attribute instead.

Set the name of this worker. Several workers may be given the same name.

This method is deprecated, use the name attribute instead.

Wait until the worker terminates, or until the optional timeout occurs. When the timeout
argument is present, it should be a number of seconds; join() always returns None, so call
is_alive() afterwards to decide whether a timeout happened."""


def test_web_quality_keeps_an_api_reference_that_repeats_a_note_per_method_and_drops_a_template_used_twice():
    """The repetition shares web_quality.toml calibrates (Gopher's times 1.5) sit between the two:
    Gopher's own drop the reference page, and the sales template is dropped either way."""
    from datatrove.data import Document

    from bigpt.curate import stages
    from bigpt.curate.recipe import GopherRepetitionStage

    recipe = load_curation_recipe(ROOT / "recipes/data/web_quality.toml")
    sales = "\n\n".join(
        f"Looking for the best {w}? Our store has the largest selection of {w} and {v} with free shipping to "
        f"your door. Buy {w} online today and save up to {p}% on all {v}. We are the number one choice for "
        f"{w} in your area, with thousands of happy customers."
        for w, v, p in (("lanterns", "candles", 30), ("blankets", "pillows", 45))
    )
    gopher = stages.gopher_repetition(GopherRepetitionStage(), "", 1).block
    assert gopher.filter(Document(text=API_REFERENCE, id="0")) == (False, "duplicated_9_n_grams")
    assert stages.first_drop(recipe, API_REFERENCE) == ""
    assert stages.first_drop(recipe, sales) == "gopher_repetition:duplicated_6_n_grams"


# --- inputs as they come (issue 25 part 8) -----------------------------------------------------


def compressed(path: Path, data: bytes) -> Path:
    """``data`` compressed by ``path``'s suffix, written there."""
    import bz2
    import gzip
    import lzma

    import zstandard

    compress = {
        ".gz": gzip.compress,
        ".bz2": bz2.compress,
        ".xz": lzma.compress,
        ".zst": lambda data: b"".join(zstandard.ZstdCompressor().compress(part) for part in (data[:99], data[99:])),
    }[path.suffix]
    path.write_bytes(compress(data))
    return path


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".bz2", ".xz"])
def test_a_compressed_input_cut_short_stops_the_run_naming_it(tmp_path, suffix):
    """Whole, every compression reads back (a zstd file of two frames too); cut short, the reader
    raises InputCutShort (its one paragraph, said by run_local), not an EOFError's traceback, and
    zstd, whose reader just stops, is caught too."""
    from bigpt.curate.filters import CountingJsonlReader
    from bigpt.curate.inputs import InputCutShort

    lines = b"".join(b'{"text": "document %d about stars and planets"}\n' % i for i in range(2000))
    whole = compressed(tmp_path / f"whole.jsonl{suffix}", lines)
    data = whole.read_bytes()
    (tmp_path / f"cut.jsonl{suffix}").write_bytes(data[: len(data) // 2])

    def read(name: str) -> list:
        reader = CountingJsonlReader(str(tmp_path), str(tmp_path / "skipped"), [name])
        return list(reader.run())

    assert len(read(whole.name)) == 2000
    with pytest.raises(InputCutShort) as cut:
        read(f"cut.jsonl{suffix}")
    message = str(cut.value.refusal())
    assert f"input file {tmp_path}/cut.jsonl{suffix} is cut short" in message and "Fetch the file again" in message


def test_a_bad_byte_on_the_first_line_is_skipped_as_anywhere_else(tmp_path):
    """docs/data.md: lines that are not UTF-8 are skipped and counted (not_utf8); the check before
    the run reads the first line with text, as the run does, instead of refusing the file."""
    from bigpt.curate.filters import CountingJsonlReader
    from bigpt.curate.inputs import input_files
    from bigpt.curate.recipe import InputConfig

    raw = tmp_path / "raw"
    raw.mkdir()
    lines = b'{"text": "caf\xe9 latin-1"}\n\n{"text": "fine"}\n'
    (raw / "a.jsonl").write_bytes(lines)
    compressed(raw / "b.jsonl.gz", lines)
    assert len(input_files(InputConfig(path=str(raw)))) == 2
    reader = CountingJsonlReader(str(raw), str(tmp_path / "skipped"), ["a.jsonl", "b.jsonl.gz"])
    assert [document.text for document in reader.run()] == ["fine", "fine"]
    assert json.loads((tmp_path / "skipped/00000.json").read_text()) == {"blank_line": 2, "not_utf8": 2}


@pytest.mark.parametrize("where", ["input folder", "inside it"])
def test_an_output_folder_in_the_input_folder_is_refused(tmp_path, where):
    raw = tmp_path / "raw"
    write_corpus(raw, planted_corpus()[:5], files=1)
    out = raw if where == "input folder" else raw / "curated"
    with pytest.raises(BigptError, match=f"output.dir = {out} is {'the input folder' if out == raw else 'inside'}"):
        curate(load_curation_recipe(bad_recipe(tmp_path, raw=raw), [f"output.dir={out}"]))
    assert sorted(p.name for p in raw.rglob("*")) == sorted(p.name for p in raw.glob("*.jsonl"))


def test_an_input_among_the_files_a_run_rewrites_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "work").mkdir(parents=True)
    write_corpus(out / "work", planted_corpus()[:5], files=1)
    (out / "curated.jsonl").write_text((next((out / "work").glob("*.jsonl"))).read_text())
    for source in (out / "work", out / "curated.jsonl"):
        with pytest.raises(BigptError, match="is among what output.dir = .* holds for the curation itself"):
            curate(load_curation_recipe(bad_recipe(tmp_path, raw=source)), restart=True)
        assert source.exists()


def test_a_record_cut_short_by_a_failed_run_is_named_and_restart_starts_over(tmp_path):
    """A run stopped while it recorded its fingerprint: the next run says so (no JSON traceback)
    and --restart starts over."""
    path = bad_recipe(tmp_path, 'stages = ["length"]')
    (tmp_path / "out/work").mkdir(parents=True)
    (tmp_path / "out/work/fingerprint.json").write_text('{"recipe": {"na')
    with pytest.raises(BigptError, match="fingerprint.json cannot be read .* re-run with --restart"):
        curate(load_curation_recipe(path, ["report.png=false"]))
    assert (
        curate(load_curation_recipe(path, ["report.png=false"]), restart=True).report["total"]["in"]["documents"] == 5
    )


def test_a_full_disk_in_a_worker_names_the_output_and_how_to_resume(tmp_path, monkeypatch):
    import errno

    from datatrove.executor import LocalPipelineExecutor

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(LocalPipelineExecutor, "run", full)
    with pytest.raises(BigptError, match=r"output.dir = .*/out: a worker's write failed: No space left on device"):
        curate(load_curation_recipe(bad_recipe(tmp_path, 'stages = ["length"]'), ["report.png=false"]))
