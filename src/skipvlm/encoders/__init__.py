"""Two-stream vision-language encoder hosts: the METER family through transformers' BridgeTower
(``shared/METHODS.md`` §7).

The host (:mod:`~skipvlm.encoders.host`) plugs in as one :class:`~skipvlm.arch.HostFamily` entry, so
:func:`skipvlm.apply_plan`, :func:`skipvlm.get_eas_model`, :func:`skipvlm.search` and
:func:`skipvlm.train` take a BridgeTower model as they take a decoder one. Plans name sublayers
(``"text.1.cross"``). The rest of the package: the layer wrapper (:mod:`~skipvlm.encoders.layers`), PIA
and DAS modules for post-norm sublayers (:mod:`~skipvlm.encoders.adapters`), the EAS model
(:mod:`~skipvlm.encoders.eas`), METER's task heads (:mod:`~skipvlm.encoders.heads`), MAC counts
(:mod:`~skipvlm.encoders.cost`), the toy (:mod:`~skipvlm.encoders.toy`) and its demo
(:mod:`~skipvlm.encoders.demo`).
"""

from skipvlm.encoders.host import HOST, BridgeTowerHost, backbone
from skipvlm.encoders.names import EncoderCandidates

__all__ = ["HOST", "BridgeTowerHost", "EncoderCandidates", "backbone"]
