"""LoRA (the PEFT library) on a planned model: which projections to adapt.

A plan's skipped modules never run, so LoRA weights put there get no gradient and only cost memory
and optimizer state; and the usual name list (``["q_proj", "v_proj"]``) also matches the vision tower
of a LLaVA-style model, whose encoder layers use the same names. :func:`lora_target_modules` returns
a PEFT ``target_modules`` pattern that names the text model's projections that run under the plan,
and nothing else. (PEFT's ``layers_to_transform`` cannot do this: it selects layers by index in every
``layers`` list, the vision encoder's included, and by layer, not by module.)

The PEFT flow: plan, then LoRA, train, ``merge_and_unload``, ``save_pretrained``; the plan travels in the
config, so :func:`skipvlm.load_pretrained` runs the saved model under it again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from skipvlm.arch import arch_facts, get_layers, unwrap
from skipvlm.plan import Plan
from skipvlm.runtime import current_plan

__all__ = ["ALL_PROJECTIONS", "DEFAULT_MODULES", "lora_target_modules"]

DEFAULT_MODULES = ("q_proj", "v_proj")  # PEFT's own default for Llama-style models
# Every linear layer of a decoder layer (what the demo and the benchmarks adapt).
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_modules(
    model: nn.Module, modules: Sequence[str] = DEFAULT_MODULES, plan: Plan | None = None
) -> str:
    """A PEFT ``target_modules`` pattern: the text model's ``modules`` that run under ``plan``.

    Use it as ``LoraConfig(target_modules=lora_target_modules(model), r=8)``; PEFT matches a string
    against each module's full name. Attention projections of layers whose attention is skipped, MLP
    projections of layers whose MLP is skipped and every module outside the decoder layers (vision
    tower, projector, LM head) are left out.

    Args:
        model: a supported model (or a wrapper with ``get_base_model()``); the pattern names modules as
            ``model.named_modules()`` of the unwrapped model does, which is what PEFT matches.
        modules: the projection names to adapt, e.g. :data:`ALL_PROJECTIONS`.
        plan: the plan the model will run (default: the one it runs now, :func:`skipvlm.current_plan`).

    Returns:
        A regular expression that matches exactly the chosen modules' full names.

    Raises:
        ValueError: a name in ``modules`` is no linear layer of the decoder layers (the message lists
            the ones there are), or the plan leaves nothing of them to adapt.
    """
    base = unwrap(model)
    facts = arch_facts(base)
    plan = current_plan(base) if plan is None else plan
    plan.validate_for(facts.num_layers)
    wanted = set(modules)
    seen: set[str] = set()
    layers_of: dict[str, list[int]] = {}  # module name inside a layer -> layers where it runs
    for i, layer in enumerate(get_layers(base, facts)):
        for name, module in layer.named_modules():
            path = name.split(".")
            if "base_layer" in path or any(p.startswith("lora_") for p in path):
                continue  # the inside of a LoRA layer already there
            if not isinstance(getattr(module, "base_layer", module), nn.Linear):
                continue
            seen.add(path[-1])
            if path[-1] not in wanted:
                continue
            owner = name.split(".", 1)[0]
            if (owner == facts.attention_name and i in plan.skip_attention) or (
                owner == facts.mlp_name and i in plan.skip_mlp
            ):
                continue
            layers_of.setdefault(name, []).append(i)
    unknown = sorted(wanted - seen)
    if unknown:
        raise ValueError(
            f"no linear layer named {unknown} in the decoder layers of this {facts.model_type} model; "
            f"they have {sorted(seen)}"
        )
    if not layers_of:
        raise ValueError(f"{plan} skips every module named {sorted(wanted)}; there is nothing to adapt")
    prefix = re.escape(f"{facts.decoder_path}.layers.")
    by_layers: dict[tuple[int, ...], list[str]] = {}  # same layer set -> one alternative
    for name, layers in sorted(layers_of.items()):
        by_layers.setdefault(tuple(layers), []).append(re.escape(name))
    parts = [
        f"{prefix}(?:{'|'.join(map(str, layers))})\\.(?:{'|'.join(names)})"
        for layers, names in sorted(by_layers.items())
    ]
    return "|".join(parts) if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)
