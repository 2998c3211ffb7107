"""tools/preprocess_data.py: output megatron-core reads on its own, bad input, atomic writes."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from bigpt.data import load_tokenizer
from bigpt.data.preprocess import preprocess
from bigpt.errors import EXIT_USER_ERROR, BigptError
from test_data_support import corpus_texts, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def documents(prefix) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def with_bad_line(path: Path, texts: list[str], bad: str, line: int) -> Path:
    write_jsonl(path, texts)
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(line - 1, bad + "\n")
    path.write_text("".join(lines))
    return path


def test_jsonl_becomes_documents_megatron_reads_with_eod_appended(tmp_path, tokenizer_path):
    texts = corpus_texts(40)
    progress = io.StringIO()
    summary = preprocess(
        write_jsonl(tmp_path / "in.jsonl", texts),
        str(tmp_path / "out"),
        tokenizer_path,
        progress=progress,
        progress_interval_s=0,
    )
    tokenizer = load_tokenizer(tokenizer_path)
    expected = [tokenizer.encode(text) + [tokenizer.eod] for text in texts]
    assert documents(tmp_path / "out") == expected
    assert IndexedDataset(str(tmp_path / "out")).index.dtype == numpy.uint16
    assert (summary.documents, summary.tokens) == (40, sum(map(len, expected)))
    assert summary.input_bytes == (tmp_path / "in.jsonl").stat().st_size
    assert "documents/s" in progress.getvalue() and "tokens/s" in progress.getvalue()
    assert "40 documents" in summary.line("out")


def test_worker_processes_write_the_same_dataset(tmp_path, tokenizer_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", corpus_texts(600))  # several chunks
    preprocess(corpus, str(tmp_path / "one"), tokenizer_path, workers=1)
    preprocess(corpus, str(tmp_path / "two"), tokenizer_path, workers=2)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_plain_text_is_one_document_per_line(tmp_path, tokenizer_path):
    (tmp_path / "in.txt").write_text("first document\n\nsecond one\n")
    summary = preprocess(tmp_path / "in.txt", str(tmp_path / "out"), tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    assert [tokenizer.decode(doc[:-1]) for doc in documents(tmp_path / "out")] == ["first document", "second one"]
    assert summary.empty_lines == 1


@pytest.mark.parametrize(
    "bad, problem",
    [
        ('{"text": "unterminated', "not valid JSON"),
        ('{"body": "no text field"}', "not a JSON object with a 'text' field"),
        ('{"text": 42}', "field 'text' is int, not a string"),
        ('["a", "list"]', "not a JSON object with a 'text' field"),
    ],
)
def test_a_bad_jsonl_line_stops_with_its_line_number_and_writes_nothing(tmp_path, tokenizer_path, bad, problem):
    corpus = with_bad_line(tmp_path / "in.jsonl", corpus_texts(5), bad, line=3)
    with pytest.raises(BigptError, match=rf"in\.jsonl:3: {problem}.*--on-bad-line skip"):
        preprocess(corpus, str(tmp_path / "out"), tokenizer_path)
    assert files_in(tmp_path) == ["in.jsonl"]


def test_a_bad_jsonl_line_can_be_skipped_and_is_reported(tmp_path, tokenizer_path):
    corpus = with_bad_line(tmp_path / "in.jsonl", corpus_texts(5), "not json", line=2)
    progress = io.StringIO()
    summary = preprocess(corpus, str(tmp_path / "out"), tokenizer_path, on_bad_line="skip", progress=progress)
    assert (summary.documents, summary.bad_lines) == (5, 1)
    assert "skipping" in progress.getvalue() and "in.jsonl:2: not valid JSON" in progress.getvalue()


def test_a_failed_run_leaves_the_previous_output_untouched(tmp_path, tokenizer_path):
    good = write_jsonl(tmp_path / "good.jsonl", corpus_texts(5))
    preprocess(good, str(tmp_path / "out"), tokenizer_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("out.bin", "out.idx")}
    bad = with_bad_line(tmp_path / "bad.jsonl", corpus_texts(300), "oops", line=290)
    with pytest.raises(BigptError):
        preprocess(bad, str(tmp_path / "out"), tokenizer_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert files_in(tmp_path) == ["bad.jsonl", "good.jsonl", "out.bin", "out.idx"]


def test_input_without_documents_is_refused(tmp_path, tokenizer_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BigptError, match=r"empty\.jsonl is empty"):
        preprocess(tmp_path / "empty.jsonl", str(tmp_path / "out"), tokenizer_path)
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(BigptError, match=r"blank\.jsonl has no documents \(0 bad and 3 empty"):
        preprocess(tmp_path / "blank.jsonl", str(tmp_path / "out"), tokenizer_path)
    assert files_in(tmp_path) == ["blank.jsonl", "empty.jsonl"]


def test_the_cli_reports_a_bad_line_without_a_traceback(tmp_path, tokenizer_path):
    corpus = with_bad_line(tmp_path / "in.jsonl", corpus_texts(5), "{oops", line=4)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_data.py"),
            "--input",
            str(corpus),
            "--output-prefix",
            str(tmp_path / "out"),
            "--tokenizer",
            str(tokenizer_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == EXIT_USER_ERROR
    assert f"bigpt: error: {corpus}:4: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert files_in(tmp_path) == ["in.jsonl"]


STRESS_RUNS = 20


def test_a_bad_line_with_workers_stops_every_time_without_hanging(tmp_path, tokenizer_path):
    """The error path with 2 workers, each sending ~200 KB results (more than a pipe holds) when
    the bad line is found: every run must end with the clear error and leave no worker behind.
    The runs are in a child process so that a hang fails the test (its timeout) instead of
    stalling the suite."""
    texts = [" ".join(corpus_texts(3))] * (6 * 256)  # ~1 KB of tokens each: chunk results of ~250 KB
    corpus = with_bad_line(tmp_path / "in.jsonl", texts, "{not json", 3 * 256 + 10)
    script = f"""
import multiprocessing
from bigpt.data.preprocess import preprocess
from bigpt.errors import BigptError
for run in range({STRESS_RUNS}):
    try:
        preprocess({str(corpus)!r}, {str(tmp_path / "out")!r}, {str(tokenizer_path)!r}, workers=2)
    except BigptError as err:
        assert "in.jsonl:{3 * 256 + 10}:" in str(err), err
    else:
        raise AssertionError("the bad line was not refused")
    assert not multiprocessing.active_children(), multiprocessing.active_children()
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert not list(tmp_path.glob("out*"))
