"""Which checkpoint a run resumes from, and what retention keeps: plain files, no process group."""

import json
import pytest

from bigpt.checkpoint import store
from bigpt.errors import BigptError


def fake_checkpoint(root, iteration, complete=True):
    """A checkpoint as a save leaves it: shards, metadata, and the marker listing their sizes."""
    path = root / store.checkpoint_name(iteration)
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x" * 100)
    if complete:
        (path / "metadata.json").write_text("{}")
        (path / store.MARKER).write_text(json.dumps({"files": store.manifest(path)}))
    return path


def test_auto_resumes_from_the_latest_pointer(tmp_path):
    fake_checkpoint(tmp_path, 10)
    twenty = fake_checkpoint(tmp_path, 20)
    (tmp_path / store.LATEST).write_text(twenty.name + "\n")
    assert store.resolve_resume("auto", str(tmp_path)) == twenty


def test_auto_skips_a_half_written_checkpoint(tmp_path):
    ten = fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, complete=False)  # killed mid-save: no marker
    (tmp_path / store.LATEST).write_text(store.checkpoint_name(20))
    assert store.resolve_resume("auto", str(tmp_path)) == ten


def test_auto_and_none_start_fresh_without_checkpoints(tmp_path):
    assert store.resolve_resume("auto", str(tmp_path / "missing")) is None
    fake_checkpoint(tmp_path, 10)
    assert store.resolve_resume("none", str(tmp_path)) is None


def test_an_explicit_path_must_be_a_complete_checkpoint(tmp_path):
    with pytest.raises(BigptError, match=r'checkpoint.load = ".*nowhere" cannot be loaded: there is no such'):
        store.resolve_resume(str(tmp_path / "nowhere"), str(tmp_path))
    with pytest.raises(BigptError, match="it holds no intact checkpoint"):
        store.resolve_resume(str(tmp_path), str(tmp_path))
    half = fake_checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(BigptError, match="no bigpt.json"):
        store.resolve_resume(str(half), str(tmp_path))
    whole = fake_checkpoint(tmp_path, 6)
    assert store.resolve_resume(str(whole), "unused") == whole
    assert store.resolve_resume(str(tmp_path), "unused") == whole


def test_auto_falls_back_past_a_truncated_or_missing_shard(tmp_path):
    ten = fake_checkpoint(tmp_path, 10)
    twenty = fake_checkpoint(tmp_path, 20)
    (tmp_path / store.LATEST).write_text(twenty.name)
    (twenty / "__0_0.distcp").write_bytes(b"x" * 60)  # truncated
    warnings = []
    assert store.resolve_resume("auto", str(tmp_path), warnings.append) == ten
    assert "__0_0.distcp has 60 bytes, 100 were written" in warnings[0]
    (ten / "__0_0.distcp").unlink()
    with pytest.raises(BigptError, match="holds checkpoints but none is intact"):
        store.resolve_resume("auto", str(tmp_path), warnings.append)
    assert "__0_0.distcp is missing" in warnings[-1]
    with pytest.raises(BigptError, match="__0_0.distcp has 60 bytes"):  # named explicitly: no fallback
        store.resolve_resume(str(twenty), str(tmp_path))


def test_latest_naming_nothing_falls_back_with_a_warning(tmp_path):
    ten = fake_checkpoint(tmp_path, 10)
    (tmp_path / store.LATEST).write_text("iter_0000090")
    warnings = []
    assert store.resolve_resume("auto", str(tmp_path), warnings.append) == ten
    assert warnings == [f"{tmp_path / store.LATEST} names iter_0000090, which cannot be loaded: it does not exist"]


def test_retention_keeps_the_last_n_and_every_kth(tmp_path):
    for iteration in (10, 20, 30, 40, 50):
        fake_checkpoint(tmp_path, iteration)
    store.apply_retention(tmp_path, keep_last=2, keep_every=20)
    kept = sorted(p.name for p in tmp_path.glob("iter_*"))
    assert kept == [store.checkpoint_name(i) for i in (20, 40, 50)]


def test_finalize_is_a_rename_and_moves_latest(tmp_path):
    tmp = tmp_path / "iter_0000007.tmp"
    tmp.mkdir()
    (tmp / "metadata.json").write_text("{}")
    final = tmp_path / store.checkpoint_name(7)
    store.finalize(tmp, final, {"iteration": 7})
    assert not tmp.exists() and store.is_complete(final)
    assert store.read_marker(final) == {"iteration": 7}
    assert (tmp_path / store.LATEST).read_text().strip() == final.name
