"""lmms-eval's entry point for skipvlm: ``pip install skipvlm lmms-eval`` and ``lmms-eval --model skipvlm``.

pyproject.toml registers :func:`manifest` in the ``lmms_eval.models`` entry-point group, which
lmms-eval (0.7) reads when it builds its model registry (older releases: see :mod:`skipvlm.lmms_eval`).
This module imports neither lmms-eval nor the model class: lmms-eval imports :mod:`skipvlm.lmms_eval`
only when ``--model skipvlm`` is asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLASS_PATH", "MODEL_NAME", "manifest"]

MODEL_NAME = "skipvlm"
CLASS_PATH = "skipvlm.lmms_eval.SkipVLM"


def manifest() -> Any:
    """lmms-eval's ``ModelManifest`` naming :class:`skipvlm.lmms_eval.SkipVLM` as the model ``skipvlm``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)
