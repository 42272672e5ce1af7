"""The encoder demo: adaptation methods on the toy BridgeTower, measured in one run (METHODS §3, §7).

The shipped toy BridgeTower answers the shapes world's pretraining question families by classification;
the downstream task is the demo's other families (:data:`~skipvlm.toy.DOWNSTREAM_FAMILIES`). Every
method starts from the same base model, trains on the same batches with the same steps and seed (the
answer classifier trains in every method), and is measured on the same test split: trainable
parameters, accuracy, MACs of one forward (:mod:`skipvlm.encoders.cost`, adapters included) and
batch-1 forward latency (medians of interleaved rounds).

Rows: ``zero_shot`` (the base model), ``full_ft`` (every weight: the pretrained BridgeTower at lr / 10, the
answer classifier at lr as in every other method), ``adapter`` (adapt-PIA on
every attention sublayer, nothing skipped), ``lora`` (peft on the co-attention layers' q / v, merged),
``das`` (whole co-attention layers found by the bandit, ReLU bottlenecks) and ``eas`` (attention
sublayers found by the bandit, replace-PIA, for two k).
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from skipvlm.data.synthetic import SyntheticBatches, SyntheticTask
from skipvlm.encoders.cost import count_encoder_macs
from skipvlm.encoders.eas import EncoderEASConfig, EncoderEASModel
from skipvlm.encoders.host import HOST, backbone
from skipvlm.encoders.toy import SHIPPED, evaluate_vqa, load_toy_bridgetower
from skipvlm.io import atomic_write_text
from skipvlm.runinfo import run_info
from skipvlm.toy import DOWNSTREAM_FAMILIES
from skipvlm.train import SearchConfig, TrainConfig, eas_config_for_plan, fit, search, train

__all__ = ["EncoderDemoConfig", "adapter_macs", "format_table", "run_encoder_demo"]

logger = logging.getLogger(__name__)


@dataclass
class EncoderDemoConfig:
    """Sizes of the encoder demo. ``quick`` shrinks data and steps (a smoke run, not a result).

    Args:
        model: the toy BridgeTower folder (default: the one shipped with skipvlm).
        k: attention sublayers EAS skips, one run each (of 4 L candidates).
        das_layers: whole co-attention layers DAS skips.
        replace_dim / adapt_dim: PIA bottlenecks (the paper's 144 is for C = 768; the toy has C = 64).
        train_examples / val_examples / test_examples: split sizes (val feeds the bandit only).
        batch_size / epochs / lr: shared by every method (full fine-tuning trains the pretrained
            BridgeTower at ``lr / 10``, its answer classifier at ``lr``).
        search_warmup_epochs / search_epochs / interval: the bandit search (METHODS §3).
        repeats: interleaved latency rounds.
        seed: one seed for data, initialisation and shuffling.
    """

    model: str = str(SHIPPED)
    quick: bool = False
    k: tuple[int, int] = (4, 8)
    das_layers: int = 1
    replace_dim: int = 32
    adapt_dim: int = 8
    train_examples: int = 768
    val_examples: int = 64
    test_examples: int = 300
    batch_size: int = 32
    epochs: int = 3
    lr: float = 2e-3
    search_warmup_epochs: int = 1
    search_epochs: int = 1
    interval: int = 4
    repeats: int = 15
    seed: int = 0

    @classmethod
    def quick_config(cls, **kw: Any) -> EncoderDemoConfig:
        """The ``--quick`` sizes: a third of the data, one epoch, fewer test questions and timing rounds."""
        return cls(quick=True, train_examples=256, test_examples=60, epochs=1, repeats=2, interval=2, **kw)


def adapter_macs(model: nn.Module, text_tokens: int, image_tokens: int) -> int:
    """MACs per forward of the adapters that run: per token of their stream, each active adapter's
    token-path weights (replace-PIA: W_C and both U_k; adapt-PIA: W_A and both U_k; DAS: both projections)."""
    if not isinstance(model, EncoderEASModel):
        return 0
    tokens = {"text": text_tokens, "image": image_tokens}
    total = 0
    for key, adapters in model.adapters().items():
        stream, index = key.split(".")
        layer = next(x for x in HOST.wrap_all(model) if x.stream == stream and x.index == int(index))
        if layer.das:
            total += tokens[stream] * (adapters.das.down.weight.numel() + adapters.das.up.weight.numel())
            continue
        for kind in ("self", "cross"):
            if kind in layer.skips and kind in adapters.replace:
                pia = adapters.replace[kind]
                down = pia.token
            elif kind not in layer.skips and kind in adapters.adapt:
                pia = adapters.adapt[kind]
                down = pia.down
            else:
                continue
            total += tokens[stream] * (down.weight.numel() + sum(up.weight.numel() for up in pia.up))
    return total


def _latency(
    models: dict[str, nn.Module], batch: dict[str, torch.Tensor], repeats: int, progress: bool
) -> dict:
    """Median batch-1 forward seconds per model, interleaved (one pass of every model per round)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model.eval()
            model(**batch)
        for _ in tqdm(range(repeats), desc="timing", disable=not progress, leave=False):
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class _FullFineTune(nn.Module):
    """Full fine-tuning of a head model for :func:`~skipvlm.train.fit`: the pretrained ``BridgeTowerModel``
    at ``body_lr_scale`` times the learning rate, the task head (new answers to learn) at the learning rate
    every other method gives it."""

    def __init__(self, model: nn.Module, body_lr_scale: float):
        super().__init__()
        self.model, self.body_lr_scale = model, body_lr_scale

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def optimizer_parameters(self) -> list[dict[str, Any]]:
        inside = {id(p) for p in backbone(self.model).parameters()}
        body = [p for p in self.model.parameters() if p.requires_grad and id(p) in inside]
        head = [p for p in self.model.parameters() if p.requires_grad and id(p) not in inside]
        return [{"params": body, "lr_scale": self.body_lr_scale}, {"params": head}]


def _model_name(folder: str) -> str:
    """The toy as results record it: ``skipvlm:toy-bridgetower`` for the shipped one (no local path)."""
    return f"skipvlm:{SHIPPED.name}" if Path(folder).resolve() == SHIPPED.resolve() else folder


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_encoder_demo(config: EncoderDemoConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    """Run every method and measure it; returns the ``results.json`` content (also written to ``out``).

    Raises:
        FileNotFoundError: the toy checkpoint is missing.
    """
    import peft

    start = time.perf_counter()
    base, collator = load_toy_bridgetower(config.model)
    base.requires_grad_(False)
    task = SyntheticTask(families=DOWNSTREAM_FAMILIES, image_size=collator.image_size)
    bs = config.batch_size
    batches = SyntheticBatches(task, collator, config.train_examples // bs, bs, "train", config.seed)
    batches = [batches[i] for i in range(len(batches))]
    val = task.examples(config.val_examples, "val", config.seed)
    heldout = [collator(val[i : i + bs]) for i in range(0, len(val), bs)]
    test = task.examples(config.test_examples, "test", config.seed)
    total_params = sum(p.numel() for p in base.parameters())
    tc = TrainConfig(epochs=config.epochs, lr=config.lr, seed=config.seed, progress=progress)
    template = EncoderEASConfig(replace_dim=config.replace_dim, adapt_dim=config.adapt_dim)
    search_kw = {
        "warmup_epochs": config.search_warmup_epochs,
        "search_epochs": config.search_epochs,
        "interval": config.interval,
        "train": TrainConfig(lr=config.lr, seed=config.seed, progress=progress),
    }
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}

    def record(method: str, model: nn.Module, trainable: int, k: int | None = None) -> None:
        name = method if k is None else f"{method} k={k}"
        models[name] = model
        rows.append({"name": name, "method": method, "k": k, "trainable_params": trainable})
        rows[-1]["trainable_pct"] = 100 * trainable / total_params

    def fresh() -> nn.Module:
        return copy.deepcopy(base)

    steps = tqdm(total=7, desc="demo", disable=not progress)
    record("zero_shot", base, 0)
    full = fresh().requires_grad_(True)
    fit(_FullFineTune(full, body_lr_scale=0.1), batches, tc, name="full_ft")
    record("full_ft", full, _trainable(full))
    steps.update(2)
    model = train(fresh(), batches, tc, eas=template)  # adapt-PIA everywhere, nothing skipped
    record("adapter", model, _trainable(model))
    steps.update(1)
    lora_cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=r".*cross_modal_(text|image)_layers\.\d+\.(attention|crossattention)\.self\.(query|value)",
        modules_to_save=["classifier"],
    )
    lora = peft.get_peft_model(fresh(), lora_cfg)
    fit(lora, batches, tc, name="lora")
    lora_trainable = _trainable(lora)
    record("lora", lora.merge_and_unload(), lora_trainable)
    steps.update(1)
    for kind, k, method in (
        ("layer", config.das_layers, "das"),
        *(("attention", k, "eas") for k in config.k),
    ):
        folder = Path(out) / f"search_{method}_k{k}" if out is not None else None
        found = search(
            fresh(), batches, heldout, SearchConfig(k=k, candidates=kind, **search_kw), template, folder
        )
        eas = eas_config_for_plan(found.plan, kind, template)
        model = train(fresh(), batches, tc, eas=eas)
        record(method, model, _trainable(model), k)
        steps.update(1)
    steps.close()

    sample = collator([test[0]])
    sample.pop("labels")
    text_tokens = int(sample["input_ids"].shape[1])
    image_tokens = int(count_encoder_macs(base.config, text_tokens).image_tokens)
    stock_macs = count_encoder_macs(base.config, text_tokens).total
    for row in tqdm(rows, desc="evaluating", disable=not progress, leave=False):
        model = models[row["name"]]
        row["accuracy"] = evaluate_vqa(model, collator, test)
        plan = HOST.current_plan(model)
        row["skip_attention"], row["skip_mlp"] = list(plan.skip_attention), list(plan.skip_mlp)
        extra = adapter_macs(model, text_tokens, image_tokens)
        macs = count_encoder_macs(base.config, text_tokens, plan, extra=extra).total
        row["macs_m"], row["macs_removed_pct"] = macs / 1e6, 100 * (stock_macs - macs) / stock_macs
    latency = _latency(models, sample, config.repeats, progress)
    for row in rows:
        row["latency_ms"] = latency[row["name"]] * 1e3
    reference = next(r for r in rows if r["method"] == "zero_shot")
    result = {
        "rows": rows,
        "meta": {
            "config": asdict(config) | {"model": _model_name(config.model)},
            "text_tokens": text_tokens,
            "image_tokens": image_tokens,
            "stock_latency_ms": reference["latency_ms"],
            "downstream_families": list(DOWNSTREAM_FAMILIES),
            **run_info(next(base.parameters()).device, next(base.parameters()).dtype),
            "seconds": time.perf_counter() - start,
        },
    }
    if out is not None:
        atomic_write_text(Path(out) / "results.json", json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The demo's rows as a fixed-width table."""
    head = f"{'method':<14}{'trainable':>11}{'acc %':>8}{'MMACs':>9}{'removed':>9}{'latency ms':>12}  skipped"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        skipped = ", ".join(r["skip_attention"]) if r["method"] == "eas" else ""
        if r["method"] == "das":
            skipped = "layers " + ", ".join(sorted({n.split(".")[1] for n in r["skip_attention"]}))
        lines.append(
            f"{r['name']:<14}{r['trainable_params']:>11,}{100 * r['accuracy']:>8.1f}{r['macs_m']:>9.1f}"
            f"{r['macs_removed_pct']:>8.1f}%{r['latency_ms']:>12.2f}  {skipped}"
        )
    return "\n".join(lines)
