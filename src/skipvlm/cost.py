"""Analytic multiply-accumulate (MAC) counts per module for a plan and a prompt (``shared/METHODS.md`` §5).

Counted from the config alone, so a 7B-shaped model costs nothing to account for:

* attention: ``2 C^2 + 2 C C_kv`` per token (q, o and k, v; ``C_kv = kv_heads * head_dim``) plus
  ``2 N^2 C`` for scores and values over a sequence of N tokens (causal masking ignored);
* MLP: ``3 C F`` per token;
* lm_head: ``C V`` per scored token;
* the vision tower (CLIP-style: patch embedding, attention, two-layer MLP) and the LLaVA projector by
  the same rules.

Two conventions (METHODS §5): ``full`` (the default) counts everything above; ``paper`` leaves out the
``N^2`` score / value terms of every attention, the decoder's and the vision tower's, as the EAS paper's
fvcore-style counts do (4 C^2 N per MHA of LLaMA-7B: 50 GMACs at N = 749), so its shares compare with
the paper's tables (8.0 % / 12.0 % for 8 / 12 skipped MHAs of LLaVA-1.5-7B at 749 tokens).

A plan removes the attention and / or MLP terms of the layers it skips, and from its visual-token exit
layer on, the layers run on the tokens that remain (VTW: text only; FastV: text plus the kept visual
tokens; DyVTE: text only from the ``exit_layer`` given, since its exit is decided per example).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from skipvlm.arch import arch_facts
from skipvlm.plan import Plan

__all__ = ["CONVENTIONS", "CostReport", "count_macs", "decode_bytes"]

CONVENTIONS = ("full", "paper")


@dataclass
class CostReport:
    """MACs per module of one forward over a prompt.

    Attributes:
        layers: per decoder layer, the tokens it runs on and its ``{"attention_proj", "attention_sdp",
            "mlp"}`` MACs.
        visual_tokens: visual tokens among the prompt's.
        vision / projector / lm_head / extra: the other modules' MACs (``extra``: e.g. unmerged adapters).
    """

    prompt_tokens: int
    layers: list[dict[str, int]]
    vision: int = 0
    projector: int = 0
    lm_head: int = 0
    extra: int = 0
    plan: Plan = field(default_factory=Plan)
    visual_tokens: int = 0
    convention: str = "full"

    @property
    def attention(self) -> int:
        return sum(layer["attention_proj"] + layer["attention_sdp"] for layer in self.layers)

    @property
    def mlp(self) -> int:
        return sum(layer["mlp"] for layer in self.layers)

    @property
    def total(self) -> int:
        return self.attention + self.mlp + self.vision + self.projector + self.lm_head + self.extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "convention": self.convention,
            "visual_tokens": self.visual_tokens,
            "plan": self.plan.to_dict(),
            "total": self.total,
            "attention": self.attention,
            "mlp": self.mlp,
            "vision": self.vision,
            "projector": self.projector,
            "lm_head": self.lm_head,
            "extra": self.extra,
            "layers": self.layers,
        }


def count_macs(
    model_or_config: nn.Module | PretrainedConfig,
    prompt_tokens: int,
    plan: Plan | None = None,
    images: int | None = None,
    scored_tokens: int = 1,
    extra_per_token: int = 0,
    image_patches: int = 1024,
    visual_tokens: int | None = None,
    exit_layer: int | None = None,
    convention: str = "full",
    mlp_replacement: int = 0,
) -> CostReport:
    """MACs of one prefill forward over ``prompt_tokens`` tokens (visual tokens included).

    Args:
        model_or_config: a supported model or its config.
        prompt_tokens: N, the decoder's sequence length.
        plan: what is skipped (default: nothing).
        images: images in the prompt, each run through the vision tower (default: 1 for a multimodal
            model, 0 otherwise).
        scored_tokens: positions the lm_head scores (1 for generation's prefill).
        extra_per_token: MACs per token of modules outside the stock model (e.g. unmerged adapters).
        image_patches: patches per image at the vision tower's patch size (default 1024: a 448x448
            image at 14 px, 512x512 at Qwen3-VL's 16 px) for the families whose token count follows
            the image: Qwen2-VL / Qwen3-VL and Pixtral (Mistral 3) merge them 2x2; the tiling
            families (LLaVA-NeXT / OneVision, InternVL, Idefics3 / SmolVLM) cover them with tiles of
            the tower's size. LLaVA-1.5 ignores it.
        visual_tokens: visual tokens among the ``prompt_tokens`` (default: what ``images`` images
            give by the family's rule in ``hosts.py``: (image_size / patch_size)^2 each for LLaVA,
            image_patches / 4 for Qwen2-VL and Qwen3-VL).
        exit_layer: DyVTE only: the layer its visual tokens left at (e.g. a measured
            :func:`skipvlm.exit_layers`); without it a DyVTE plan is counted as keeping them.
        convention: ``"full"`` (with the attention's ``N^2`` terms) or ``"paper"`` (without them, in the
            decoder and the vision tower: the EAS paper's counts).
        mlp_replacement: MACs per token of what runs in each skipped MLP's place (counted as that
            layer's ``mlp``): 0 for the plain skip; a merged FFN-PIA's ``2 * C * d_r``
            (:meth:`skipvlm.EASConfig.mlp_replacement_macs`).

    Raises:
        ValueError: more visual tokens than prompt tokens, or an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    sdp = convention == "full"
    facts = arch_facts(model_or_config)
    plan = plan or Plan()
    plan.validate_for(facts.num_layers)
    config = getattr(model_or_config, "config", model_or_config)
    c, f, n = facts.hidden_size, facts.intermediate_size, prompt_tokens
    c_kv = facts.num_key_value_heads * facts.head_dim
    c_q = facts.num_attention_heads * facts.head_dim
    images = (1 if facts.is_multimodal else 0) if images is None else images
    if visual_tokens is None:
        rule = facts.family.visual_tokens
        visual_tokens = rule(config, images, image_patches) if rule is not None else 0
    if visual_tokens > n:
        raise ValueError(
            f"{visual_tokens} visual tokens do not fit in a {n}-token prompt; raise prompt_tokens (it counts "
            "the visual tokens) or pass visual_tokens"
        )
    start, dropped = facts.num_layers, 0  # from layer `start` on, `dropped` visual tokens are gone
    if plan.token_exit is not None:
        start, dropped = plan.token_exit.macs(plan, visual_tokens, exit_layer)
        start = facts.num_layers if start is None else start
    window = getattr(facts.text_config, "sliding_window", None)
    # a merged model may run a smaller module in an MLP's place (a merged FFN-PIA): count what runs
    own_mlp = _mlp_macs_per_token(model_or_config, facts)
    layers = []
    for i in range(facts.num_layers):
        attn = i not in plan.skip_attention
        mlp = i not in plan.skip_mlp
        m = n - dropped if i >= start else n
        # a sliding-window layer's queries see at most `window` keys each (Mistral, Gemma 3's local layers)
        keys = min(m, window) if window and facts.layer_types[i] == "sliding_attention" else m
        layers.append(
            {
                "tokens": m,
                "attention_proj": m * (2 * c * c_q + 2 * c * c_kv) if attn else 0,
                "attention_sdp": 2 * m * keys * c_q if attn and sdp else 0,
                "mlp": m * own_mlp.get(i, 3 * c * f) if mlp else m * mlp_replacement,
            }
        )
    report = CostReport(
        n, layers, lm_head=scored_tokens * c * facts.vocab_size, plan=plan, extra=n * extra_per_token
    )
    report.visual_tokens, report.convention = visual_tokens, convention
    if facts.family.vision_macs is not None and images:
        report.vision, report.projector = facts.family.vision_macs(config, images, image_patches, sdp)
    return report


def _mlp_macs_per_token(model_or_config: nn.Module | PretrainedConfig, facts: Any) -> dict[int, int]:
    """Per layer whose MLP slot holds a module that states its own cost (``macs_per_token()``, e.g. a
    merged FFN-PIA's :class:`~skipvlm.merge.AffineMLP`), that cost; a config has none."""
    if not isinstance(model_or_config, nn.Module):
        return {}
    from skipvlm.arch import get_layers

    own = {}
    for i, layer in enumerate(get_layers(model_or_config, facts)):
        rule = getattr(getattr(layer, facts.mlp_name, None), "macs_per_token", None)
        if rule is not None:
            own[i] = int(rule())
    return own


def decode_bytes(model: nn.Module, plan: Plan | None = None, context_tokens: int = 0) -> int:
    """Bytes one decoded token reads: the weights that run (every decoder weight of a kept module, the
    final norm and the lm_head; one embedding row) plus the KV cache of ``context_tokens`` tokens.

    The decode roofline: on a memory-bound device, decode time is proportional to this.
    """
    from skipvlm.arch import get_layers

    facts = arch_facts(model)
    plan = plan or Plan()
    layers = get_layers(model, facts)
    total = 0
    for i, layer in enumerate(layers):
        for name, module in layer.named_children():
            if (name == facts.attention_name and i in plan.skip_attention) or (
                name == facts.mlp_name and i in plan.skip_mlp
            ):
                continue
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    head = model.get_output_embeddings()
    total += sum(p.numel() * p.element_size() for p in head.parameters())
    embed = model.get_input_embeddings().weight
    total += embed.shape[1] * embed.element_size()
    kept = facts.num_layers - len(plan.skip_attention)
    kv_per_token = 2 * facts.num_key_value_heads * facts.head_dim * embed.element_size()
    return total + kept * kv_per_token * context_tokens
