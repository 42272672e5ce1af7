"""Output folders: checked before any work starts, never destructive, one run at a time.

Every command that writes into ``--out`` claims it first with :func:`claim_output`:

* ``--out`` must be a folder (or not exist yet) that this user can write, and must not be, or lie
  inside, an input folder (``--model``, ``--adapters``): skipvlm never writes into its inputs;
* a non-empty folder that skipvlm did not create, or that holds another kind of output (a run's logs
  vs. a model checkpoint), is refused unless ``overwrite`` is set; even then skipvlm writes only its
  own files and deletes nothing else;
* the files and folders the command will write must not exist with the wrong type (a file named
  ``adapters``, say), so the run cannot fail at the end;
* a lock file refuses a second process writing into the same folder at the same time, naming it.

The marker ``.skipvlm-output.json`` records the kind of output a folder holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["KINDS", "OutputError", "claim_output"]

MARKER = ".skipvlm-output.json"
LOCK = ".skipvlm.lock"
# What an output folder holds: a run's files (plans, logs, adapters, checkpoints, results), a model
# checkpoint (merged export, toy model), or DyVTE routers.
KINDS = ("run", "checkpoint", "routers")


class OutputError(ValueError):
    """The output folder cannot be used; the message names the problem and the fix."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_entries(out: Path, entries: Mapping[str, str]) -> None:
    for name, kind in entries.items():
        target = out / name
        if not target.exists():
            continue
        if kind == "dir" and not target.is_dir():
            raise OutputError(
                f"{target} exists and is not a folder, but this command writes the folder {name}/ there; "
                "move it away or choose another --out"
            )
        if kind == "file" and target.is_dir():
            raise OutputError(
                f"{target} is a folder, but this command writes the file {name} there; move it away or "
                "choose another --out"
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _lock(out: Path, command: str) -> Iterator[None]:
    lock = out / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text())
            except (OSError, ValueError):
                other = {}
            pid, host = other.get("pid"), other.get("host")
            if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                lock.unlink(missing_ok=True)  # left by a killed run
                continue
            raise OutputError(
                f"another skipvlm {other.get('command', 'run')} (pid {pid} on {host}) is writing into {out}; "
                f"wait for it to finish or choose another --out (if no such process runs, delete {lock})"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()


@contextlib.contextmanager
def claim_output(
    out: str | os.PathLike,
    command: str,
    kind: str = "run",
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    entries: Mapping[str, str] | None = None,
    is_file: bool = False,
) -> Iterator[Path]:
    """Check and lock the output folder ``out`` of ``command`` for the duration of the block.

    Call it before loading any weights, so that every problem with ``out`` surfaces at once.

    Args:
        out: the output folder (or, with ``is_file``, the output file, whose folder is checked).
        command: the command's name, for messages and the lock.
        kind: one of :data:`KINDS`: what this command's output is.
        overwrite: accept a non-empty folder that skipvlm did not create or that holds another kind.
        inputs: flag name -> folder the command reads (e.g. ``{"--model": ...}``); ``out`` may not be
            any of them or lie inside one.
        entries: names the command writes in ``out`` -> ``"file"`` or ``"dir"``.
        is_file: ``out`` names a file, not a folder.

    Raises:
        OutputError: naming the problem and the fix.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    target = Path(out).expanduser()
    if is_file:
        if target.is_dir():
            raise OutputError(f"--out {target} is a folder; pass a file name such as {target / 'out.json'}")
        folder = target.parent
    else:
        folder = target
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"--out {folder} is a file, not a folder; choose a folder name")
    resolved = folder.resolve()
    for flag, given in (inputs or {}).items():
        if given is None:
            continue
        source = Path(given).expanduser().resolve()
        if _inside(resolved, source):
            raise OutputError(
                f"--out {folder} is the {flag} folder {given} or inside it; skipvlm never writes into its "
                "inputs: choose another --out"
            )
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 checks and writes; the others only read
        yield folder
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create --out {folder}: {e.strerror}; choose a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"--out {folder} is not writable by this user; choose a writable folder")
    marker = folder / MARKER
    if not is_file:
        found = None
        if marker.is_file():
            try:
                found = json.loads(marker.read_text()).get("kind")
            except (OSError, ValueError, AttributeError):
                found = None
        others = [p.name for p in folder.iterdir() if p.name not in (MARKER, LOCK)]
        if others and not overwrite:
            if found is None:
                raise OutputError(
                    f"--out {folder} is not empty and was not created by skipvlm ({len(others)} entries, "
                    f"e.g. {sorted(others)[0]}); choose an empty or new folder, or pass --overwrite to write "
                    "skipvlm's files there (nothing else is deleted)"
                )
            if found != kind:
                raise OutputError(
                    f"--out {folder} holds a skipvlm {found} output, and {command} writes a {kind}; choose "
                    "another folder, or pass --overwrite"
                )
        _check_entries(folder, entries or {})
    with _lock(folder, command):
        if not is_file and not marker.exists():
            from skipvlm.io import atomic_write_text

            atomic_write_text(marker, json.dumps({"kind": kind, "created_by": command}) + "\n")
        yield target
