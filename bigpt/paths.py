"""Paths a user names (recipe keys, tool arguments): checked before any work, each mistake one
paragraph naming the key or argument; never a traceback, and "is a directory" when it is one."""

import errno
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import IO

from bigpt.errors import BigptError


def described(path) -> str:
    """``path`` as a message names it: as given, and where a relative path is (every relative path
    a user gives, on a command line or as a run's output key, is relative to the working directory;
    a recipe's input paths are made absolute when it is read)."""
    return str(path) if os.path.isabs(path) else f"{path} (in the working directory {os.getcwd()})"


def not_a_file(path) -> str | None:
    """Why ``path`` is not a file to read ("is a directory, not a file", "does not exist"), or None."""
    if os.path.isdir(path):
        return "is a directory, not a file"
    return None if os.path.isfile(path) else "does not exist"


def check_input_file(path, key: str) -> Path:
    """``path`` (named by ``key``) is a file."""
    if why := not_a_file(path):
        raise BigptError(f"{key} = {described(path)} {why}; check the path.")
    return Path(path)


def check_writable(path, key: str) -> None:
    """``path`` (named by ``key``) is a directory this process can write in, or one it can create: no
    part of it is a file, no name is too long, and the deepest part that exists takes a new file (a
    read-only filesystem or a missing permission fails here, not at the first save). Leaves nothing."""
    existing, missing = _split_existing(Path(path))
    fix = f"set {key} to a directory you can write, or fix the permissions"
    if not existing.is_dir():
        raise BigptError(f"{key} = {described(path)} cannot be created: {existing} is a file, not a directory; {fix}.")
    _check_name_lengths(existing, missing, path, key)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise BigptError(
            f"{key} = {described(path)} is not writable: creating a file in {existing} fails ({err.strerror}); {fix}."
        ) from None


def check_output_file(
    path, key: str, overwrite: bool = False, ours: Callable[[Path], bool] = lambda path: False
) -> None:
    """A file will be written at ``path`` (named by ``key``): it is not a directory, its name fits
    the filesystem, its directory can be written in (or created), and an existing file there is
    bigpt's own (``ours``) or the user passed OVERWRITE (``overwrite``)."""
    path = Path(path)
    if os.path.isdir(path):  # (os.path: False, not an error, for a name too long)
        raise BigptError(f"{key} = {path} is a directory; name a file to write.")
    check_writable(path.parent, f"the directory of {key}")
    _check_name_lengths(*_split_existing(path), path, key)
    check_replaceable(path, key, overwrite, ours)


def _split_existing(path: Path) -> tuple[Path, list[str]]:
    """The deepest part of ``path`` that exists, and the names below it that do not."""
    existing, missing = Path(os.path.abspath(path)), []
    while not os.path.exists(existing):  # (False, not an error, for a name too long)
        missing.append(existing.name)
        existing = existing.parent
    return existing, missing


def _check_name_lengths(existing: Path, missing: list[str], path, key: str) -> None:
    limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    for name in missing:
        if len(os.fsencode(name)) > limit:
            raise BigptError(
                f"{key} = {path}: the name {name[:40]}... is longer than the {limit} bytes the "
                "filesystem allows; choose a shorter one."
            )


# Every program writes over a file only when bigpt wrote it or the user passes this flag (the same
# spelling in every tool); the text files bigpt owns carry WRITTEN_BY in their first lines.
OVERWRITE = "--overwrite"
WRITTEN_BY = "# written by bigpt"


def written_by_bigpt(path) -> bool:
    """``path`` is a text file whose first lines hold bigpt's WRITTEN_BY line (a script keeps its
    ``#!`` line first)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(line.startswith(WRITTEN_BY) for line in itertools.islice(f, 3))
    except OSError:
        return False


def check_replaceable(path, key: str, overwrite: bool = False, ours: Callable[[Path], bool] = lambda path: False):
    """Writing ``path`` (named by ``key``) loses nothing of the user's: it does not exist, it is a
    file bigpt wrote (``ours``), or the user passed OVERWRITE (``overwrite``). A directory is never
    replaced by a file."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        raise BigptError(f"{key} = {path} is a directory; name a file to write, or move the directory away.")
    if overwrite or ours(path):
        return
    raise BigptError(
        f"{key}: {described(path)} exists and bigpt did not write it; refusing to replace it. Move it away or "
        f"choose another path, or pass {OVERWRITE} to replace it on purpose."
    )


def write_atomically(path, content: str | Callable[[IO], None], key: str | None = None, binary: bool = False) -> None:
    """``path`` holds the old content or all of the new (``content``, or what ``content(file)``
    writes; a ``binary`` file for that), even after a crash or a full disk (``replacing_atomically``)."""
    with (
        replacing_atomically(path, key) as temporary,
        open(temporary, "wb" if binary else "w", encoding=None if binary else "utf-8") as f,
    ):
        if callable(content):
            content(f)
        else:
            f.write(content)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def replacing_atomically(path, key: str | None = None):
    """The path of a new temporary file beside ``path``, for the block to write: renamed over
    ``path`` when the block succeeds, removed when it fails, so that ``path`` holds the old content
    or all of the new. With ``key`` (what names ``path`` to the user) a full disk is one
    paragraph, not a traceback."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        with reporting_a_full_disk(path, key) if key else nullcontext():
            yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp's file is private; the output is not
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.remove(temporary)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: setting it to read it races with threads that create files


def partial_dir(out: Path) -> Path:
    """Where a directory output ``out`` is built before it is renamed into place: a hidden name of
    bigpt's own beside it, so that the leftover of a killed run can be deleted and a user's
    ``OUT.tmp`` never is."""
    return out.with_name(f".{out.name}.bigpt-partial")


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
ALMOST_FULL_BYTES = 1 << 20


def names_a_full_disk(err: BaseException | str) -> bool:
    """``err`` is a full filesystem or quota: by its errno, or quoting the system's words (a
    serializer's own error)."""
    return getattr(err, "errno", None) in FULL_DISK_ERRNOS or any(
        os.strerror(code) in str(err) for code in FULL_DISK_ERRNOS
    )


def almost_full(path) -> bool:
    """The filesystem of ``path`` has under 1 MiB free: a write that failed there ran out of space,
    even when its writer reports only its own symptom."""
    try:
        return shutil.disk_usage(path).free < ALMOST_FULL_BYTES
    except OSError:
        return False


@contextmanager
def reporting_a_full_disk(path, key: str):
    """Writes to ``path`` (named by ``key``) whose partial output the caller removes: a full
    filesystem or quota is one paragraph naming the path, whatever the writer raised (an OSError,
    a serializer's own error quoting the system's, or one that says only its symptom, such as
    torch's "unexpected pos", on a filesystem with almost nothing left)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, BigptError):  # (an inner write's paragraph stays)
        raise
    except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is not an Exception
        if names_a_full_disk(err) or almost_full(_split_existing(Path(path))[0]):
            raise BigptError(
                f"writing {key} = {described(path)} failed: {os.strerror(errno.ENOSPC)} (or over quota) on its "
                "filesystem; nothing was replaced. Free space there or write elsewhere, then run "
                "again."
            ) from None
        raise
