"""Search and training runs (``shared/METHODS.md`` §3); with :mod:`skipvlm.train_loop`, all that knows ranks.

:func:`search` trains a weight-sharing supernet (adapters for every candidate module) while a
:class:`~skipvlm.search.Bandit` learns which k modules are safe to skip: warm-up epochs skip k arms
drawn uniformly; search epochs skip k arms drawn from the policy and, every ``interval`` micro-batches
(as the official code counts; with ``grad_accum=1`` a micro-batch is an optimiser step), score
``n_candidates`` subsets on a held-out batch (eval mode, no grad) and update the bandit.
:func:`train` fine-tunes the adapters of one fixed plan; :func:`fit` trains whatever requires grad.

All three run the one loop of :mod:`skipvlm.train_loop` (AdamW, warm-up + cosine schedule, gradient
accumulation and clipping, autocast, activation checkpointing, progress bars, atomic checkpoints from
which ``resume=True`` continues a killed run exactly); the search plugs its bandit into that loop's
step hooks, so a resumed search also continues the same bandit.

Multi-process: under ``torchrun`` / ``accelerate launch`` the loop averages gradients across ranks;
the search all-reduces its held-out losses so every rank updates the bandit identically (they draw
the same subsets from the same seed), and only rank 0 writes files. Nothing assumes a world size.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from skipvlm.arch import encoder_host
from skipvlm.eas import EASConfig, EASModel, get_eas_model
from skipvlm.io import atomic_write_text
from skipvlm.plan import Plan, uses_names
from skipvlm.plots import plot_preferences
from skipvlm.runinfo import run_info
from skipvlm.search import Bandit, Candidates
from skipvlm.train_loop import (
    Batches,
    Callback,
    Interrupted,
    Loop,
    Ranks,
    StepHooks,
    TrainConfig,
    check_positive,
    to_device,
)

__all__ = [
    "Interrupted",
    "SearchConfig",
    "SearchResult",
    "TrainConfig",
    "eas_config_for_plan",
    "fit",
    "search",
    "train",
]


@dataclass
class SearchConfig:
    """The redundancy search (METHODS §3).

    Args:
        k: modules to skip.
        candidates: ``attention`` (EAS), ``mlp``, ``attention_or_mlp`` or ``layer`` (DAS).
        warmup_epochs: epochs of uniformly random skips training the supernet.
        search_epochs: epochs of policy-driven skips with bandit updates.
        interval: micro-batches between bandit updates, counted as the official EAS code counts them
            (its data-loader iterations): with ``grad_accum=1`` every ``interval`` optimiser steps; with
            ``grad_accum=a`` every ``interval / a`` optimiser steps (the updates due within one step run
            after it, so ``interval < a`` gives several updates per step). Skips are drawn once per
            optimiser step.
        n_candidates: subsets scored per bandit update.
        beta / alpha / noise: the bandit's inverse temperature, step size and exploration noise.
        train: optimisation settings of the supernet (its ``epochs`` is not used).
    """

    k: int = field(default=4, metadata={"help": "modules to skip"})
    candidates: str = field(default="attention", metadata={"help": "attention, mlp, attention_or_mlp, layer"})
    warmup_epochs: int = field(default=5, metadata={"help": "epochs of uniform random skips"})
    search_epochs: int = field(default=5, metadata={"help": "epochs of bandit-driven skips"})
    interval: int = field(
        default=10,
        metadata={"help": "micro-batches between bandit updates (= optimiser steps when grad_accum is 1)"},
    )
    n_candidates: int = field(default=3, metadata={"help": "subsets scored per bandit update"})
    beta: float = field(default=10.0, metadata={"help": "policy inverse temperature"})
    alpha: float = field(default=2.0, metadata={"help": "preference step size"})
    noise: float = field(default=0.0, metadata={"help": "exploration noise eps (0: sample the policy)"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "supernet optimisation"})

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        Candidates(self.candidates, 1)  # validates the kind
        check_positive(self, "k", "search_epochs", "interval", "n_candidates")
        if self.warmup_epochs < 0:
            raise ValueError(f"SearchConfig.warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def check_against(self, num_layers: int, micro_batches_per_epoch: int, arms: int | None = None) -> None:
        """Raise early if ``k`` exceeds the candidates (``arms``; default: a decoder's) or ``interval`` the
        search phase (counted in micro-batches, this process's share)."""
        arms = Candidates(self.candidates, num_layers).num_arms if arms is None else arms
        if self.k > arms:
            raise ValueError(
                f"k={self.k} is larger than the {arms} {self.candidates!r} candidates of a "
                f"{num_layers}-layer model"
            )
        subsets = math.comb(arms, self.k)
        if self.n_candidates > subsets:
            raise ValueError(
                f"n_candidates={self.n_candidates} distinct subsets are scored per update, but only "
                f"{subsets} subset(s) of k={self.k} out of {arms} candidates exist; lower --n-candidates "
                "or --k"
            )
        search_batches = self.search_epochs * micro_batches_per_epoch
        if self.interval > search_batches:
            raise ValueError(
                f"interval={self.interval} is larger than the search phase ({search_batches} micro-batches = "
                f"{self.search_epochs} epochs x {micro_batches_per_epoch} micro-batches); lower it or search "
                "longer"
            )


def eas_config_for_plan(plan: Plan, candidates: str, template: Any = None) -> Any:
    """An :class:`EASConfig` (fixed plan, not a supernet) that skips what a searched ``plan`` skips (an
    encoder host's plan, naming sublayers, gives its :class:`~skipvlm.encoders.eas.EncoderEASConfig`)."""
    from skipvlm.encoders.eas import EncoderEASConfig, encoder_config_for_plan

    if uses_names(plan) or isinstance(template, EncoderEASConfig):  # an empty plan names nothing
        return encoder_config_for_plan(plan, candidates, template)
    cfg = copy.deepcopy(template) if template is not None else EASConfig()
    cfg.supernet, cfg.candidates = False, "attention"
    whole = sorted(set(plan.skip_attention) & set(plan.skip_mlp))
    if candidates == "layer":
        cfg.skip_layers, cfg.skip_attention, cfg.skip_mlp = whole, [], []
    else:
        cfg.skip_layers, cfg.skip_attention, cfg.skip_mlp = [], list(plan.skip_attention), list(plan.skip_mlp)
    return EASConfig.from_dict(cfg.to_dict())


def _eas_model(model: nn.Module, config: Callable[[], Any]) -> EASModel:
    """``model`` itself when it already runs plans with adapters (an EAS model), else ``model`` with fresh
    adapters from ``config()`` (None: the host's default adapters)."""
    # On the class: a wrapper that forwards unknown attributes to an EAS model inside is not one.
    if callable(getattr(type(model), "set_plan", None)):
        return model
    cfg = config()
    if cfg is None:
        cfg = _config_class(model)()
    return get_eas_model(model, cfg)


def _config_class(model: nn.Module) -> type:
    """The adapter configuration class of ``model``'s host (an encoder host has its own)."""
    encoder = encoder_host(model)
    return encoder.config_class if encoder is not None else EASConfig


def _candidates(model: nn.Module, kind: str) -> Any:
    """The candidate space of ``kind`` on ``model`` (an EAS model): a decoder's layers, or an encoder
    host's sublayers."""
    encoder = encoder_host(model)
    if encoder is not None:
        return encoder.candidates(kind, encoder.num_layers(model))
    return Candidates(kind, model.facts.num_layers)


# --- search -------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """What a search found: the plan of the top-k arms, the bandit, the preference trajectory."""

    plan: Plan
    arms: list[int]
    candidates: str
    bandit: Bandit
    trajectory: list[dict[str, Any]]
    model: EASModel = field(repr=False)

    def eas_config(self, template: EASConfig | None = None) -> EASConfig:
        """The fixed-plan :class:`EASConfig` to fine-tune the found plan with (fresh adapters)."""
        return eas_config_for_plan(self.plan, self.candidates, template)


def search(
    model: nn.Module,
    batches: Sequence[dict[str, Any]] | Iterable[dict[str, Any]],
    heldout: Iterable[dict[str, Any]],
    config: SearchConfig | None = None,
    eas: EASConfig | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    callback: Callback | None = None,
    data: str | None = None,
) -> SearchResult:
    """Find the k candidate modules that are safest to skip, training a supernet of adapters meanwhile.

    Args:
        model: a supported transformers model (adapters are injected in place), or an EAS supernet.
        batches: model-ready training batches with ``labels`` (a list, or a DataLoader).
        heldout: model-ready held-out batches for scoring candidate subsets (never trained on).
        config: the :class:`SearchConfig`.
        eas: adapter settings (dims, dropout ...); the supernet flags are set here. A BridgeTower model
            takes an :class:`~skipvlm.encoders.eas.EncoderEASConfig` (default: the host's).
        out: folder for ``plan.json``, ``search_log.json``, ``preferences.png`` and checkpoints.
        resume: continue from the checkpoint in ``out`` (a killed run ends as an uninterrupted one).
        callback: called after every optimiser step with ``{"step", "loss", "phase"}``.
        data: a fingerprint of the training data (the CLI passes the data file's digest); by default
            one is computed from in-memory batches. A resumed run must have the same.

    Returns:
        The :class:`SearchResult`.

    Raises:
        ValueError: k exceeds the candidates, the interval exceeds the search phase, no held-out data.
    """
    config = config or SearchConfig()
    tc = config.train
    eas_model = _eas_model(model, lambda: _supernet_config(config, eas, model))
    cands = _candidates(eas_model, config.candidates)
    ranks = Ranks(next(eas_model.parameters()).device)
    train_batches = Batches(batches, ranks, tc.shuffle, tc.seed)
    config.check_against(cands.num_layers, train_batches.count, cands.num_arms)
    held = list(heldout)
    held_local = [held[i] for i in ranks.shard(len(held))]
    if not held_local:
        raise ValueError("the search needs held-out batches to score subsets (at least one per process)")

    out_dir = Path(out) if out is not None else None
    epochs = config.warmup_epochs + config.search_epochs
    loop = Loop(eas_model, train_batches, tc, epochs, out_dir, "search")
    micro_batches = functools.partial(_micro_batches, train_batches.count, tc.grad_accum)
    warmup = config.warmup_epochs * loop.steps_per_epoch
    steps = _BanditSteps(eas_model, cands, config, held_local, warmup, micro_batches)
    loop.run({"search": asdict(config), "arms": cands.num_arms}, data, resume, steps, callback)

    arms = steps.bandit.top_k()
    plan = cands.plan(arms).replace(candidates=config.candidates)
    eas_model.set_plan(plan)
    eas_model.eval()
    result = SearchResult(plan, arms, config.candidates, steps.bandit, steps.trajectory, eas_model)
    if out_dir is not None and ranks.is_main:
        _write_search(result, cands, config, out_dir)
    return result


def _supernet_config(config: SearchConfig, eas: Any, model: nn.Module) -> Any:
    """``eas`` (or the host's default adapters) as a supernet over ``config.candidates``, nothing skipped."""
    cfg = copy.deepcopy(eas) if eas is not None else _config_class(model)()
    cfg.skip_attention, cfg.skip_mlp, cfg.skip_layers = [], [], []
    cfg.supernet, cfg.candidates = True, config.candidates
    return type(cfg).from_dict(cfg.to_dict())


def _micro_batches(per_epoch: int, grad_accum: int, steps: int) -> int:
    """Micro-batches consumed by the first ``steps`` optimiser steps (an epoch's last group may be short)."""
    steps_per_epoch = math.ceil(per_epoch / grad_accum)
    epochs, rest = divmod(steps, steps_per_epoch)
    return epochs * per_epoch + min(rest * grad_accum, per_epoch)


class _BanditSteps(StepHooks):
    """The search's part of each supernet step (METHODS §3): before it, the k arms the step skips (uniform
    in warm-up, from the policy after); after it, one bandit update from the held-out losses of
    ``n_candidates`` sampled subsets for every ``interval`` search-phase micro-batches completed in the
    step. Its checkpoint share: bandit, trajectory, evals."""

    def __init__(
        self,
        model: EASModel,
        cands: Candidates,
        config: SearchConfig,
        heldout: list[dict[str, Any]],
        warmup_steps: int,
        micro_batches: Callable[[int], int],
    ):
        self.model, self.cands, self.config, self.heldout = model, cands, config, heldout
        self.warmup_steps = warmup_steps
        self.micro_batches = micro_batches  # micro-batches consumed by the first n optimiser steps
        self.bandit = Bandit(
            cands.num_arms, config.k, config.beta, config.alpha, seed=config.train.seed, noise=config.noise
        )
        self.trajectory: list[dict[str, Any]] = [
            {"step": 0, "preferences": self.bandit.preferences.tolist(), "top_k": None}
        ]
        self.evals = 0  # held-out batches scored so far; the next one is heldout[evals % len]
        self.phase = "warmup"

    def before_step(self, loop: Loop) -> str:
        self.phase = "warmup" if loop.step < self.warmup_steps else "search"
        subset = self.bandit.uniform(1)[0] if self.phase == "warmup" else self.bandit.sample(1)[0]
        self.model.set_plan(self.cands.plan(subset))
        return self.phase

    def updates_due(self, step: int) -> int:
        """Bandit updates due after optimiser step ``step`` (1-based): search-phase micro-batches crossing
        multiples of ``interval`` in it (with ``grad_accum=1``: 1 when ``interval`` divides the search
        step)."""
        start = self.micro_batches(self.warmup_steps)
        done, before = self.micro_batches(step) - start, self.micro_batches(step - 1) - start
        return done // self.config.interval - max(before, 0) // self.config.interval

    def after_step(self, loop: Loop, loss: float) -> dict[str, str]:
        for _ in range(self.updates_due(loop.step) if self.phase == "search" else 0):
            subsets = self.bandit.sample(self.config.n_candidates)
            losses = self._score(loop, subsets)
            rewards = self.bandit.update(subsets, losses)
            self.trajectory.append(
                {
                    "step": loop.step,
                    "subsets": subsets,
                    "losses": losses,
                    "rewards": rewards,
                    "preferences": self.bandit.preferences.tolist(),
                    "top_k": self.bandit.top_k(),
                }
            )
        return {"phase": self.phase, "top_k": ",".join(map(str, self.bandit.top_k()))}

    def _score(self, loop: Loop, subsets: list[list[int]]) -> list[float]:
        """The held-out loss of each subset's plan on the next held-out batch, averaged over ranks."""
        batch = to_device(self.heldout[self.evals % len(self.heldout)], loop.device)
        self.evals += 1
        was_training = self.model.training
        self.model.eval()
        losses = []
        with torch.no_grad(), loop.autocast():
            for subset in subsets:
                self.model.set_plan(self.cands.plan(subset))
                losses.append(self.model(**batch).loss.float())
        self.model.train(was_training)
        return loop.ranks.mean(torch.stack(losses)).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"bandit": self.bandit.state_dict(), "trajectory": self.trajectory, "evals": self.evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bandit = Bandit.from_state_dict(state["bandit"])
        self.trajectory, self.evals = state["trajectory"], state["evals"]


def _write_search(result: SearchResult, cands: Candidates, config: SearchConfig, out: Path) -> None:
    result.plan.save(out / "plan.json")
    log = {
        "candidates": config.candidates,
        "k": config.k,
        "arms": result.arms,
        "arm_names": [cands.describe(a) for a in range(cands.num_arms)],
        "plan": result.plan.to_dict(),
        "config": asdict(config),
        "bandit": result.bandit.state_dict(),
        "trajectory": result.trajectory,
        "meta": run_info(*_device_dtype(result.model)),
    }
    atomic_write_text(out / "search_log.json", json.dumps(log, indent=1) + "\n")
    plot_preferences(
        [t["preferences"] for t in result.trajectory],
        [t["step"] for t in result.trajectory],
        log["arm_names"],
        out / "preferences.png",
    )


# --- train ----------------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    batches: Sequence[dict[str, Any]] | Iterable[dict[str, Any]],
    config: TrainConfig | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    callback: Callback | None = None,
    name: str = "fit",
    identity: dict[str, Any] | None = None,
    data: str | None = None,
) -> list[dict[str, float]]:
    """Train what ``model`` trains on ``batches`` (loss from their ``labels``).

    The loop behind :func:`train`; also what trains full fine-tunes, LoRA models and the toy model. What
    it trains and checkpoints: the model's ``trainable_state_dict()`` when it has one (with
    ``load_trainable_state_dict(state, source=...)``), else every parameter that requires grad.

    Args:
        model: any model whose forward returns ``.loss`` for a batch.
        batches: model-ready batches (a list, or a DataLoader).
        config: the :class:`TrainConfig` (``calibrate`` is not used here).
        out: folder for the ``{name}_checkpoint``.
        resume: continue from that checkpoint.
        callback: called after every optimiser step with ``{"step", "loss", "phase"}``.
        name: names the checkpoint folder and the progress bar.
        identity: settings a resumed checkpoint must match (the config is always included).
        data: a fingerprint of the training data (default: computed from in-memory batches).

    Returns:
        The loss history, one ``{"step", "loss", "lr"}`` per optimiser step.
    """
    config = config or TrainConfig()
    out_dir = Path(out) if out is not None else None
    ranks = Ranks(next(model.parameters()).device)
    loop = Loop(
        model, Batches(batches, ranks, config.shuffle, config.seed), config, config.epochs, out_dir, name
    )
    history = _History()
    loop.run({"train": asdict(config), **(identity or {})}, data, resume, history, callback)
    return history.steps


class _History(StepHooks):
    """:func:`fit`'s part of each step: the loss and learning rate, kept in the checkpoint."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def after_step(self, loop: Loop, loss: float) -> dict[str, str]:
        self.steps.append({"step": loop.step, "loss": loss, "lr": loop.lr_at(loop.step - 1)})
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["history"]


def train(
    model: nn.Module,
    batches: Sequence[dict[str, Any]] | Iterable[dict[str, Any]],
    config: TrainConfig | None = None,
    eas: EASConfig | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    callback: Callback | None = None,
    data: str | None = None,
) -> EASModel:
    """Fine-tune the adapters of one plan; then (by default) gather the static-merge calibration means.

    Args:
        model: a supported transformers model (fresh adapters from ``eas`` are injected), or an
            :class:`EASModel` to continue training (e.g. a search's supernet with its found plan).
        batches: model-ready training batches with ``labels`` (a list, or a DataLoader).
        config: the :class:`TrainConfig`.
        eas: the adapters and plan for a plain ``model`` (default: ``EASConfig()``, no skips; a BridgeTower
            model: ``EncoderEASConfig()``).
        out: folder for ``adapters/``, ``train_log.json`` and checkpoints.
        resume: continue from the checkpoint in ``out``.
        callback: called after every optimiser step with ``{"step", "loss", "phase"}``.
        data: a fingerprint of the training data (default: computed from in-memory batches).

    Returns:
        The trained :class:`EASModel` (in eval mode).
    """
    config = config or TrainConfig()
    eas_model = _eas_model(model, lambda: eas)
    identity = {"eas": eas_model.eas_config.to_dict()}
    history = fit(
        eas_model, batches, config, out, resume, callback, name="train", identity=identity, data=data
    )
    device = next(eas_model.parameters()).device
    ranks = Ranks(device)
    if config.calibrate and getattr(type(eas_model), "mergeable", True):  # the means serve merges only
        local = Batches(batches, ranks, shuffle=False, seed=config.seed).epoch(0)
        eas_model.calibrate((to_device(b, device) for b in local), progress=config.progress and ranks.is_main)
        _sync_calibration(eas_model, ranks)
    if out is not None and ranks.is_main:
        out_dir = Path(out)
        eas_model.save_pretrained(out_dir / "adapters")
        log = {"config": asdict(config), "eas": eas_model.eas_config.to_dict(), "history": history}
        log["meta"] = run_info(*_device_dtype(eas_model))
        atomic_write_text(out_dir / "train_log.json", json.dumps(log, indent=1) + "\n")
    return eas_model


def _sync_calibration(model: EASModel, procs: Ranks) -> None:
    """Make the calibration means the count-weighted mean over ranks, so every rank merges alike."""
    if not procs.active:
        return
    for module in model.adapters.modules():
        if not hasattr(module, "calib_n"):
            continue
        n = module.calib_n.to(torch.float64)
        total = procs.mean(n.clone()) * procs.world
        for name in ("calib_w", "calib_g"):
            buf = getattr(module, name, None)
            if buf is not None:
                weighted = procs.mean(buf.to(torch.float64) * n) * procs.world
                buf.copy_((weighted / total.clamp(min=1)).to(buf.dtype))
        module.calib_n.copy_(total.round().to(torch.long))


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    reference = next(model.parameters())
    return reference.device, reference.dtype
