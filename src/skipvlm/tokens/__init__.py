"""Visual-token exit at inference: VTW, FastV and DyVTE (``shared/METHODS.md`` §4).

Each method is one file that declares its plan fields, runtime policy and MAC rule and registers them
(:func:`skipvlm.plan.register_token_exit`); a new method is a new file plus one import line here. The
hook the layer loop runs is :mod:`skipvlm.tokens.exit`; this package also holds VTW's calibration and
DyVTE's router training.
"""

from skipvlm.tokens import vtw, fastv, dyvte  # noqa: F401, I001  (registration order: VTW, FastV, DyVTE)
from skipvlm.tokens.dyvte import DyVTEConfig, DyVTERouters, train_dyvte
from skipvlm.tokens.vtw import VTWCalibration, calibrate_vtw

__all__ = ["DyVTEConfig", "DyVTERouters", "VTWCalibration", "calibrate_vtw", "train_dyvte"]
