"""Shared fixtures."""

import pytest
import torch

import slurm_cluster
import zygote


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, saying so, where torch sees no CUDA device.

    Under pytest-xdist (``-n 2 --dist loadgroup``) each worker builds its own session and module
    fixtures, and those are the expensive runs (reference trainings, a SLURM cluster): the tests
    on the SLURM cluster share one worker, and so do the tests of a module that use one of its
    module-scoped fixtures, so each is built once, not once per worker."""
    skip = (
        None
        if torch.cuda.is_available()
        else pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); this machine has none")
    )
    for item in items:
        if skip and "gpu" in item.keywords:
            item.add_marker(skip)
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif _uses_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def pytest_sessionfinish(session):
    zygote.stop()


def _uses_a_module_fixture(item) -> bool:
    definitions = getattr(item, "_fixtureinfo", None)
    return definitions is not None and any(
        defs[-1].scope == "module" for defs in definitions.name2fixturedefs.values() if defs
    )


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real two-node SLURM cluster on this machine (tests/slurm_cluster.py), started on first use
    and stopped at the end of the session; SLURM commands run in the tests use it (SLURM_CONF)."""
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    with pytest.MonkeyPatch.context() as patch:
        try:
            cluster.start()
            patch.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A SentencePiece tokenizer trained once per session on tests/test_data_support.py's corpus."""
    from test_data_support import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def small_tokenizer(tmp_path):
    """A 100-token Hugging Face tokenizer.json: stands in for a recipe's tokenizer on a machine
    without its data (a dry run checks the tokenizer a recipe names, as a real start does)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel({"</s>": 0, **{f"w{i}": i for i in range(1, 100)}}, unk_token="w1")).save(str(path))
    return path
