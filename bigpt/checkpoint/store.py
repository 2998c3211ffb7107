"""Where checkpoints live on disk: ``<dir>/iter_0000040/`` directories, written under a temporary
name and renamed when complete, and a ``latest`` file naming the newest complete one. A reader
therefore never sees half a checkpoint."""

import fcntl
import json
import os
import re
import shutil
import socket
import tomllib
from pathlib import Path

from bigpt.errors import BigptError
from bigpt.paths import write_atomically

MARKER = "bigpt.json"  # written last: its presence means the checkpoint is complete
LATEST = "latest"
LOCK = "bigpt.lock"  # locked by the run that writes the directory; names its host and pid


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable checkpoint, or None. Every file the save wrote is listed
    with its size in the marker, so a missing or truncated shard is caught before loading."""
    if not (path / MARKER).is_file():
        return f"it has no {MARKER} (the save did not finish)"
    try:
        files = json.loads((path / MARKER).read_text()).get("files", {})
    except (OSError, ValueError):
        return f"its {MARKER} is unreadable"
    for name, size in {"metadata.json": None, **files}.items():
        shard = path / name
        if not shard.is_file():
            return f"{name} is missing"
        if size is not None and shard.stat().st_size != size:
            return f"{name} has {shard.stat().st_size} bytes, {size} were written (truncated or damaged)"
    return None


def is_complete(path: Path) -> bool:
    return problem(path) is None


def manifest(tmp_dir: Path) -> dict[str, int]:
    """Name and size of every file a save wrote, for ``problem`` to check."""
    return {p.name: p.stat().st_size for p in sorted(tmp_dir.iterdir()) if p.is_file()}


def finalize(tmp_dir: Path, final_dir: Path, marker: dict) -> None:
    """Mark ``tmp_dir`` complete, move it into place, point ``latest`` at it (rank 0 only)."""
    write_atomically(tmp_dir / MARKER, json.dumps(marker, indent=2))
    if final_dir.exists():  # the same iteration saved again (e.g. a re-run): replace it whole
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    write_atomically(final_dir.parent / LATEST, final_dir.name + "\n")  # a failure: the save reports it


def written_latest(path: Path) -> bool:
    """``path`` is a ``latest`` as ``finalize`` writes it: one checkpoint's name (a user's file of
    that name is never replaced)."""
    try:
        return re.fullmatch(r"iter_\d+\n?", path.read_text()) is not None
    except (OSError, UnicodeDecodeError):
        return False


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def saved_progress(path: Path, seq_length: int) -> dict:
    """The counters of the checkpoint at ``path`` and what it was trained with: iteration,
    consumed_samples, consumed_tokens, seq_length, and its recipe's [train] table (batch size and
    ramp-up). Checkpoints from before bigpt counted tokens count samples × their recipe's
    model.seq_length (``seq_length`` when they name none)."""
    marker = read_marker(path)
    recipe_file = path / "recipe.toml"
    saved = tomllib.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    seq_length = marker.get("seq_length") or saved.get("model", {}).get("seq_length") or seq_length
    return {
        "iteration": marker["iteration"],
        "consumed_samples": marker["consumed_samples"],
        "consumed_tokens": marker.get("consumed_tokens", marker["consumed_samples"] * seq_length),
        "seq_length": seq_length,
        "train": saved.get("train", {}),
    }


def resolve_resume(load: str, checkpoint_dir: str, warn=lambda message: None) -> Path | None:
    """The checkpoint a run resumes from: ``checkpoint.load`` = "auto" (the latest complete one in
    ``checkpoint.dir``, if any), "none", or a path to a checkpoint or a checkpoint directory.
    Damaged checkpoints are passed over with a ``warn``ing; auto never silently starts fresh
    when checkpoints exist but none is intact."""
    if load == "none":
        return None
    if load == "auto":
        root = Path(checkpoint_dir)
        return _latest_or_fail(root, "checkpoint.dir", warn) if root.exists() else None
    return checkpoint_at(
        Path(load),
        "checkpoint.load",
        warn,
        'or set checkpoint.load = "auto" (resume if possible) or "none" (start fresh)',
    )


def checkpoint_at(path: Path, key: str, warn=lambda message: None, alternatives: str = "") -> Path:
    """The checkpoint the recipe ``key`` names: that checkpoint, which must be intact, or the
    newest intact one in a directory of them; otherwise an error naming the key."""
    is_root = path.is_dir() and not path.name.startswith("iter_") and not (path / MARKER).exists()
    if is_root and (found := latest_in(path, warn)):
        return found
    why = (
        "it holds no intact checkpoint" if is_root else problem(path) if path.is_dir() else "there is no such directory"
    )
    if why:
        raise BigptError(
            f'{key} = "{path}" cannot be loaded: {why}; it is not a complete bigpt checkpoint, nor a directory '
            f"holding one. Point it at an intact iter_* checkpoint or a directory holding some, {alternatives}."
        )
    return path


def _latest_or_fail(root: Path, where: str, warn) -> Path | None:
    found = latest_in(root, warn)
    if found is None and (_saved(root) or (root / LATEST).is_file()):  # a `latest` alone: they were deleted
        raise BigptError(
            f"{where} ({root}) has held checkpoints but none is intact now (see the warnings above), and bigpt "
            "does not silently start over; restore one from a backup, or start over with checkpoint.load = "
            '"none" and a new checkpoint.dir (or run_dir).'
        )
    return found


def _saved(root: Path) -> list[Path]:
    """Checkpoints whose save finished (they have a marker), intact or not, oldest first."""
    return sorted(p for p in root.glob("iter_*") if (p / MARKER).is_file())


def latest_in(root: Path, warn=lambda message: None) -> Path | None:
    """The newest intact checkpoint under ``root``. ``latest`` names it, except after a save killed
    between moving its checkpoint into place and moving ``latest`` (``finalize``): then a newer
    intact one is there, and it is the one to resume (a resume from the one ``latest`` names would
    be refused for rolling back over it, ``check_only_own_checkpoints``)."""
    pointer, named = root / LATEST, None
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        why = problem(named) if named.is_dir() else "it does not exist"
        if why is not None:
            warn(f"{pointer} names {named.name}, which cannot be loaded: {why}")
            named = None
    for path in reversed(_saved(root)):
        if named is not None and iteration_of(path) <= iteration_of(named):
            break
        why = problem(path)
        if why is None:
            return path
        warn(f"skipping checkpoint {path}: {why}")
    return named


def iteration_of(path: Path) -> int:
    return int(path.name.removeprefix("iter_"))


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Every ``iter_N`` directory (complete or not, not a ``.tmp`` save in progress), oldest first."""
    return sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()) if root.is_dir() else []


def check_only_own_checkpoints(root: Path, resume: Path | None, key: str = "checkpoint.dir") -> None:
    """A run saves (and prunes) into ``root`` only when every checkpoint there is its own history: none
    for a fresh start; for a resume, the checkpoint it resumes from and older ones beside it. Another
    run's checkpoints, or newer ones a rollback would overwrite, make it stop before any work."""
    if resume is not None and resume.resolve().parent == root.resolve():
        others = [p for p in _checkpoint_dirs(root) if iteration_of(p) > iteration_of(resume) and problem(p) is None]
        why = f"newer than {resume.name}, which this run resumes from"
        fix = (
            'resume the newest with checkpoint.load = "auto", or move the newer ones out of the directory '
            "first if you mean to roll back to " + resume.name
        )
    else:
        others = _checkpoint_dirs(root)
        why = "of another run" if resume is None else f"of another run than {resume}, which this run resumes from"
        fix = (
            'resume them with checkpoint.load = "auto", or give this run a place of its own (another run_dir or '
            "checkpoint.dir), or move them away"
        )
    if others:
        names = ", ".join(p.name for p in others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise BigptError(
            f"{key} {root} holds checkpoints {why} ({names}); saving there would overwrite or prune checkpoints "
            f"this run did not write, so bigpt stops before any work. To keep them, {fix}."
        )


def apply_retention(root: Path, keep_last: int, keep_every: int, newest: Path) -> list[str]:
    """Keep the newest ``keep_last`` checkpoints up to ``newest`` (the one just written), plus every
    ``keep_every``-th iteration; never one after ``newest`` (check_only_own_checkpoints makes sure
    there is none, but retention must not be what deletes work if one appears). Returns why each
    checkpoint it could not delete is still there: the save itself succeeded, and later saves go on."""
    complete = [p for p in _saved(root) if is_complete(p) and iteration_of(p) <= iteration_of(newest)]
    left = []
    for path in complete[:-keep_last] if keep_last else []:
        if not (keep_every and iteration_of(path) % keep_every == 0):
            if why := _delete_checkpoint(path):
                left.append(f"{path.name} ({why})")
    return left


def _delete_checkpoint(path: Path) -> str | None:
    """Delete the checkpoint at ``path``, its marker first (so that what a failure leaves behind is
    never taken for a complete checkpoint); None, or why it could not be deleted."""
    if path.is_symlink():  # its files are elsewhere, maybe a user's copy: never followed
        return f"a symbolic link to {os.readlink(path)}, which retention does not follow"
    try:
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path)
    except OSError as err:
        return f"{err.strerror or err}: {err.filename or path}"
    return None


def lock_directory(root: Path, key: str = "checkpoint.dir"):
    """Make this process the one run writing ``root``: an exclusive lock on ``root/bigpt.lock``, which
    the operating system releases when the process ends however it ends (so a killed run leaves no
    stale lock). Returns the open file, to keep for as long as the run writes."""
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not said who it is"
        handle.close()
        raise BigptError(
            f"{key} {root} is being written by another live run ({holder}); two runs must never write the same "
            "checkpoints. Wait for that run to end (or stop it), or give this one another run_dir or checkpoint.dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    handle.flush()
    return handle
