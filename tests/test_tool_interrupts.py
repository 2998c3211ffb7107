"""Ctrl-C, SIGTERM and a full disk in every tool (issue 25 part 5): each is injected in-process at
the tool's write; the tool ends with one line (exit 130, 143 for SIGTERM) or one paragraph naming
what it was writing (a full disk, exit 2), without a traceback, and leaves nothing half written:
no temporary or partial file, no half directory, and an earlier output (replaced on purpose with
--overwrite) whole."""

import errno
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from bigpt.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR
from tools.convert_hf import main as convert_main
from tools.logits import main as logits_main
from tools.prepare_demo import main as prepare_demo_main
from tools.preprocess_data import main as preprocess_main
from tools.train_tokenizer import main as tokenizer_main

ROOT = Path(__file__).resolve().parent.parent
MOCK = ROOT / "tests/recipes/mock_tiny.toml"
FULL_DISK = os.strerror(errno.ENOSPC)
EXPECTED = {  # what stops the tool -> (exit code, what its last line says)
    "ctrl-c": (EXIT_INTERRUPTED, "interrupted (Ctrl-C); the output being written was removed"),
    "sigterm": (128 + signal.SIGTERM, "stopped by SIGTERM; the output being written was removed"),
    "full disk": (EXIT_USER_ERROR, FULL_DISK),
}
STOPS = tuple(EXPECTED)


def stop(how: str) -> None:
    """What a user or the system does to a tool midway."""
    if how == "ctrl-c":
        raise KeyboardInterrupt
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once, in this thread
        raise AssertionError("SIGTERM did not stop the tool")
    raise OSError(errno.ENOSPC, FULL_DISK)


def stopping_after(calls: int, how: str, function):
    """``function``, but the ``calls``-th call stops the tool (``stop``) instead."""
    count = 0

    def wrapped(*args, **kwargs):
        nonlocal count
        count += 1
        if count == calls:
            stop(how)
        return function(*args, **kwargs)

    return wrapped


def half_written(how: str, write):
    """``write(path_or_file, data)`` that writes a little of its output, then is stopped."""

    def wrapped(target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(b"half" if "b" in getattr(target, "mode", "b") else "half")
        else:
            Path(target).write_bytes(b"half")
        stop(how)

    return wrapped


def check_ended(capsys, code: int, how: str, *named: str) -> str:
    expected_code, says = EXPECTED[how]
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert says in err and "Traceback" not in err, err
    if how == "full disk":
        assert all(name in err for name in named), err
    else:
        assert len(err.strip().splitlines()) == 1, err
    return err


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(f'{{"text": "document {i} says hello to the world"}}\n' for i in range(600)))
    return path


@pytest.mark.parametrize("how", STOPS)
def test_preprocess(tmp_path, corpus, tokenizer_path, capsys, monkeypatch, how):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out = tmp_path / "out"
    out.mkdir()
    (out / "data.bin").write_bytes(b"earlier")
    (out / "data.idx").write_bytes(b"earlier index")
    before = listing(out)
    monkeypatch.setattr(
        IndexedDatasetBuilder, "add_document", stopping_after(300, how, IndexedDatasetBuilder.add_document)
    )
    argv = f"--input {corpus} --tokenizer {tokenizer_path} --output-prefix {out}/data --overwrite".split()
    check_ended(capsys, preprocess_main(argv), how, f"{out}/data")
    assert listing(out) == before


@pytest.mark.parametrize("how", STOPS)
def test_train_tokenizer(tmp_path, corpus, capsys, monkeypatch, how):
    import bigpt.data.tokenizer_training as training

    (tmp_path / "tok.model").write_bytes(b"earlier model")
    (tmp_path / "tok.vocab").write_text("earlier vocab")
    before = listing(tmp_path)
    if how == "full disk":  # the second file written: the first is complete, and must not replace its old one
        monkeypatch.setattr(Path, "write_text", half_written(how, Path.write_text))
    else:  # SentencePiece is reading the corpus (it reports an exception there as its own RuntimeError)
        monkeypatch.setattr(training, "document_text", stopping_after(100, how, training.document_text))
    argv = f"--input {corpus} --vocab-size 300 --output-prefix {tmp_path}/tok --overwrite".split()
    check_ended(capsys, tokenizer_main(argv), how, f"{tmp_path}/tok.vocab", "--output-prefix")
    assert listing(tmp_path) == before


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from bigpt.hf.convert import import_hf
    from bigpt.runtime.distributed import process_group_of_one
    from test_hf import SHAPES, save_model

    root = tmp_path_factory.mktemp("hf")
    model = save_model(root / "model", 0, SHAPES["mha_untied"])
    with process_group_of_one():
        import_hf(model, root / "imported")
    return model, root / "imported"


@pytest.mark.parametrize("how", STOPS)
def test_hf_import(tmp_path, hf_model, capsys, monkeypatch, how):
    from bigpt.hf.files import SafetensorsWeights

    monkeypatch.setattr(SafetensorsWeights, "get", stopping_after(5, how, SafetensorsWeights.get))
    shutil.copytree(hf_model[1], tmp_path / "out")  # an earlier import, replaced without --overwrite
    before = listing(tmp_path)
    check_ended(capsys, convert_main(["import", str(hf_model[0]), str(tmp_path / "out")]), how, "OUT", "out")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", STOPS)
def test_hf_export(tmp_path, hf_model, capsys, monkeypatch, how):
    import bigpt.hf.files as files

    if how == "full disk":
        monkeypatch.setattr(files, "_write_safetensors", half_written(how, files._write_safetensors))
    else:
        monkeypatch.setattr(files, "_write_safetensors", stopping_after(2, how, files._write_safetensors))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("earlier")
    before = listing(tmp_path)
    argv = ["export", str(hf_model[1]), str(out), "--overwrite", "--max-shard-gb", "0.00005"]
    check_ended(capsys, convert_main(argv), how, "OUT", str(out))
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", STOPS)
def test_prepare_demo(tmp_path, corpus, capsys, monkeypatch, how):
    import bigpt.data.demo_corpus as demo
    import bigpt.data.tokenizer_training as training

    # the corpus step, stopped while it writes
    document = stopping_after(50, how, lambda i: (f"module{i}", "some text"))
    monkeypatch.setattr(demo, "stdlib_documents", lambda: (document(i) for i in range(99)))
    check_ended(capsys, prepare_demo_main(["--out", str(tmp_path / "demo")]), how, "--out", "demo.jsonl")
    assert listing(tmp_path / "demo") == {}
    # the tokenizer step, after a corpus that is kept
    monkeypatch.setattr("tools.prepare_demo.DEMO_VOCAB_SIZE", 300)  # what the small corpus holds
    shutil.copy(corpus, tmp_path / "demo" / "demo.jsonl")
    before = listing(tmp_path)
    if how == "full disk":
        monkeypatch.setattr(Path, "write_text", half_written(how, Path.write_text))
    else:
        monkeypatch.setattr(training, "document_text", stopping_after(100, how, training.document_text))
    check_ended(capsys, prepare_demo_main(["--out", str(tmp_path / "demo")]), how, "--out", "tokenizer.vocab")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", STOPS)
def test_logits(tmp_path, capsys, monkeypatch, how):
    import torch
    from megatron.core import parallel_state

    import bigpt.logits
    import bigpt.runtime.distributed as distributed

    np.save(tmp_path / "tokens.npy", np.ones((1, 4), dtype=np.int64))
    np.save(tmp_path / "logits.npy", np.zeros(3))
    before = listing(tmp_path)
    # no model is built: the logits are given, and written as the tool writes them
    monkeypatch.setattr(distributed, "init_distributed", lambda layout: None)
    monkeypatch.setattr(distributed, "destroy_distributed", lambda: None)
    monkeypatch.setattr(bigpt.logits, "compute_logits", lambda recipe, layout, tokens, decoder: torch.ones(1, 4, 8))
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(np, "save", half_written(how, np.save))
    argv = f"{MOCK} --tokens {tmp_path}/tokens.npy --out {tmp_path}/logits.npy --overwrite".split()
    check_ended(capsys, logits_main(argv), how, "--out", f"{tmp_path}/logits.npy")
    assert listing(tmp_path) == before


def test_an_interrupted_tool_stops_its_child_before_going_on():
    """tools/reshard.py's torchrun stages: Ctrl-C (or SIGTERM) in the tool terminates the child and
    waits for it, so nothing writes into the partial output the tool then removes."""
    import subprocess
    import sys
    import threading

    from bigpt.runtime.process import run_child

    started = []
    real_popen = subprocess.Popen

    def recorded(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C, as a terminal sends it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", recorded)
        with pytest.raises(KeyboardInterrupt):
            run_child([sys.executable, "-c", "import time; time.sleep(60)"])
    assert started[0].returncode == -signal.SIGTERM
