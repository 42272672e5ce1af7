"""Atomic file writes: a crash or a kill mid-save never leaves a half-written file behind.

Every file skipvlm writes (plans, adapters, checkpoints, results) goes through :func:`atomic_path`:
the data is written to a temporary file in the same folder and renamed over the target, which is
atomic on POSIX file systems, so readers see either the old file or the new one.

Folders come two ways. :func:`atomic_files` replaces the files it writes one by one and never touches
anything else in the folder (model exports, routers: folders a user may share with other files).
:func:`atomic_dir` swaps a folder that skipvlm owns whole (training checkpoints), and
:func:`recover_dir` puts such a folder back in order after a crash at any point of the swap.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_files", "atomic_path", "atomic_write_text", "recover_dir"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the user's usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces the folder ``path`` whole.

    An existing folder is renamed aside, the new one renamed into place, then the old one removed, so
    an interruption leaves either the old folder or the new one (at worst beside a ``.old`` copy).
    On error the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield staging
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_files(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success each file in it replaces its namesake in ``path``.

    Files of ``path`` that the block did not write stay as they are, so a checkpoint exported into a
    folder that also holds logs, notes or adapters deletes none of them. Each file is replaced
    atomically; on error nothing in ``path`` changes.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path, prefix=".staging.", suffix=".tmp"))
    try:
        yield staging
        for src in sorted(staging.rglob("*")):
            if src.is_dir():
                continue
            dst = path / src.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(src, 0o666 & ~_umask())
            os.replace(src, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> str | None:
    """Put a folder written by :func:`atomic_dir` back in order after a crash; say what was done.

    The swap renames ``path`` to ``.path.old``, the staging folder to ``path``, then removes the old
    one. A crash between the renames leaves only ``.path.old``: it is the last complete folder and is
    renamed back. A crash after them leaves both: the new folder wins and the old one is removed.
    Staging folders (``.path.*.tmp``) of interrupted saves are removed in every case.

    Returns:
        A sentence describing the repair, or None if there was nothing to do.
    """
    path = Path(path)
    done = []
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        old.rename(path)
        done.append(f"restored {path} from {old.name} (a save was interrupted)")
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
        done.append(f"removed the leftover {old.name}")
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            done.append(f"removed the unfinished {stale.name}")
    return "; ".join(done) or None
