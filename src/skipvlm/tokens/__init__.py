"""Visual-token exit at inference: VTW, FastV and DyVTE (``shared/METHODS.md`` §4).

The runtime side lives in :mod:`skipvlm.tokens.exit` and is driven by a :class:`~skipvlm.Plan`'s token
fields; this package also holds VTW's calibration and DyVTE's router training.
"""

from skipvlm.tokens.dyvte import DyVTEConfig, DyVTERouters, train_dyvte
from skipvlm.tokens.vtw import VTWCalibration, calibrate_vtw

__all__ = ["DyVTEConfig", "DyVTERouters", "VTWCalibration", "calibrate_vtw", "train_dyvte"]
