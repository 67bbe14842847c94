"""Writing files so that readers never see half of one, and so that colleagues can read them.

Every file and folder the pipeline writes for others (metrics.json, run.json, DVC outputs, reports,
checkpoints, decoded data) goes through here: written beside its target and renamed into place, with the modes the
user's umask gives (temporary files and folders are created 0600/0700, which would hide results from a
shared group); a refusal of the file system names the file. A report folder is replaced only if the
pipeline made it (it carries MARKER). The locks live here too: `exclusive` (a file's, e.g. a checkpoint
folder's) and `folder_lock` (a folder's own, for writers that must take turns).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

from pipeline.config import PipelineError
from pipeline.processes import process_alive, process_tags

# In every report folder the pipeline writes; nothing else is replaced, nor removed by `make clean-outputs`.
MARKER = ".fromlogits-report"


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


UMASK = _umask()
FILE_MODE = 0o666 & ~UMASK
FOLDER_MODE = 0o777 & ~UMASK


class WriteError(PipelineError):
    """An output could not be written; nothing half-written was left."""


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` for a temporary sibling of `path`, then renames it into place. A file system's
    refusal (a full disk, no permission) is a WriteError that names `path`."""
    # Named before it is made (tempfile.mkstemp names it only on return): a stop that comes as it is made also
    # removes it. Its name holds this process's id, so no other writer's temporary file is ever taken for it.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteError(f"could not write {path}: {error.strerror or error}; its previous version, if any, "
                             "is unchanged") from error
        raise


def write_json(path: Path, payload: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True)))


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_arrays(path: Path, **arrays) -> None:
    """NumPy arrays as one .npz file (np.load reads them back by name)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
            np.savez(f, **arrays)

    write_atomically(path, write)


def refuse_unless_ours(folder: Path) -> None:
    """Raises WriteError if `folder` exists and is not a report folder the pipeline made (it holds MARKER):
    a report never replaces anyone else's folder."""
    if folder.exists() and not (folder / MARKER).exists():
        raise WriteError(f"{folder} exists and is not a report folder of this pipeline (no {MARKER} in it); "
                         "choose another study name or output folder, or remove it yourself")


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself, waited for: no lock file is left, and the lock goes with the
    process. Where the file system cannot lock a folder (NFS turns flock into a POSIX lock, which needs a
    file open for writing), it goes on without the lock."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        descriptor = None
    try:
        if descriptor is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


def _writer_name(final: Path, kind: str) -> str:
    """The name of a folder this process makes beside `final` ("partial": being written; "previous": the
    report it replaces): it names the writer, so that a later writer can remove it if this one was killed."""
    me = process_tags()
    return f".{final.name}.{kind}-{me['pid']}-{me['pid_started']}"


def _remove_abandoned(final: Path) -> None:
    """Folders beside `final` that a writer killed hard (SIGKILL) left: ours (they hold MARKER), their writer gone."""
    for kind in ("partial", "previous"):
        prefix = f".{final.name}.{kind}-"
        for folder in final.parent.glob(glob.escape(prefix) + "*"):
            pid, _, rest = folder.name.removeprefix(prefix).partition("-")
            started = rest.partition("-")[0]  # a staging folder's name goes on with its random suffix
            if (folder / MARKER).is_file() and not process_alive(pid, started):
                shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yields an empty sibling folder; on success it replaces `final` whole, on failure it is removed,
    so a reader never finds half a report (a full disk leaves the previous report as it was).

    Refuses, before anything is written, to replace a folder that the pipeline did not make. Writers of
    one folder at once (two identical studies ending together) take turns to check and swap it, and remove
    what a writer killed hard left beside it.
    """
    try:
        if final.parent.is_dir():
            with folder_lock(final.parent):
                refuse_unless_ours(final)
                _remove_abandoned(final)
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(f"could not write to {final.parent}: {error.strerror or error}") from None
    # Named before it is made (not by tempfile.mkdtemp, whose name is known only once it returns): a stop (Ctrl-C)
    # that comes as it is made, or any moment after, also removes it.
    staging = final.parent / f"{_writer_name(final, 'partial')}-{secrets.token_hex(4)}"
    try:
        staging.mkdir(mode=0o700)  # its name holds this process's id and start: never another writer's folder
        os.chmod(staging, FOLDER_MODE)
        (staging / MARKER).write_text("written by fromlogits; the next report of this study replaces this folder\n")
        yield staging
        for item in staging.iterdir():
            if item.is_file():
                os.chmod(item, FILE_MODE)
        previous = final.with_name(_writer_name(final, "previous"))
        with folder_lock(final.parent):
            refuse_unless_ours(final)  # it may have been made meanwhile
            if final.exists():
                final.rename(previous)
            staging.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    except (OSError, WriteError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        refused = error.__cause__ if isinstance(error, WriteError) else error  # a file in it (write_atomically)
        if not isinstance(refused, OSError):
            raise  # not the file system's refusal: e.g. the folder became someone else's meanwhile
        raise WriteError(f"could not write the report to {final}: {refused.strerror or refused}; "
                         "nothing was written (the previous report, if any, is unchanged)") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive(lock_path: Path, wait: bool = False) -> Iterator[bool]:
    """Holds an exclusive lock on `lock_path` if no other process does (or, with `wait`, once none does);
    yields whether it got it. The lock goes with the process, so a killed holder never blocks the next one."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")
    except OSError as error:
        raise WriteError(f"could not create the lock file {lock_path}: {error.strerror or error}") from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
