"""Which checkpoint a run resumes from, and what retention keeps: plain files, no process group."""

import json
import os

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


def test_auto_resumes_a_checkpoint_saved_before_latest_moved(tmp_path):
    """A save killed after its checkpoint was moved into place, before `latest` was moved to it: the
    newer intact checkpoint is resumed, and the resume may write beside it (it was refused as a
    rollback over it, test_fault_tolerance's SIGKILL at that moment)."""
    fake_checkpoint(tmp_path, 10)
    twenty = fake_checkpoint(tmp_path, 20)
    (tmp_path / store.LATEST).write_text(store.checkpoint_name(10) + "\n")
    resume = store.resolve_resume("auto", str(tmp_path))
    assert resume == twenty
    store.check_only_own_checkpoints(tmp_path, resume)


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
    with pytest.raises(BigptError, match="has held checkpoints but none is intact now"):
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
    store.apply_retention(tmp_path, keep_last=2, keep_every=20, newest=tmp_path / store.checkpoint_name(50))
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


def test_latest_naming_a_checkpoint_that_is_gone_stops_rather_than_start_over(tmp_path):
    """docs/checkpoints.md's promise: with no intact checkpoint left, auto does not silently begin at step 0."""
    (tmp_path / store.LATEST).write_text("iter_0000030\n")
    with pytest.raises(BigptError, match="has held checkpoints but none is intact now") as info:
        store.resolve_resume("auto", str(tmp_path))
    assert 'checkpoint.load = "none" and a new checkpoint.dir' in str(info.value)


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_fresh_start_into_another_runs_checkpoints_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 25)
    fake_checkpoint(tmp_path, 30)
    (tmp_path / store.LATEST).write_text("iter_0000030\n")
    before = snapshot(tmp_path)
    with pytest.raises(BigptError) as info:
        store.check_only_own_checkpoints(tmp_path, None)
    message = str(info.value)
    assert f"checkpoint.dir {tmp_path} holds checkpoints of another run (iter_0000025, iter_0000030)" in message
    assert 'checkpoint.load = "auto"' in message and "another run_dir or checkpoint.dir" in message
    elsewhere = fake_checkpoint(tmp_path / "other", 4)  # resuming some other run's checkpoint into this directory
    with pytest.raises(BigptError, match=f"of another run than {elsewhere}"):
        store.check_only_own_checkpoints(tmp_path, elsewhere)
    assert snapshot(tmp_path) == dict(before, **{f"other/{k}": v for k, v in snapshot(tmp_path / "other").items()})


def test_a_half_written_checkpoint_of_another_run_counts_too(tmp_path):
    fake_checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(BigptError, match="iter_0000003"):
        store.check_only_own_checkpoints(tmp_path, None)


def test_a_run_may_write_beside_its_own_history(tmp_path):
    store.check_only_own_checkpoints(tmp_path / "missing", None)
    (tmp_path / "iter_0000009.tmp").mkdir()  # a killed save of step 9: ignored, as when resuming
    store.check_only_own_checkpoints(tmp_path, None)
    ten = fake_checkpoint(tmp_path, 10)
    twenty = fake_checkpoint(tmp_path, 20)
    store.check_only_own_checkpoints(tmp_path, twenty)
    (twenty / "__0_0.distcp").write_bytes(b"x")  # damaged: a resume from 10 replaces it
    store.check_only_own_checkpoints(tmp_path, ten)


def test_rolling_back_over_newer_checkpoints_is_refused(tmp_path):
    ten = fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    with pytest.raises(BigptError, match="newer than iter_0000010, which this run resumes from .iter_0000020."):
        store.check_only_own_checkpoints(tmp_path, ten)


def test_retention_never_deletes_a_checkpoint_newer_than_the_one_just_written(tmp_path):
    for iteration in (25, 30):
        fake_checkpoint(tmp_path, iteration)
    two = fake_checkpoint(tmp_path, 2)
    store.apply_retention(tmp_path, keep_last=1, keep_every=0, newest=two)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000025", "iter_0000030"]


def test_two_live_runs_never_write_the_same_directory(tmp_path):
    held = store.lock_directory(tmp_path / "checkpoints")
    with pytest.raises(BigptError, match=rf"is being written by another live run \(host .*, pid {os.getpid()}\)"):
        store.lock_directory(tmp_path / "checkpoints")
    held.close()  # the run ended (the system releases the lock of a killed one the same way)
    store.lock_directory(tmp_path / "checkpoints").close()


def test_a_full_disk_is_named_even_when_the_serializer_reports_only_its_position(tmp_path, monkeypatch):
    """A real full disk makes torch's zip writer fail with "unexpected pos", not ENOSPC."""
    import shutil
    from collections import namedtuple

    from bigpt.checkpoint import state

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(state.dist, "get_rank", lambda: 0)
    writer = state.CheckpointWriter(tmp_path, asynchronous=False)
    writer.in_flight = tmp_path / "iter_0000003"
    serializer = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4288 vs 4176")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 100, 0))
    with pytest.raises(BigptError) as info:
        with writer._reporting_failure():
            raise serializer
    assert (
        f"saving checkpoint {tmp_path / 'iter_0000003'} failed (No space left on device on the filesystem of "
        f"{tmp_path}; the writer said: [enforce fail" in str(info.value)
    )
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 0, 100 << 20))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room on the disk it is a bug: its traceback
        with writer._reporting_failure():
            raise serializer


def test_a_slice_of_a_flattened_parameter_is_a_few_contiguous_blocks_of_it():
    """The model-space optimizer format writes each rank's slice of a flattened parameter as blocks
    of the parameter: they hold exactly that slice, in memory order, at most 2 × ndim - 1 of them."""
    import math

    import torch

    from bigpt.runtime.model_space import blocks

    for shape in [(7,), (3, 5), (4, 3, 5), (2, 3, 2, 4)]:
        numel = math.prod(shape)
        for start in range(numel + 1):
            for stop in range(start, numel + 1):
                tensor, position = torch.zeros(shape), start
                found = blocks(start, stop, shape)
                for offset, size in found:
                    block = tensor[tuple(slice(at, at + n) for at, n in zip(offset, size))]
                    assert block.is_contiguous() and block.storage_offset() == position
                    block += 1
                    position += math.prod(size)
                assert position == stop and len(found) <= 2 * len(shape) - 1
                assert tensor.view(-1)[start:stop].eq(1).all() and tensor.sum() == stop - start


def _deleting_fails(error):
    real = store.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if path.name == store.checkpoint_name(10):
            raise error
        real(path, *args, **kwargs)

    return rmtree


@pytest.mark.parametrize(
    "failure, reason",
    [
        ("symlink", "a symbolic link to "),
        (PermissionError(13, "Permission denied", "iter_0000010/__0_0.distcp"), "Permission denied: iter_0000010/"),
        (OSError(16, "Device or resource busy", ".nfs000123"), "Device or resource busy: .nfs000123"),
    ],
)
def test_a_checkpoint_retention_cannot_delete_is_named_and_later_saves_go_on(
    tmp_path, monkeypatch, capsys, failure, reason
):
    """The save succeeded: retention's failure is a warning naming what is left and why, never the
    save's failure; and the next save (and its retention) still runs."""
    from types import SimpleNamespace

    from bigpt.checkpoint import state

    root = tmp_path / "checkpoints"
    if failure == "symlink":  # a checkpoint kept elsewhere, linked in: its files are never followed
        elsewhere = fake_checkpoint(tmp_path / "archive", 10)
        root.mkdir()
        (root / elsewhere.name).symlink_to(elsewhere)
    else:
        fake_checkpoint(root, 10)
        monkeypatch.setattr(store.shutil, "rmtree", _deleting_fails(failure))
    monkeypatch.setattr(state.dist, "get_rank", lambda: 0)
    writer = state.CheckpointWriter(root, asynchronous=False)
    config = SimpleNamespace(keep_last=1, keep_every=0)

    def save(iteration):
        final = root / store.checkpoint_name(iteration)
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir()
        (tmp / "metadata.json").write_text("{}")
        writer.in_flight = final
        with writer._reporting_failure():
            writer._mark_complete(tmp, final, {"iteration": iteration}, "", config)

    save(20)
    err = capsys.readouterr().err
    assert "checkpoint iter_0000020 saved, but retention (checkpoint.keep_last = 1) could not delete" in err
    assert f"iter_0000010 ({reason}" in err and "saving goes on" in err
    assert store.latest_in(root) == root / "iter_0000020"
    save(30)  # the next save completes, and its retention deletes what it can
    assert store.latest_in(root) == root / "iter_0000030" and not (root / "iter_0000020").exists()
    again = capsys.readouterr().err
    if failure == "symlink":  # still linked in, said again; the linked checkpoint's files are untouched
        assert "iter_0000010 (a symbolic link" in again and store.is_complete(elsewhere)
    else:  # half deleted, its marker first: never again taken for a checkpoint, to resume or to prune
        assert again == "" and not store.is_complete(root / "iter_0000010")
