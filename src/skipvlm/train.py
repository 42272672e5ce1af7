"""Search and training loops (``shared/METHODS.md`` §3): the only place in skipvlm that knows about ranks.

:func:`search` trains a weight-sharing supernet (adapters for every candidate module) while a
:class:`~skipvlm.search.Bandit` learns which k modules are safe to skip: warm-up epochs skip k arms
drawn uniformly; search epochs skip k arms drawn from the policy and, every ``interval`` steps, score
``n_candidates`` subsets on a held-out batch (eval mode, no grad) and update the bandit.
:func:`train` fine-tunes the adapters of one fixed plan.

Both loops use AdamW with a linear warm-up and cosine decay, gradient accumulation and clipping,
autocast (bf16 / fp16) where the device supports it, optional activation checkpointing, progress bars,
and atomic checkpoints every N steps from which ``resume=True`` continues a killed run exactly (same
data order, same random state, same bandit).

Multi-process: under ``torchrun`` / ``accelerate launch`` the loops join the process group the
launcher describes (gloo on CPU, nccl on GPU), give each rank its share of the batches, average
gradients across ranks after every accumulation (data parallel, as DDP does), all-reduce the held-out
losses so every rank updates the bandit identically (they draw the same subsets from the same seed),
and write files on rank 0 only. Nothing assumes a world size.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from skipvlm.eas import EASConfig, EASModel, get_eas_model
from skipvlm.io import atomic_dir, atomic_write_text, recover_dir
from skipvlm.plan import Plan
from skipvlm.plots import plot_preferences
from skipvlm.search import Bandit, Candidates

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

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Callback = Callable[[dict[str, Any]], None]


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass
class TrainConfig:
    """Optimisation settings of a training run (also the supernet's, inside :class:`SearchConfig`).

    Args:
        epochs: passes over the training batches (:func:`train` only; a search runs
            ``warmup_epochs + search_epochs``).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the steps with a linear learning-rate warm-up (then cosine decay to 0).
        grad_accum: micro-batches per optimiser step.
        max_grad_norm: gradient clipping norm (0 disables clipping).
        precision: ``auto`` (bf16 autocast on a GPU that supports it, else fp32), ``fp32``, ``bf16``
            or ``fp16`` (GPU, with loss scaling).
        gradient_checkpointing: recompute layer activations in the backward pass to save memory.
        checkpoint_every: save a resumable checkpoint every N optimiser steps (0: only at the end and on
            Ctrl-C); only when the run has an ``out`` folder.
        shuffle: reshuffle a list of batches every epoch (seeded; other iterables keep their order).
        seed: seed of the shuffling and of the torch random state (dropout).
        calibrate: after :func:`train`, gather the router means the static merge needs.
        progress: show progress bars.
    """

    epochs: int = field(default=3, metadata={"help": "passes over the training batches"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps with linear lr warm-up"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    precision: str = field(default="auto", metadata={"help": "auto, fp32, bf16 or fp16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations"})
    checkpoint_every: int = field(
        default=200, metadata={"help": "checkpoint every N steps (0: only at the end and on Ctrl-C)"}
    )
    shuffle: bool = field(default=True, metadata={"help": "reshuffle a list of batches every epoch"})
    seed: int = field(default=0, metadata={"help": "seed of shuffling and dropout"})
    calibrate: bool = field(default=True, metadata={"help": "gather router means for the static merge"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        _check_positive(self, "epochs", "grad_accum")
        for name in ("lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.checkpoint_every < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig.checkpoint_every, max_grad_norm and weight_decay must be >= 0")


@dataclass
class SearchConfig:
    """The redundancy search (METHODS §3).

    Args:
        k: modules to skip.
        candidates: ``attention`` (EAS), ``mlp``, ``attention_or_mlp`` or ``layer`` (DAS).
        warmup_epochs: epochs of uniformly random skips training the supernet.
        search_epochs: epochs of policy-driven skips with bandit updates.
        interval: optimiser steps between bandit updates.
        n_candidates: subsets scored per bandit update.
        beta / alpha / noise: the bandit's inverse temperature, step size and exploration noise.
        train: optimisation settings of the supernet (its ``epochs`` is not used).
    """

    k: int = field(default=4, metadata={"help": "modules to skip"})
    candidates: str = field(default="attention", metadata={"help": "attention, mlp, attention_or_mlp, layer"})
    warmup_epochs: int = field(default=5, metadata={"help": "epochs of uniform random skips"})
    search_epochs: int = field(default=5, metadata={"help": "epochs of bandit-driven skips"})
    interval: int = field(default=10, metadata={"help": "steps between bandit updates"})
    n_candidates: int = field(default=3, metadata={"help": "subsets scored per bandit update"})
    beta: float = field(default=10.0, metadata={"help": "policy inverse temperature"})
    alpha: float = field(default=2.0, metadata={"help": "preference step size"})
    noise: float = field(default=0.0, metadata={"help": "exploration noise eps (0: sample the policy)"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "supernet optimisation"})

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        Candidates(self.candidates, 1)  # validates the kind
        _check_positive(self, "k", "search_epochs", "interval", "n_candidates")
        if self.warmup_epochs < 0:
            raise ValueError(f"SearchConfig.warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def check_against(self, num_layers: int, steps_per_epoch: int) -> None:
        """Raise early if ``k`` exceeds the candidates or ``interval`` the search phase."""
        arms = Candidates(self.candidates, num_layers).num_arms
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
        search_steps = self.search_epochs * steps_per_epoch
        if self.interval > search_steps:
            raise ValueError(
                f"interval={self.interval} is larger than the search phase ({search_steps} steps = "
                f"{self.search_epochs} epochs x {steps_per_epoch} steps); lower it or search longer"
            )


def eas_config_for_plan(plan: Plan, candidates: str, template: EASConfig | None = None) -> EASConfig:
    """An :class:`EASConfig` (fixed plan, not a supernet) that skips what a searched ``plan`` skips."""
    cfg = copy.deepcopy(template) if template is not None else EASConfig()
    cfg.supernet, cfg.candidates = False, "attention"
    whole = sorted(set(plan.skip_attention) & set(plan.skip_mlp))
    if candidates == "layer":
        cfg.skip_layers, cfg.skip_attention, cfg.skip_mlp = whole, [], []
    else:
        cfg.skip_layers, cfg.skip_attention, cfg.skip_mlp = [], list(plan.skip_attention), list(plan.skip_mlp)
    return EASConfig.from_dict(cfg.to_dict())


# --- processes ----------------------------------------------------------------------------------------


class _Dist:
    """The process group the launcher set up (``torchrun`` env vars), or a single process."""

    def __init__(self, device: torch.device):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over ranks (in place for tensors on the process group's device)."""
        if not self.active:
            return value
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value.div_(self.world)

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.active:
            dist.barrier()

    def shard(self, n: int) -> list[int]:
        """The indices of ``n`` items this rank handles (the same count on every rank; a remainder drops)."""
        usable = n - n % self.world
        return list(range(self.rank, usable, self.world))


# --- the loop ---------------------------------------------------------------------------------------


class _Batches:
    """This rank's share of the batches, in a seeded per-epoch order for a list, as given otherwise."""

    def __init__(self, batches: Iterable[dict[str, Any]], procs: _Dist, shuffle: bool, seed: int):
        if not hasattr(batches, "__len__"):
            raise TypeError(
                "the training batches need a length (a list or a DataLoader), got "
                f"{type(batches).__name__}; pass list(batches)"
            )
        self.batches, self.procs, self.shuffle, self.seed = batches, procs, shuffle, seed
        self.indexable = isinstance(batches, Sequence)
        self.count = len(procs.shard(len(batches)))
        if self.count == 0:
            raise ValueError(
                f"{len(batches)} batch(es) cannot feed {procs.world} processes; give at least one each"
            )

    def epoch(self, epoch: int) -> Iterable[dict[str, Any]]:
        if self.indexable:
            order = list(range(len(self.batches)))
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(len(order), generator=gen).tolist()
            return (self.batches[order[i]] for i in self.procs.shard(len(order)))
        mine = set(self.procs.shard(len(self.batches)))
        return (b for i, b in enumerate(self.batches) if i in mine)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Loop:
    """Optimiser, schedule, autocast, gradient sync and resumable checkpoints of one run."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        steps_per_epoch: int,
        epochs: int,
        out: Path | None,
        name: str,
    ):
        self.model, self.cfg = model, cfg
        self.device = next(model.parameters()).device
        self.procs = _Dist(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = int(cfg.warmup_ratio * self.total_steps)
        self.step = 0
        self.checkpoint_dir = out / f"{name}_checkpoint" if out is not None else None
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        if cfg.gradient_checkpointing:
            base = model.base_model if isinstance(model, EASModel) else model
            enable = (
                getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
            )
            enable()

    def _autocast_dtype(self) -> torch.dtype | None:
        p, dev = self.cfg.precision, self.device.type
        if p == "auto":
            return torch.bfloat16 if dev == "cuda" and torch.cuda.is_bf16_supported() else None
        if p == "fp16" and dev != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on this device")
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.cfg.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))

    def backward(self, batch: dict[str, Any]) -> float:
        try:
            with self.autocast():
                loss = self.model(**_to(batch, self.device)).loss
        except torch.OutOfMemoryError as err:
            shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else "?"
            raise RuntimeError(
                f"out of memory on a batch of shape {shape} (batch size x tokens) at step {self.step}: lower "
                "the batch size and raise TrainConfig.grad_accum (--grad-accum) to keep the effective batch, "
                "or turn on gradient_checkpointing / precision='bf16'"
            ) from err
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {self.step}; lower TrainConfig.lr or use fp32"
            )
        scaled = loss / self.cfg.grad_accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return float(loss.detach())

    def update(self) -> None:
        if self.procs.active:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.procs.mean(p.grad)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def position(self) -> tuple[int, int]:
        """(epoch, optimiser step within the epoch) of the next step."""
        return divmod(self.step, self.steps_per_epoch)

    def groups(self, batches: _Batches, epoch: int) -> Iterable[list[dict[str, Any]]]:
        """The epoch's micro-batches in groups of ``grad_accum``, from the resume position on."""
        start = self.step - epoch * self.steps_per_epoch
        group: list[dict[str, Any]] = []
        index = 0
        for batch in batches.epoch(epoch):
            group.append(batch)
            if len(group) == self.cfg.grad_accum:
                if index >= start:
                    yield group
                index, group = index + 1, []
        if group and index >= start:
            yield group

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, extra: dict[str, Any]) -> None:
        """Write a resumable checkpoint (rank 0; atomic: the folder is replaced whole)."""
        if self.checkpoint_dir is None or not self.procs.is_main:
            return
        tensors = {
            f"model.{k}": v.detach().contiguous().cpu() for k, v in _trainable_state(self.model).items()
        }
        state = self.optimizer.state_dict()
        for idx, slots in state["state"].items():
            for key, value in slots.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"step": self.step, "param_groups": state["param_groups"], "extra": extra}
        if self.scaler:
            meta["scaler"] = self.scaler.state_dict()
        with atomic_dir(self.checkpoint_dir) as tmp:
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta))
        logger.info("checkpoint at step %d -> %s", self.step, self.checkpoint_dir)

    def load(self) -> dict[str, Any] | None:
        """Restore the last checkpoint if there is one; returns its extra state."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / "state.json").is_file():
            return None
        meta = json.loads((self.checkpoint_dir / "state.json").read_text())
        tensors = load_file(str(self.checkpoint_dir / "state.safetensors"))
        _load_trainable(
            self.model,
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")},
            self.checkpoint_dir,
        )
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                slots.setdefault(int(idx), {})[name] = value.to(self.device) if name != "step" else value
        self.optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if self.scaler and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        return meta["extra"]


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: the adapters of an EAS model, else every trainable tensor."""
    if isinstance(model, EASModel):
        return model.adapter_state_dict()
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor], source: Any) -> None:
    if isinstance(model, EASModel):
        model.load_adapter_state_dict(state, source=source)
        return
    expected = _trainable_state(model)
    if expected.keys() != state.keys():
        raise ValueError(f"the checkpoint in {source} holds other tensors than this model trains")
    with torch.no_grad():
        for name, value in state.items():
            expected[name].copy_(value)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): tree}


def _changed(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that differ between a checkpoint's identity and this run's, as ``name: old -> new``."""
    a, b = _flat(saved), _flat(now)
    return [
        f"{k}: {a.get(k, '-')} -> {b.get(k, '-')}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def _resume_guard(loop: _Loop, resume: bool, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Load the checkpoint when resuming, checking that it belongs to a run with these settings."""
    if loop.checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True needs the `out` folder that holds the checkpoint")
        return None
    if loop.procs.is_main:  # rank 0 alone repairs the folder it writes; the others then read it
        repaired = recover_dir(loop.checkpoint_dir)
        if repaired:
            logger.warning("checkpoint folder: %s", repaired)
    loop.procs.barrier()
    has = (loop.checkpoint_dir / "state.json").is_file()
    if not resume:
        if has:
            logger.warning(
                "starting over: %s holds a checkpoint, pass resume=True to continue it", loop.checkpoint_dir
            )
        return None
    if not has:
        raise ValueError(
            f"there is no checkpoint to resume in {loop.checkpoint_dir}; check --out, or drop --resume "
            "to start from the beginning"
        )
    extra = loop.load()
    if extra is not None and extra.get("identity") != identity:
        changes = _changed(extra.get("identity") or {}, identity)
        raise ValueError(
            f"the checkpoint in {loop.checkpoint_dir} belongs to a run with other settings ("
            + "; ".join(changes)
            + "); resume with the same settings and data, or use another --out"
        )
    logger.warning("resumed from %s at step %d of %d", loop.checkpoint_dir, loop.step, loop.total_steps)
    return extra


def data_fingerprint(batches: Any) -> str | None:
    """A digest of the token ids and labels of in-memory batches (None when they are not a list of dicts
    of tensors, e.g. a DataLoader); a resumed run must see the same data."""
    if not isinstance(batches, list | tuple) or not all(isinstance(b, dict) for b in batches):
        return None
    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "labels"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Interrupted(Exception):
    """A run stopped by Ctrl-C at a step boundary; the message says what was saved and how to resume."""


class _StopOnInterrupt:
    """Ctrl-C during a loop finishes the current step, then the loop saves a checkpoint and stops.

    A second Ctrl-C stops at once. Outside the main thread (where signals cannot be caught) it does
    nothing and Ctrl-C behaves as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop now)")

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def check(self, loop: _Loop, state: Callable[[], dict[str, Any]]) -> None:
        """At a step boundary: if Ctrl-C was pressed, save a checkpoint and raise :class:`Interrupted`."""
        if not self.requested:
            return
        if loop.checkpoint_dir is None:
            raise Interrupted(f"interrupted at step {loop.step} of {loop.total_steps}; nothing was saved")
        loop.save(state())
        raise Interrupted(
            f"interrupted at step {loop.step} of {loop.total_steps}; checkpoint saved in "
            f"{loop.checkpoint_dir}; run the same command with --resume (resume=True) to continue"
        )


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
        eas: adapter settings (dims, dropout ...); the supernet flags are set here.
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
    out_dir = Path(out) if out is not None else None
    if isinstance(model, EASModel):
        eas_model = model
    else:
        cfg = copy.deepcopy(eas) if eas is not None else EASConfig()
        cfg.skip_attention, cfg.skip_mlp, cfg.skip_layers = [], [], []
        cfg.supernet, cfg.candidates = True, config.candidates
        eas_model = get_eas_model(model, EASConfig.from_dict(cfg.to_dict()))
    num_layers = eas_model.facts.num_layers
    cands = Candidates(config.candidates, num_layers)
    device = next(eas_model.parameters()).device
    procs = _Dist(device)
    train_batches = _Batches(batches, procs, tc.shuffle, tc.seed)
    steps_per_epoch = math.ceil(train_batches.count / tc.grad_accum)
    config.check_against(num_layers, steps_per_epoch)
    held = list(heldout)
    held_local = [held[i] for i in procs.shard(len(held))]
    if not held_local:
        raise ValueError("the search needs held-out batches to score subsets (at least one per process)")

    epochs = config.warmup_epochs + config.search_epochs
    loop = _Loop(eas_model, tc, steps_per_epoch, epochs, out_dir, "search")
    bandit = Bandit(cands.num_arms, config.k, config.beta, config.alpha, seed=tc.seed, noise=config.noise)
    identity = {
        "search": asdict(config),
        "arms": cands.num_arms,
        "world": procs.world,
        "data": data if data is not None else data_fingerprint(batches),
    }
    trajectory: list[dict[str, Any]] = [
        {"step": 0, "preferences": bandit.preferences.tolist(), "top_k": None}
    ]
    evals = 0
    torch.manual_seed(tc.seed)
    extra = _resume_guard(loop, resume, identity)
    if extra is not None:
        bandit = Bandit.from_state_dict(extra["bandit"])
        trajectory, evals = extra["trajectory"], extra["evals"]
    warmup_steps = config.warmup_epochs * steps_per_epoch

    def resume_state() -> dict[str, Any]:
        """What a checkpoint needs besides the loop's own state (built only when saving)."""
        return {"identity": identity, "bandit": bandit.state_dict(), "trajectory": trajectory, "evals": evals}

    def score(subsets: list[list[int]]) -> list[float]:
        nonlocal evals
        batch = _to(held_local[evals % len(held_local)], device)
        evals += 1
        was_training = eas_model.training
        eas_model.eval()
        losses = []
        with torch.no_grad(), loop.autocast():
            for subset in subsets:
                eas_model.set_plan(cands.plan(subset))
                losses.append(eas_model(**batch).loss.float())
        eas_model.train(was_training)
        return procs.mean(torch.stack(losses)).tolist()

    eas_model.train()
    bar = tqdm(
        total=loop.total_steps, initial=loop.step, desc="search", disable=not (tc.progress and procs.is_main)
    )
    last_loss = float("nan")
    start_epoch = loop.position()[0]
    with _StopOnInterrupt() as stop:
        for epoch in range(start_epoch, epochs):
            for group in loop.groups(train_batches, epoch):
                phase = "warmup" if loop.step < warmup_steps else "search"
                subset = bandit.uniform(1)[0] if phase == "warmup" else bandit.sample(1)[0]
                eas_model.set_plan(cands.plan(subset))
                last_loss = sum(loop.backward(b) for b in group) / len(group)
                loop.update()
                if phase == "search" and (loop.step - warmup_steps) % config.interval == 0:
                    subsets = bandit.sample(config.n_candidates)
                    losses = score(subsets)
                    rewards = bandit.update(subsets, losses)
                    trajectory.append(
                        {
                            "step": loop.step,
                            "subsets": subsets,
                            "losses": losses,
                            "rewards": rewards,
                            "preferences": bandit.preferences.tolist(),
                            "top_k": bandit.top_k(),
                        }
                    )
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last_loss:.3f}", phase=phase, top_k=",".join(map(str, bandit.top_k()))
                )
                if tc.checkpoint_every and loop.step % tc.checkpoint_every == 0:
                    loop.save(resume_state())
                if callback is not None:
                    callback({"step": loop.step, "loss": last_loss, "phase": phase})
                stop.check(loop, resume_state)
    bar.close()
    loop.save(resume_state())

    arms = bandit.top_k()
    plan = cands.plan(arms).replace(candidates=config.candidates)
    eas_model.set_plan(plan)
    eas_model.eval()
    result = SearchResult(plan, arms, config.candidates, bandit, trajectory, eas_model)
    if out_dir is not None and procs.is_main:
        _write_search(result, cands, config, out_dir)
    return result


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
    """Train whatever parameters of ``model`` require grad on ``batches`` (loss from their ``labels``).

    The loop behind :func:`train`; also what trains full fine-tunes, LoRA models and the toy model.

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
    device = next(model.parameters()).device
    procs = _Dist(device)
    train_batches = _Batches(batches, procs, config.shuffle, config.seed)
    steps_per_epoch = math.ceil(train_batches.count / config.grad_accum)
    loop = _Loop(model, config, steps_per_epoch, config.epochs, out_dir, name)
    identity = {
        "train": asdict(config),
        "world": procs.world,
        "data": data if data is not None else data_fingerprint(batches),
        **(identity or {}),
    }
    history: list[dict[str, float]] = []
    torch.manual_seed(config.seed)
    extra = _resume_guard(loop, resume, identity)
    if extra is not None:
        history = extra["history"]

    model.train()
    bar = tqdm(
        total=loop.total_steps, initial=loop.step, desc=name, disable=not (config.progress and procs.is_main)
    )

    def state() -> dict[str, Any]:
        return {"identity": identity, "history": history}

    with _StopOnInterrupt() as stop:
        for epoch in range(loop.position()[0], config.epochs):
            for group in loop.groups(train_batches, epoch):
                loss = sum(loop.backward(b) for b in group) / len(group)
                loop.update()
                history.append({"step": loop.step, "loss": loss, "lr": loop.lr_at(loop.step - 1)})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if config.checkpoint_every and loop.step % config.checkpoint_every == 0:
                    loop.save(state())
                if callback is not None:
                    callback({"step": loop.step, "loss": loss, "phase": name})
                stop.check(loop, state)
    bar.close()
    loop.save(state())
    model.eval()
    return history


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
        eas: the adapters and plan for a plain ``model`` (default: ``EASConfig()``, no skips).
        out: folder for ``adapters/``, ``train_log.json`` and checkpoints.
        resume: continue from the checkpoint in ``out``.
        callback: called after every optimiser step with ``{"step", "loss", "phase"}``.
        data: a fingerprint of the training data (default: computed from in-memory batches).

    Returns:
        The trained :class:`EASModel` (in eval mode).
    """
    config = config or TrainConfig()
    eas_model = model if isinstance(model, EASModel) else get_eas_model(model, eas or EASConfig())
    identity = {"eas": eas_model.eas_config.to_dict()}
    history = fit(
        eas_model, batches, config, out, resume, callback, name="train", identity=identity, data=data
    )
    device = next(eas_model.parameters()).device
    procs = _Dist(device)
    show = config.progress and procs.is_main
    if config.calibrate:
        local = _Batches(batches, procs, shuffle=False, seed=config.seed).epoch(0)
        eas_model.calibrate((_to(b, device) for b in local), progress=show)
        _sync_calibration(eas_model, procs)
    if out is not None and procs.is_main:
        out_dir = Path(out)
        eas_model.save_pretrained(out_dir / "adapters")
        log = {"config": asdict(config), "eas": eas_model.eas_config.to_dict(), "history": history}
        atomic_write_text(out_dir / "train_log.json", json.dumps(log, indent=1) + "\n")
    return eas_model


def _sync_calibration(model: EASModel, procs: _Dist) -> None:
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
