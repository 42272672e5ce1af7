"""The BridgeTower host: the METER family's two-stream encoder, as one host entry (``shared/METHODS.md`` §7).

:class:`BridgeTowerHost` is registered as the ``bridgetower`` :class:`~skipvlm.arch.HostFamily`'s
``encoder``; :func:`skipvlm.apply_plan`, :func:`skipvlm.current_plan`, :func:`skipvlm.get_eas_model`,
:func:`skipvlm.search` and :func:`skipvlm.train` hand a BridgeTower model to it. It works on
``transformers.BridgeTowerModel`` and on any model holding one (the stock
``BridgeTowerForImageAndTextRetrieval``, the heads of :mod:`skipvlm.encoders.heads`, a PEFT wrapper):
each of the ``cross_modal_text_layers`` / ``cross_modal_image_layers`` becomes a
:class:`~skipvlm.encoders.layers.CoLayer` while a plan or adapters need it, and the stock layer again
when an empty plan is applied to a model without adapters.

Plans name sublayers ``"<stream>.<layer>.<self|cross>"`` in ``skip_attention`` and
``"<stream>.<layer>.ffn"`` in ``skip_mlp`` (:mod:`skipvlm.encoders.names`); integer indices, token
exit and merges are refused with the reason.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import BridgeTowerModel

from skipvlm.arch import HostFamily, register_host, unwrap
from skipvlm.encoders.layers import SUBLAYERS, CoLayer
from skipvlm.encoders.names import STREAMS, EncoderCandidates, check_names, whole_layers
from skipvlm.plan import CONFIG_KEY, Plan, name_key

__all__ = ["BridgeTowerHost", "backbone", "co_layers"]

logger = logging.getLogger(__name__)

_LAYER_LISTS = {"text": "cross_modal_text_layers", "image": "cross_modal_image_layers"}


def backbone(model: nn.Module) -> BridgeTowerModel:
    """The ``BridgeTowerModel`` of ``model`` (itself, or the one a head model or wrapper holds).

    Raises:
        ValueError: there is none.
    """
    target = unwrap(model)
    if isinstance(target, BridgeTowerModel):
        return target
    found = next((m for m in target.modules() if isinstance(m, BridgeTowerModel)), None)
    if found is None:
        raise ValueError(
            f"{type(model).__name__} holds no transformers BridgeTowerModel; pass BridgeTowerModel or a head "
            "model built on it"
        )
    return found


def co_layers(model: nn.Module, stream: str) -> nn.ModuleList:
    """The co-attention layers of ``stream`` (``text`` or ``image``)."""
    return getattr(backbone(model), _LAYER_LISTS[stream])


class BridgeTowerHost:
    """Plans, adapters, search candidates and MACs for BridgeTower models (the ``encoder`` of its
    :class:`~skipvlm.arch.HostFamily`)."""

    model_type = "bridgetower"

    def num_layers(self, model_or_config: Any) -> int:
        """L, the co-attention layers per stream."""
        config = getattr(unwrap(model_or_config), "config", model_or_config)
        return int(config.num_hidden_layers)

    def validate(self, plan: Plan, num_layers: int) -> None:
        """Raise ValueError for a plan this host cannot run: indices instead of names, unknown sublayers,
        layers out of range, or visual-token exit."""
        check_names(plan, num_layers)
        if plan.exits_tokens:
            raise ValueError(
                "visual-token exit (VTW, FastV, DyVTE) withdraws image tokens from a decoder's sequence; a "
                "two-stream encoder keeps its image stream, so token exit is not available on BridgeTower"
            )

    # --- plans ---------------------------------------------------------------------------------------

    def apply_plan(self, model: nn.Module, plan: Plan) -> nn.Module:
        """Make ``model`` execute ``plan`` in place (see :func:`skipvlm.apply_plan`); returns ``model``.

        Raises:
            TypeError: ``plan`` is not a :class:`Plan`.
            ValueError: the plan names indices, unknown sublayers or layers out of range, or needs an
                adapter the model lacks; nothing changes then.
        """
        if not isinstance(plan, Plan):
            raise TypeError(f"apply_plan needs a skipvlm.Plan, got {type(plan).__name__}")
        core = backbone(model)
        num_layers = self.num_layers(core)
        self.validate(plan, num_layers)
        whole = set(whole_layers(plan, num_layers))
        skipped: dict[tuple[str, int], set[str]] = {}
        for name in (*plan.skip_attention, *plan.skip_mlp):
            stream, layer, kind = name_key(name)
            skipped.setdefault((stream, layer), set()).add(kind)
        wanted = []
        for stream in STREAMS:
            layers = getattr(core, _LAYER_LISTS[stream])
            for i, layer in enumerate(layers):
                skips = frozenset(skipped.get((stream, i), ()))
                held = layer.held if isinstance(layer, CoLayer) else None
                das = i in whole and held is not None and held.has_das
                wanted.append((layers, i, layer, skips, das))
        # Check every layer before changing any, so a refused plan leaves the model as it was.
        for _, _, layer, skips, das in wanted:
            if isinstance(layer, CoLayer):
                layer.check_skips(skips, das)
        for layers, i, layer, skips, das in wanted:
            if not isinstance(layer, CoLayer):
                if not skips:
                    continue
                layer = CoLayer(layer, "text" if layers is core.cross_modal_text_layers else "image", i)
                layers[i] = layer
            layer.set_skips(skips, das)
            if layer.is_stock:
                layers[i] = layer.unwrap()
        for config in {id(c): c for c in (core.config, unwrap(model).config)}.values():
            if plan.is_empty:
                config.__dict__.pop(CONFIG_KEY, None)
            else:
                setattr(config, CONFIG_KEY, plan.to_dict())
        logger.debug("applied %s to %s", plan, type(model).__name__)
        return model

    def current_plan(self, model: nn.Module) -> Plan:
        """The plan ``model`` executes now (an empty plan for a stock model)."""
        core = backbone(model)
        attention, ffn = [], []
        for stream in STREAMS:
            for layer in getattr(core, _LAYER_LISTS[stream]):
                if isinstance(layer, CoLayer):
                    names = [f"{stream}.{layer.index}.{k}" for k in SUBLAYERS if k in layer.skips]
                    attention += [n for n in names if not n.endswith(".ffn")]
                    ffn += [n for n in names if n.endswith(".ffn")]
        return Plan(skip_attention=attention, skip_mlp=ffn)

    def wrap_all(self, model: nn.Module) -> list[CoLayer]:
        """Every co-attention layer as a :class:`CoLayer` (wrapping the stock ones), text stream first."""
        core = backbone(model)
        out = []
        for stream in STREAMS:
            layers = getattr(core, _LAYER_LISTS[stream])
            for i, layer in enumerate(layers):
                if not isinstance(layer, CoLayer):
                    layers[i] = layer = CoLayer(layer, stream, i)
                out.append(layer)
        return out

    # --- what other parts of skipvlm ask of a host ------------------------------------------------------

    def candidates(self, kind: str, num_layers: int) -> EncoderCandidates:
        """The search's candidate space of ``kind`` (``attention``: EAS; ``layer``: DAS)."""
        return EncoderCandidates(kind, num_layers)

    @property
    def config_class(self) -> type:
        """The adapter configuration of this host (:class:`~skipvlm.encoders.eas.EncoderEASConfig`)."""
        from skipvlm.encoders.eas import EncoderEASConfig

        return EncoderEASConfig

    def eas_model(self, model: nn.Module, config: Any = None) -> nn.Module:
        """``model`` with EAS adapters (:func:`skipvlm.encoders.eas.get_encoder_eas_model`)."""
        from skipvlm.encoders.eas import get_encoder_eas_model

        return get_encoder_eas_model(model, config)

    def load_eas_model(self, model: nn.Module, path: Any) -> nn.Module:
        """``model`` with the EAS adapters saved in ``path``
        (:meth:`skipvlm.encoders.eas.EncoderEASModel.from_pretrained`)."""
        from skipvlm.encoders.eas import EncoderEASModel

        return EncoderEASModel.from_pretrained(model, path)


HOST = BridgeTowerHost()
register_host(
    HostFamily(
        "bridgetower",
        "BridgeTowerModel",
        description="BridgeTowerModel and heads on it (METER-style two-stream encoder)",
        encoder=HOST,
    )
)
