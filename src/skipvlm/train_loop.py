"""The one training loop behind every skipvlm run (``shared/METHODS.md`` §3): :func:`skipvlm.train.fit`,
:func:`skipvlm.train.train` and the supernet of :func:`skipvlm.train.search`.

:class:`Loop` iterates epochs and batches, accumulates gradients, runs the forward under autocast, steps
AdamW on a linear warm-up + cosine schedule, shows a progress bar, writes an atomic checkpoint every N
steps and when Ctrl-C stops a run (:class:`Interrupted`), and resumes from that checkpoint exactly (same
data order, same random state). What one kind of run adds around each step (the search's bandit) comes in
through a :class:`StepHooks` object, which also owns that run's share of the checkpoint.

Multi-process: under ``torchrun`` / ``accelerate launch`` the loop joins the process group the launcher
describes (gloo on CPU, nccl on GPU), gives each rank its share of the batches, averages gradients across
ranks after every accumulation (data parallel, as DDP does) and writes files on rank 0 only. Nothing
assumes a world size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from skipvlm.io import atomic_dir, recover_dir

__all__ = ["Interrupted", "Loop", "StepHooks", "TrainConfig", "data_fingerprint"]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Callback = Callable[[dict[str, Any]], None]


def check_positive(obj: Any, *names: str) -> None:
    """Raise if a field named in ``names`` of the config ``obj`` is not a positive integer."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass
class TrainConfig:
    """Optimisation settings of a training run (also the supernet's, inside ``SearchConfig``).

    Args:
        epochs: passes over the training batches (:func:`~skipvlm.train.train` only; a search runs
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
        calibrate: after :func:`~skipvlm.train.train`, gather the router means the static merge needs.
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
        check_positive(self, "epochs", "grad_accum")
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


# --- processes and batches -------------------------------------------------------------------------------


class Ranks:
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


class Batches:
    """This rank's share of the batches, in a seeded per-epoch order for a list, as given otherwise."""

    def __init__(self, batches: Iterable[dict[str, Any]], ranks: Ranks, shuffle: bool, seed: int):
        if not hasattr(batches, "__len__"):
            raise TypeError(
                "the training batches need a length (a list or a DataLoader), got "
                f"{type(batches).__name__}; pass list(batches)"
            )
        self.batches, self.ranks, self.shuffle, self.seed = batches, ranks, shuffle, seed
        self.indexable = isinstance(batches, Sequence)
        self.count = len(ranks.shard(len(batches)))
        if self.count == 0:
            raise ValueError(
                f"{len(batches)} batch(es) cannot feed {ranks.world} processes; give at least one each"
            )

    def steps_per_epoch(self, grad_accum: int) -> int:
        """Optimiser steps per epoch on this rank (a last, smaller group counts)."""
        return math.ceil(self.count / grad_accum)

    def epoch(self, epoch: int) -> Iterable[dict[str, Any]]:
        """This rank's batches of ``epoch``, in that epoch's order."""
        if self.indexable:
            order = list(range(len(self.batches)))
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(len(order), generator=gen).tolist()
            return (self.batches[order[i]] for i in self.ranks.shard(len(order)))
        mine = set(self.ranks.shard(len(self.batches)))
        return (b for i, b in enumerate(self.batches) if i in mine)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with its tensors on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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


# --- what a model trains ---------------------------------------------------------------------------------


def _own_method(model: nn.Module, name: str) -> bool:
    # Looked up on the class: wrappers (PEFT models, EASModel) forward unknown attributes to the model
    # inside, whose trainable state is not the wrapper's.
    return callable(getattr(type(model), name, None))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``model``: its ``trainable_state_dict()`` when it has one (an EAS model's
    adapters), else every parameter that requires grad."""
    if _own_method(model, "trainable_state_dict") and _own_method(model, "load_trainable_state_dict"):
        return model.trainable_state_dict()
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: Any) -> None:
    """Load what :func:`trainable_state` returned; ``source`` names the checkpoint in errors."""
    if _own_method(model, "trainable_state_dict") and _own_method(model, "load_trainable_state_dict"):
        model.load_trainable_state_dict(state, source=source)
        return
    expected = trainable_state(model)
    if expected.keys() != state.keys():
        raise ValueError(f"the checkpoint in {source} holds other tensors than this model trains")
    with torch.no_grad():
        for name, value in state.items():
            expected[name].copy_(value)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turn on the transformers model's activation checkpointing: ``model``'s own, else that of the model a
    wrapper holds as ``base_model`` (EASModel and PEFT models also forward the call to it)."""
    for owner in (model, getattr(model, "base_model", None)):
        enable = getattr(owner, "activation_checkpointing_enable", None) or getattr(
            owner, "gradient_checkpointing_enable", None
        )
        if enable is not None:
            enable()
            return
    raise ValueError(
        f"gradient_checkpointing=True needs a transformers model; this {type(model).__name__} has no "
        "gradient_checkpointing_enable(); turn TrainConfig.gradient_checkpointing off"
    )


# --- hooks -----------------------------------------------------------------------------------------------


class StepHooks:
    """What one kind of run adds to :class:`Loop` around each optimiser step; this base adds nothing.

    Hooks run on every rank, at the same steps, so what they decide (e.g. the search's subsets) must
    depend only on state that is the same on every rank.
    """

    def before_step(self, loop: Loop) -> str:
        """Called before the step's forward passes (``loop.step`` steps done); returns the step's phase,
        which the progress callback reports."""
        return loop.name

    def after_step(self, loop: Loop, loss: float) -> dict[str, str]:
        """Called after the optimiser step (``loop.step`` counts it) with the step's mean training loss;
        returns extra fields for the progress bar."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """This run's share of a checkpoint (JSON-serialisable); built only when saving."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (``state`` also holds the other checkpoint keys)."""


# --- the loop --------------------------------------------------------------------------------------------


class Loop:
    """Optimiser, schedule, autocast, gradient sync and resumable checkpoints of one run; :meth:`run` runs it.

    Args:
        model: any model whose forward returns ``.loss``; what requires grad is trained, or what its
            ``optimizer_parameters()`` returns: parameters, or param groups ``{"params": [...],
            "lr_scale": r}`` whose learning rate is ``r * lr_at(step)``.
        batches: this rank's training batches.
        cfg: the :class:`TrainConfig` (its ``epochs`` is the caller's business: see ``epochs``).
        epochs: passes over ``batches``.
        out: folder for the ``{name}_checkpoint`` (None: no checkpoints).
        name: names the checkpoint folder and the progress bar; the default phase of a step.

    Raises:
        ValueError: nothing in ``model`` requires grad, or ``fp16`` on a device other than CUDA.
    """

    def __init__(
        self, model: nn.Module, batches: Batches, cfg: TrainConfig, epochs: int, out: Path | None, name: str
    ):
        self.model, self.batches, self.cfg, self.name = model, batches, cfg, name
        self.device = next(model.parameters()).device
        self.ranks = batches.ranks
        if _own_method(model, "optimizer_parameters"):
            found = list(model.optimizer_parameters())
        else:
            found = [p for p in model.parameters() if p.requires_grad]
        # parameters, or groups {"params": [...], "lr_scale": r} that train at r times the schedule's lr
        groups = found if found and isinstance(found[0], dict) else [{"params": found}]
        groups = [{"params": list(g["params"]), "lr_scale": float(g.get("lr_scale", 1.0))} for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch, self.epochs = batches.steps_per_epoch(cfg.grad_accum), epochs
        self.total_steps = self.steps_per_epoch * epochs
        self.warmup_steps = int(cfg.warmup_ratio * self.total_steps)
        self.step = 0
        self.checkpoint_dir = out / f"{name}_checkpoint" if out is not None else None
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)

    def run(
        self,
        settings: dict[str, Any],
        data: str | None = None,
        resume: bool = False,
        hooks: StepHooks | None = None,
        callback: Callback | None = None,
    ) -> None:
        """Train to the last step (from the checkpoint when ``resume``), save a final checkpoint, leave
        the model in eval mode.

        Args:
            settings: what a resumed checkpoint must have been written with (besides the number of
                processes and the data, which are always checked).
            data: a fingerprint of the training data (default: computed from in-memory batches).
            resume: continue from the checkpoint in ``out``.
            hooks: what this kind of run does around each step (default: nothing).
            callback: called after every optimiser step with ``{"step", "loss", "phase"}``.

        Raises:
            Interrupted: Ctrl-C stopped the run (after saving a checkpoint when there is an ``out``).
            ValueError: ``resume`` without a checkpoint, or one written with other settings.
        """
        hooks = hooks or StepHooks()
        fingerprint = data if data is not None else data_fingerprint(self.batches.batches)
        identity = {**settings, "world": self.ranks.world, "data": fingerprint}
        torch.manual_seed(self.cfg.seed)
        restored = self._restore(resume, identity)
        if restored is not None:
            hooks.load_state_dict(restored)

        def state() -> dict[str, Any]:
            return {"identity": identity, **hooks.state_dict()}

        self.model.train()
        shown = self.cfg.progress and self.ranks.is_main
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, disable=not shown)
        with _StopOnInterrupt() as stop:
            for epoch in range(self.position()[0], self.epochs):
                for group in self.groups(epoch):
                    phase = hooks.before_step(self)
                    loss = sum(self.backward(b) for b in group) / len(group)
                    self.update()
                    postfix = hooks.after_step(self, loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", **postfix)
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                        self.save(state())
                    if callback is not None:
                        callback({"step": self.step, "loss": loss, "phase": phase})
                    stop.check(self, state)
        bar.close()
        self.save(state())
        self.model.eval()

    # --- one step ------------------------------------------------------------------------------------

    def _autocast_dtype(self) -> torch.dtype | None:
        p, dev = self.cfg.precision, self.device.type
        if p == "auto":
            return torch.bfloat16 if dev == "cuda" and torch.cuda.is_bf16_supported() else None
        if p == "fp16" and dev != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on this device")
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]

    def autocast(self) -> torch.autocast:
        """The autocast context of this run's forward passes (disabled in fp32)."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine decay."""
        if step < self.warmup_steps:
            return self.cfg.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))

    def backward(self, batch: dict[str, Any]) -> float:
        """Forward and backward one micro-batch (its share of the accumulated gradient); returns its loss."""
        try:
            with self.autocast():
                loss = self.model(**to_device(batch, self.device)).loss
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
        """Average the gradients over ranks, clip them, take the optimiser step and count it."""
        if self.ranks.active:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.ranks.mean(p.grad)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)  # older checkpoints lack it
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

    def groups(self, epoch: int) -> Iterable[list[dict[str, Any]]]:
        """The epoch's micro-batches in groups of ``grad_accum``, from the resume position on."""
        start = self.step - epoch * self.steps_per_epoch
        group: list[dict[str, Any]] = []
        index = 0
        for batch in self.batches.epoch(epoch):
            group.append(batch)
            if len(group) == self.cfg.grad_accum:
                if index >= start:
                    yield group
                index, group = index + 1, []
        if group and index >= start:
            yield group

    # --- checkpoints ---------------------------------------------------------------------------------

    def save(self, extra: dict[str, Any]) -> None:
        """Write a resumable checkpoint (rank 0; atomic: the folder is replaced whole)."""
        if self.checkpoint_dir is None or not self.ranks.is_main:
            return
        tensors = {
            f"model.{k}": v.detach().contiguous().cpu() for k, v in trainable_state(self.model).items()
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
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        load_trainable_state(self.model, model_state, self.checkpoint_dir)
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

    def _restore(self, resume: bool, identity: dict[str, Any]) -> dict[str, Any] | None:
        """Load the checkpoint when resuming, checking that it belongs to a run with these settings."""
        if self.checkpoint_dir is None:
            if resume:
                raise ValueError("resume=True needs the `out` folder that holds the checkpoint")
            return None
        if self.ranks.is_main:  # rank 0 alone repairs the folder it writes; the others then read it
            repaired = recover_dir(self.checkpoint_dir)
            if repaired:
                logger.warning("checkpoint folder: %s", repaired)
        self.ranks.barrier()
        has = (self.checkpoint_dir / "state.json").is_file()
        if not resume:
            if has:
                logger.warning(
                    "starting over: %s holds a checkpoint, pass resume=True to continue it",
                    self.checkpoint_dir,
                )
            return None
        if not has:
            raise ValueError(
                f"there is no checkpoint to resume in {self.checkpoint_dir}; check --out, or drop --resume "
                "to start from the beginning"
            )
        extra = self.load()
        if extra is not None and extra.get("identity") != identity:
            changes = _changed(extra.get("identity") or {}, identity)
            raise ValueError(
                f"the checkpoint in {self.checkpoint_dir} belongs to a run with other settings ("
                + "; ".join(changes)
                + "); resume with the same settings and data, or use another --out"
            )
        logger.warning("resumed from %s at step %d of %d", self.checkpoint_dir, self.step, self.total_steps)
        return extra


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


# --- Ctrl-C ----------------------------------------------------------------------------------------------


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

    def check(self, loop: Loop, state: Callable[[], dict[str, Any]]) -> None:
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
