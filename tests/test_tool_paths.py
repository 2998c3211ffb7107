"""Every tool and launcher, given a path it cannot use: one paragraph naming the argument (exit 2),
never a traceback, and "is a directory" when it is one. Also tools/logits.py's token checks and a
rendezvous port already in use."""

import argparse
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bigpt.errors import EXIT_USER_ERROR, BigptError
from launchers.slurm import main as slurm_main
from tools.convert_hf import main as convert_main
from tools.curate import main as curate_main
from tools.logits import main as logits_main
from tools.logits import read_tokens
from tools.plan import main as plan_main
from tools.prepare_demo import main as prepare_demo_main
from tools.preprocess_data import main as preprocess_main
from tools.train_quality_classifier import main as classifier_main
from tools.train_tokenizer import main as tokenizer_main

ROOT = Path(__file__).resolve().parent.parent
MOCK = ROOT / "tests/recipes/mock_tiny.toml"
LONG = "x" * 300
WRITERS = (
    "preprocess_data",
    "train_tokenizer",
    "convert_hf",
    "prepare_demo",
    "train_quality_classifier",
    "logits",
    "ladder",
)


@pytest.fixture
def places(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("mine")
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello world"}\n')
    return tmp_path


CASES = {
    "preprocess input is a directory": (
        preprocess_main,
        "--input {dir} --output-prefix {t}/out --tokenizer {file}",
        "input {dir} is a directory, not a file",
    ),
    "preprocess tokenizer is a directory": (
        preprocess_main,
        "--input {corpus} --output-prefix {t}/out --tokenizer {dir}",
        "tokenizer file {dir} is a directory, not a file",
    ),
    "preprocess output under a file": (
        preprocess_main,
        "--input {corpus} --output-prefix {file}/out --tokenizer {file}",
        "{file} is a file, not a directory",
    ),
    "tokenizer input is a directory": (
        tokenizer_main,
        "--input {dir} --vocab-size 100 --output-prefix {t}/tok",
        "input {dir} is a directory, not a file",
    ),
    "tokenizer output under a missing parent under a file": (
        tokenizer_main,
        "--input {corpus} --vocab-size 100 --output-prefix {file}/a/tok",
        "{file} is a file, not a directory",
    ),
    "tokenizer output name too long": (
        tokenizer_main,
        "--input {corpus} --vocab-size 100 --output-prefix {t}/" + LONG,
        "bytes the filesystem allows",
    ),
    "classifier output is a directory": (
        classifier_main,
        "--positive {corpus} --negative {corpus} --out {dir}",
        "--out = {dir} is a directory; name a file to write",
    ),
    "classifier example is a directory": (
        classifier_main,
        "--positive {dir} --negative {corpus} --out {t}/q.bin",
        "example file {dir} is a directory, not a file",
    ),
    "export under a file": (convert_main, "export {dir} {file}/hf", "{file} is a file, not a directory"),
    "export into a file": (convert_main, "export {dir} {file}", "{file} exists (a file)"),
    "recipe is a directory": (plan_main, "{dir} --gpus 8", "recipe file {dir} is a directory, not a file"),
    "demo data under a file": (
        prepare_demo_main,
        "--out {file}/demo",
        "--out = {file}/demo cannot be created: {file} is a file",
    ),
    "demo data name too long": (prepare_demo_main, "--out {t}/" + LONG, "bytes the filesystem allows"),
    "curation output under a file": (
        curate_main,
        str(ROOT / "recipes/data/web_quality.toml") + " input.path={corpus} output.dir={file}/curated",
        "output.dir = {file}/curated cannot be created: {file} is a file",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_path_a_tool_cannot_use_is_named(places, capsys, case):
    main, argv, message = CASES[case]
    names = dict(t=places, dir=places / "dir", file=places / "file", corpus=places / "corpus.jsonl")
    assert main(argv.format(**names).split()) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "bigpt: error: " in err and message.format(**names) in err and "Traceback" not in err
    assert (places / "file").read_text() == "mine" and not any((places / "dir").iterdir())


# Each program's output where a user's file already is: "{t}/..." names the file, with "mine" in it.
FOREIGN_OUTPUTS = {
    "preprocess .bin": (preprocess_main, "--input {corpus} --output-prefix {t}/out --tokenizer {file}", "out.bin"),
    "preprocess .idx": (preprocess_main, "--input {corpus} --output-prefix {t}/out --tokenizer {file}", "out.idx"),
    "tokenizer .model": (tokenizer_main, "--input {corpus} --vocab-size 100 --output-prefix {t}/tok", "tok.model"),
    "tokenizer .vocab": (tokenizer_main, "--input {corpus} --vocab-size 100 --output-prefix {t}/tok", "tok.vocab"),
    "classifier --out": (classifier_main, "--positive {corpus} --negative {corpus} --out {t}/q.bin", "q.bin"),
    "logits --out": (logits_main, f"{MOCK} --tokens {{tokens}} --out {{t}}/l.npy", "l.npy"),
    "export OUT": (convert_main, "export {dir} {t}/hf", "hf"),
    "demo tokenizer.vocab": (prepare_demo_main, "--out {t}", "tokenizer.vocab"),  # beside demo.jsonl
    "slurm -o": (
        slurm_main,
        f"{MOCK} run_dir={{t}}/run --nodes 1 --workers-per-node 1 -o {{t}}/job.sbatch",
        "job.sbatch",
    ),
}


@pytest.mark.parametrize("case", FOREIGN_OUTPUTS)
def test_an_output_bigpt_did_not_write_is_refused_naming_overwrite(places, capsys, case):
    main, argv, name = FOREIGN_OUTPUTS[case]
    (places / name).write_text("mine")
    (places / "demo.jsonl").write_text('{"text": "a corpus prepare_demo already wrote"}\n')
    np.save(places / "tokens.npy", np.array([[1, 2]]))
    names = dict(t=places, dir=places / "dir", file=places / "file", corpus=places / "corpus.jsonl")
    assert main(argv.format(**names, tokens=places / "tokens.npy").split()) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{places / name} exists" in err and "--overwrite" in err
    assert (places / name).read_text() == "mine"


def test_overwrite_replaces_and_bigpt_replaces_its_own_without_it(tmp_path, capsys):
    job = tmp_path / "job.sbatch"
    argv = [str(MOCK), f"run_dir={tmp_path / 'run'}", "--nodes", "1", "--workers-per-node", "1", "-o", str(job)]
    job.write_text("mine")
    assert slurm_main([*argv, "--overwrite"]) == 0
    assert "#SBATCH --nodes=1" in job.read_text()
    assert slurm_main([*argv, "--job-name", "again"]) == 0  # its own script: no flag needed
    assert "#SBATCH --job-name=again" in job.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.sbatch", "run"]  # no temporary file left


def test_preprocess_overwrite_replaces_a_users_file(tmp_path, tokenizer_path):
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "out.bin").write_text("mine")
    argv = f"--input {tmp_path / 'corpus.jsonl'} --output-prefix {tmp_path / 'out'} --tokenizer {tokenizer_path}"
    assert preprocess_main(argv.split()) == EXIT_USER_ERROR
    assert preprocess_main([*argv.split(), "--overwrite"]) == 0
    assert (tmp_path / "out.bin").read_bytes() != b"mine" and (tmp_path / "out.idx").is_file()


@pytest.mark.parametrize("program", ["launchers/run.py", "launchers/slurm.py", *(f"tools/{t}.py" for t in WRITERS)])
def test_every_writing_program_offers_the_same_overwrite_flag(program):
    import importlib

    parser = importlib.import_module(program.removesuffix(".py").replace("/", ".")).parser
    subcommands = [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    for each in subcommands or [parser]:
        assert "--overwrite" in each.format_help(), each.prog


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    from bigpt.paths import write_atomically

    path = tmp_path / "out.json"
    path.write_text("old and whole")

    def half_then_full_disk(f):
        f.write("half of the new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(BigptError, match=r"writing --out = .*out.json failed: No space left on device"):
        write_atomically(path, half_then_full_disk, key="--out")
    assert path.read_text() == "old and whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize(
    "tokens, message",
    [
        (np.array([[1, 2, 512]]), "token ids from 1 to 512, outside 0..511 (model.vocab_size = 512)"),
        (np.array([[-1, 2]]), "token ids from -1 to 2, outside 0..511"),
        (np.array([1, 2, 3]), "shape (3,); it must be a non-empty [batch, seq] array of integer token ids"),
        (np.zeros((1, 2, 3), dtype=np.int64), "shape (1, 2, 3)"),
        (np.array([[0.5, 1.0]]), "a float64 array"),
    ],
)
def test_logits_refuses_tokens_the_model_cannot_take(tmp_path, tokens, message):
    np.save(tmp_path / "t.npy", tokens)
    with pytest.raises(BigptError, match="--tokens = .*t.npy holds ") as info:
        read_tokens(str(tmp_path / "t.npy"), 512)
    assert message in str(info.value)


def test_logits_names_a_tokens_file_that_is_not_one(tmp_path):
    with pytest.raises(BigptError, match="--tokens = .* is a directory, not a file"):
        read_tokens(str(tmp_path), 512)
    (tmp_path / "t.npy").write_text("not numpy")
    with pytest.raises(BigptError, match="is not a .npy array"):
        read_tokens(str(tmp_path / "t.npy"), 512)


def test_logits_help_names_the_recipe_tables_it_uses():
    result = subprocess.run([sys.executable, "tools/logits.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "only its [model] and [init]" in " ".join(result.stdout.split())


def test_a_rendezvous_port_in_use_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "launchers/run.py", str(MOCK), f"run_dir={tmp_path}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
        )
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "MASTER_PORT" in result.stderr and "--master_port" in result.stderr


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB filesystem (tmpfs) to fill: needs root and mount; skipped where it cannot be made."""
    place = tmp_path / "small"
    place.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(place)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (and a mount this sandbox allows)")
    yield place
    subprocess.run(["umount", str(place)], check=True)


def test_a_full_disk_is_named_and_nothing_is_left_behind(full_disk, small_tokenizer, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"w{i % 99 + 1}\n" for i in range(50_000)))  # 50,000 documents
    checkpoint = ROOT / "tests" / "fixtures" / "mcore_0_16_1" / "iter_0000004"
    for main, argv, key in (
        (
            preprocess_main,
            ["--input", str(corpus), "--output-prefix", str(full_disk / "data"), "--tokenizer", str(small_tokenizer)],
            "the output prefix",
        ),
        (convert_main, ["export", str(checkpoint), str(full_disk / "hf")], "the export's OUT"),
    ):
        assert main(argv) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert f"writing {key} = {full_disk}" in err and "No space left on device" in err and "Traceback" not in err
        assert list(full_disk.iterdir()) == []  # partial output removed
