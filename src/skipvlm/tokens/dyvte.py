"""DyVTE: small learned routers that decide, per example, when the visual tokens leave.

``shared/METHODS.md`` §4. Before each candidate layer l a router reads [mean of the text tokens after
the image ; the last prompt token] (each rms-normalised) and predicts exit / keep. Training keeps the
model frozen: for a random layer l, the answer generated with visual tokens present is compared with
the one generated with them removed from l on; the label is "exit" when the answers agree on >= 99 %
of tokens and the answer's loss grows by at most 3 %. Only the routers learn (cross-entropy). At
inference an example exits at the first layer whose exit probability exceeds the threshold.

Routers are saved as ``dyvte_routers.safetensors`` beside ``dyvte_config.json`` (their config, the
signature of the model they were trained on, and the training report).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from skipvlm.arch import ArchFacts, arch_facts, visual_token_mask
from skipvlm.data.labels import IGNORE_INDEX
from skipvlm.io import atomic_files
from skipvlm.plan import Plan, PlanField, TokenExitMethod, fraction_value, register_token_exit
from skipvlm.tokens.exit import ExitRunner

__all__ = ["DyVTE", "DyVTEConfig", "DyVTERouters", "after_image", "router_features", "train_dyvte"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "dyvte_config.json"
WEIGHTS_NAME = "dyvte_routers.safetensors"
_FORMAT_VERSION = 1


@dataclass
class DyVTEConfig:
    """How DyVTE's routers are built and trained. Every field has a default."""

    layers: list[int] | None = field(
        default=None, metadata={"help": "candidate exit layers (default: 1..L-1 where the plan allows)"}
    )
    router_hidden: int = field(default=64, metadata={"help": "hidden size of each router's MLP"})
    agreement: float = field(default=0.99, metadata={"help": "token agreement that labels an exit"})
    loss_ratio: float = field(
        default=1.03, metadata={"help": "largest answer-loss ratio that labels an exit"}
    )
    layers_per_batch: int = field(default=2, metadata={"help": "random layers labelled per batch"})
    max_new_tokens: int = field(default=8, metadata={"help": "answer tokens generated for the agreement"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward while labelling"})
    steps: int = field(default=300, metadata={"help": "optimisation steps over the labelled features"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the routers"})
    seed: int = field(default=0, metadata={"help": "seed of the layer draws and the router init"})

    def __post_init__(self) -> None:
        for name in ("router_hidden", "layers_per_batch", "max_new_tokens", "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DyVTEConfig.{name} must be a positive integer, got {value!r}")
        if not 0 < self.agreement <= 1:
            raise ValueError(f"DyVTEConfig.agreement must be in (0, 1], got {self.agreement}")
        if not self.loss_ratio >= 1:
            raise ValueError(f"DyVTEConfig.loss_ratio must be >= 1, got {self.loss_ratio}")
        if not self.lr > 0:
            raise ValueError(f"DyVTEConfig.lr must be > 0, got {self.lr}")
        if self.layers is not None:
            layers = sorted(set(int(i) for i in self.layers))
            if not layers or layers[0] < 1:
                raise ValueError(
                    f"DyVTEConfig.layers must be non-empty layer indices >= 1, got {self.layers}"
                )
            self.layers = layers


def _signature(facts: ArchFacts) -> dict[str, Any]:
    return {"model_type": facts.model_type, "num_layers": facts.num_layers, "hidden_size": facts.hidden_size}


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def after_image(visual: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the real text tokens after each row's last visual token (none for text-only rows)."""
    positions = torch.arange(visual.shape[1], device=visual.device)
    last = torch.where(visual, positions, -1).max(dim=1).values  # (B,)
    return real & ~visual & (positions[None] > last[:, None]) & (last[:, None] >= 0)


def router_features(hidden: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(B, 2C) fp32: [rms(mean of ``after`` tokens) ; rms(last token)] of left-padded ``hidden`` (B, T, C).

    A row with no text after its image uses its last token for both halves.
    """
    h = hidden.float()
    weight = after.to(h.dtype)[..., None]  # (B, T, 1)
    count = weight.sum(1)  # (B, 1)
    last = h[:, -1]  # (B, C)
    mean = torch.where(count > 0, (h * weight).sum(1) / count.clamp_min(1), last)
    return torch.cat([_rms(mean), _rms(last)], dim=-1)


class DyVTERouters(nn.Module):
    """One small MLP per candidate layer, ``2C -> router_hidden -> 1`` (the exit logit).

    Args:
        hidden_size: C of the model.
        config: the :class:`DyVTEConfig` (its ``layers`` must be set).
        signature: the model the routers belong to (model type, layers, hidden size).
    """

    def __init__(self, hidden_size: int, config: DyVTEConfig, signature: dict[str, Any]):
        super().__init__()
        if not config.layers:
            raise ValueError("DyVTERouters needs config.layers, the candidate exit layers")
        self.config = config
        self.signature = dict(signature)
        self.report: dict[str, Any] = {}
        self.routers = nn.ModuleDict(
            {
                str(i): nn.Sequential(
                    nn.Linear(2 * hidden_size, config.router_hidden),
                    nn.GELU(),
                    nn.Linear(config.router_hidden, 1),
                )
                for i in config.layers
            }
        )

    @property
    def layers(self) -> list[int]:
        return sorted(int(i) for i in self.routers)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Exit logits (B,) of the router before ``layer``."""
        return self.routers[str(layer)](features.float()).squeeze(-1)

    def check_model(self, facts: ArchFacts) -> None:
        """Raise if these routers were trained for another model."""
        mine = _signature(facts)
        diff = {k: (self.signature.get(k), v) for k, v in mine.items() if self.signature.get(k) != v}
        if diff:
            named = ", ".join(f"{k}: routers {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"these DyVTE routers were trained for another model ({named}); train them on this one"
            )
        if self.layers[-1] >= facts.num_layers:
            raise ValueError(f"router layers {self.layers} exceed the model's {facts.num_layers} layers")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the routers (safetensors) and their config, atomically, to the folder ``path``."""
        meta = {
            "format_version": _FORMAT_VERSION,
            "config": asdict(self.config),
            "signature": self.signature,
            "report": self.report,
        }
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_files(path) as staging:
            save_file(state, str(staging / WEIGHTS_NAME))
            (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DyVTERouters:
        """Read routers written by :meth:`save`.

        Raises:
            FileNotFoundError: no router folder at ``path``.
            ValueError: the files are damaged or from a newer skipvlm.
        """
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"no DyVTE routers at {path} (expected {CONFIG_NAME} and {WEIGHTS_NAME}); train them with "
                "skipvlm.train_dyvte(..., output_dir=...) or `skipvlm train-dyvte`"
            )
        try:
            meta = json.loads((path / CONFIG_NAME).read_text())
            if meta.get("format_version") != _FORMAT_VERSION:
                raise ValueError(
                    f"format version {meta.get('format_version')!r} is not readable; upgrade skipvlm"
                )
            known = {f.name for f in fields(DyVTEConfig)}
            config = DyVTEConfig(**{k: v for k, v in meta["config"].items() if k in known})
            signature = meta["signature"]
            routers = cls(int(signature["hidden_size"]), config, signature)
            routers.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        except (KeyError, TypeError, RuntimeError, json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a readable DyVTE router folder: {e}") from None
        routers.report = meta.get("report", {})
        return routers.eval()


class DyVTE:
    """Runtime policy of ``Plan(dyvte=path, dyvte_threshold=p)``."""

    def __init__(self, routers: DyVTERouters, threshold: float):
        self.routers = routers
        self.threshold = threshold

    def keep(self, i: int, run: Any, hidden: torch.Tensor) -> torch.Tensor | None:
        if str(i) not in self.routers.routers:
            return None
        active = (run.visual & run.keep).any(1)  # (B,) rows that still hold visual tokens
        if not bool(active.any()):
            return None
        after = run.in_layout(after_image(run.visual, run.real))
        with torch.no_grad():
            prob = torch.sigmoid(self.routers(i, router_features(hidden, after)))
        leave = active & (prob > self.threshold)
        return ~(run.visual & leave[:, None])

    def watch(self, i: int, layer: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _router_folder(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(
            f"Plan.{name} must be the path of a router folder saved by skipvlm.train_dyvte, got {value!r}"
        )
    return str(value)


_LOADED: dict[tuple[str, int | None], DyVTERouters] = {}  # re-read a folder only when its weights change


def _runner(plan: Plan, facts: ArchFacts) -> ExitRunner:
    """Load (once) and check the plan's routers against the model and the plan's skips."""
    weights = Path(plan.dyvte) / WEIGHTS_NAME
    key = (plan.dyvte, weights.stat().st_mtime_ns if weights.is_file() else None)
    if key not in _LOADED:
        _LOADED[key] = DyVTERouters.load(plan.dyvte)
    routers = _LOADED[key]  # shared by every model that runs this folder; they never train here
    routers.check_model(facts)
    attends = [i for i in range(facts.num_layers) if i not in plan.skip_attention]
    if not attends or attends[0] >= routers.layers[0]:
        raise ValueError(
            f"the DyVTE routers may exit at layer {routers.layers[0]}, but no attention runs before it "
            "under this plan; keep an earlier attention or train routers for later layers"
        )
    return ExitRunner(lambda device: DyVTE(routers.to(device), plan.dyvte_threshold), facts)


def _macs(plan: Plan, visual_tokens: int, exit_layer: int | None) -> tuple[int, int]:
    """Per-example exits: counted only at a given (e.g. measured mean) exit layer."""
    return (exit_layer, visual_tokens) if exit_layer is not None else (None, 0)


METHOD = register_token_exit(
    TokenExitMethod(
        name="dyvte",
        fields=(
            PlanField("dyvte", None, _router_folder, "DyVTE: router folder from `skipvlm train-dyvte`"),
            PlanField("dyvte_threshold", 0.5, fraction_value, "DyVTE: exit probability to pass (0.5)", float),
        ),
        runner=_runner,
        exit_layer=lambda plan: None,
        macs=_macs,
        per_example=True,
    )
)


# --- training --------------------------------------------------------------------------------------


def _answer_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) mean cross-entropy of each row's supervised tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    loss = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T-1)
    supervised = (labels != IGNORE_INDEX).float()
    return (loss * supervised).sum(1) / supervised.sum(1).clamp_min(1)


def _greedy(model: nn.Module, batch: dict[str, torch.Tensor], new_tokens: int, pad: int) -> torch.Tensor:
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    new = out[:, batch["input_ids"].shape[1] :]
    return F.pad(new, (0, new_tokens - new.shape[1]), value=pad)  # (B, new_tokens)


@torch.no_grad()
def _label(
    model: nn.Module,
    examples: Sequence[Any],
    collator: Any,
    config: DyVTEConfig,
    base: Plan,
    progress: bool,
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(layer, router features, exit labels) per labelled batch, under the skip plan ``base``."""
    from skipvlm.runtime import use_plan
    from skipvlm.tokens.vtw import prompt_batches

    facts = arch_facts(model)
    layers = config.layers
    pad = collator.tokenizer.pad_token_id
    rng = random.Random(config.seed)
    device = next(model.parameters()).device
    samples = []
    chunks = [examples[s : s + config.batch_size] for s in range(0, len(examples), config.batch_size)]
    for chunk in tqdm(chunks, desc="DyVTE labels", disable=not progress):
        prompt = next(prompt_batches(model, chunk, collator, len(chunk)))
        full = {k: v.to(device) for k, v in collator(chunk, train=True).items()}
        visual = visual_token_mask(prompt["input_ids"], facts)
        rows = visual.any(1)
        if not bool(rows.any()):
            continue
        after = after_image(visual, prompt["attention_mask"].bool())
        with use_plan(model, base):
            states = model(**prompt, output_hidden_states=True).hidden_states  # input of layer l at [l]
            reference = _greedy(model, prompt, config.max_new_tokens, pad)
            loss_full = _answer_losses(model, full)
        for layer in rng.sample(layers, min(config.layers_per_batch, len(layers))):
            with use_plan(model, base.replace(visual_exit_layer=layer)):
                answer = _greedy(model, prompt, config.max_new_tokens, pad)
                loss_exit = _answer_losses(model, full)
            agree = (answer == reference).float().mean(1)
            label = (agree >= config.agreement) & (loss_exit <= config.loss_ratio * loss_full)
            samples.append(
                (layer, router_features(states[layer], after)[rows].cpu(), label[rows].float().cpu())
            )
    return samples


def train_dyvte(
    model: nn.Module,
    examples: Sequence[Any],
    collator: Any,
    config: DyVTEConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> DyVTERouters:
    """Train DyVTE routers on ``model`` (frozen) and, with ``output_dir``, save them there.

    The model runs under its current skip plan (adapters included), so the routers learn when the
    model that will serve can do without the image.

    Args:
        model: a supported multimodal model or an :class:`~skipvlm.EASModel`.
        examples: :class:`~skipvlm.data.ChatExample` s with images and answers.
        collator: a :class:`~skipvlm.data.ChatCollator` for the model's processor.
        config: the :class:`DyVTEConfig` (defaults if None).
        output_dir: folder to save the routers in (``Plan(dyvte=output_dir)`` then runs them).
        progress: show progress bars.

    Returns:
        The trained :class:`DyVTERouters`; ``routers.report`` holds the label counts and the fit.

    Raises:
        ValueError: the model is text-only, no example has an image, or no candidate layer is valid.
    """
    from skipvlm.runtime import current_plan

    config = config or DyVTEConfig()
    facts = arch_facts(model)
    if not facts.is_multimodal:
        raise ValueError(f"a {facts.model_type} model has no visual tokens to withdraw")
    if not examples:
        raise ValueError("train_dyvte() got no examples")
    plan = current_plan(model).skips_only()
    attends = [i for i in range(facts.num_layers) if i not in plan.skip_attention]
    layers = config.layers or list(range(1, facts.num_layers))
    bad = [i for i in layers if i >= facts.num_layers]
    if bad:
        raise ValueError(f"DyVTEConfig.layers {bad} are out of range for a {facts.num_layers}-layer model")
    layers = [i for i in layers if attends and attends[0] < i]
    if not layers:
        raise ValueError("no candidate layer has an attention below it; keep an early attention")
    config = replace(config, layers=layers)

    was_training = model.training
    model.eval()
    try:
        samples = _label(model, list(examples), collator, config, plan, progress)
    finally:
        model.train(was_training)
    if not samples:
        raise ValueError("no DyVTE training example has an image")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        routers = DyVTERouters(facts.hidden_size, config, _signature(facts))
    optimiser = torch.optim.AdamW(routers.parameters(), lr=config.lr, weight_decay=0.0)
    routers.train()
    loss = torch.tensor(0.0)
    for _ in tqdm(range(config.steps), desc="DyVTE routers", disable=not progress):
        logits = torch.cat([routers(layer, feats) for layer, feats, _ in samples])
        targets = torch.cat([labels for _, _, labels in samples])
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    routers.eval()
    with torch.no_grad():
        logits = torch.cat([routers(layer, feats) for layer, feats, _ in samples])
        targets = torch.cat([labels for _, _, labels in samples])
    per_layer: dict[str, list[int]] = {}
    for layer, _, labels in samples:
        counts = per_layer.setdefault(str(layer), [0, 0])
        counts[0] += int(labels.sum())
        counts[1] += labels.numel()
    routers.report = {
        "samples": int(targets.numel()),
        "exit_labels": int(targets.sum()),
        "exit_labels_per_layer": {k: {"exit": v[0], "total": v[1]} for k, v in sorted(per_layer.items())},
        "final_loss": float(loss.detach()),
        "train_accuracy": float(((logits > 0).float() == targets).float().mean()),
    }
    logger.info("DyVTE routers: %s", routers.report)
    if output_dir is not None:
        routers.save(output_dir)
    return routers
