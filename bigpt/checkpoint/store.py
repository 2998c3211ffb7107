"""Where checkpoints live on disk: ``<dir>/iter_0000040/`` directories, written under a temporary
name and renamed when complete, and a ``latest`` file naming the newest complete one. A reader
therefore never sees half a checkpoint."""

import json
import os
import shutil
from pathlib import Path

from bigpt.errors import BigptError

MARKER = "bigpt.json"  # written last: its presence means the checkpoint is complete
LATEST = "latest"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "metadata.json").is_file()


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finalize(tmp_dir: Path, final_dir: Path, marker: dict) -> None:
    """Mark ``tmp_dir`` complete, move it into place, point ``latest`` at it (rank 0 only)."""
    write_atomically(tmp_dir / MARKER, json.dumps(marker, indent=2))
    if final_dir.exists():  # the same iteration saved again (e.g. a re-run): replace it whole
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    write_atomically(final_dir.parent / LATEST, final_dir.name + "\n")


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def resolve_resume(load: str, checkpoint_dir: str) -> Path | None:
    """The checkpoint a run resumes from: ``checkpoint.load`` = "auto" (the latest complete one in
    ``checkpoint.dir``, if any), "none", or a path to a checkpoint or a checkpoint directory."""
    if load == "none":
        return None
    if load == "auto":
        root = Path(checkpoint_dir)
        return latest_in(root) if root.exists() else None
    path = Path(load)
    if is_complete(path):
        return path
    found = latest_in(path) if path.is_dir() else None
    if found is None:
        raise BigptError(
            f"checkpoint.load = \"{load}\" is not a complete bigpt checkpoint, nor a directory holding "
            "one; point it at an iter_* directory that contains bigpt.json, or set checkpoint.load = "
            "\"auto\" (resume if possible) or \"none\" (start fresh)."
        )
    return found


def latest_in(root: Path) -> Path | None:
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and is_complete(p))
    return complete[-1] if complete else None


def apply_retention(root: Path, keep_last: int, keep_every: int) -> None:
    """Keep the newest ``keep_last`` checkpoints, plus every ``keep_every``-th iteration."""
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and is_complete(p))
    for path in complete[:-keep_last] if keep_last else []:
        iteration = int(path.name.split("_")[1])
        if not (keep_every and iteration % keep_every == 0):
            shutil.rmtree(path)
