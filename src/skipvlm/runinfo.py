"""What produced a result: the metadata every results file carries, built in one place.

A latency or accuracy number means little without the software and machine behind it, so every JSON
skipvlm writes (``skipvlm bench``, the demo, the showcase, the toy pretraining, the benchmark scripts)
records :func:`run_info` beside its rows: library versions, the skipvlm source commit when it runs
from a git checkout, the device, dtype and CPU threads, the machine, and the date.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers

__all__ = ["run_info"]

_SOURCE = Path(__file__).resolve().parent


def run_info(
    device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
) -> dict[str, Any]:
    """JSON-ready facts about this run, to store beside its results.

    Args:
        device: the device the run used; on CUDA the GPU's name is recorded too.
        dtype: the dtype of the model the run used.

    Returns:
        A flat dict: ``skipvlm``, ``python``, ``torch``, ``transformers``, ``peft``, ``accelerate``
        (versions; ``None`` for a package that is not installed), ``git_commit`` and ``git_dirty`` (of
        the skipvlm source, ``None`` outside a git checkout), ``device``, ``dtype``, ``gpu``, ``cuda``,
        ``threads`` (torch's CPU threads now), ``cpus``, ``machine``, ``processor``, ``platform`` and
        ``date`` (local time, ISO 8601 with the UTC offset).
    """
    import skipvlm  # here, not at the top: modules skipvlm/__init__ imports may call run_info

    device = torch.device(device) if device is not None else None
    commit, dirty = _source_commit()
    return {
        "skipvlm": skipvlm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": _version("peft"),
        "accelerate": _version("accelerate"),
        "git_commit": commit,
        "git_dirty": dirty,
        "device": str(device) if device is not None else None,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "gpu": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _source_commit() -> tuple[str | None, bool | None]:
    """The commit of skipvlm's source checkout and whether tracked files differ from it, else ``None``s.

    Only when skipvlm's own files are tracked there: an installed skipvlm inside some other repository
    (a virtual environment in a project folder) reports no commit rather than that project's.
    """
    if _git("ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return None, None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return commit, None if status is None else bool(status)


def _git(*args: str) -> str | None:
    """The output of ``git args`` in skipvlm's source folder, or ``None`` if git fails or is missing."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=_SOURCE, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):  # no git, or a hung file system
        return None
    return out.stdout.strip() if out.returncode == 0 else None
