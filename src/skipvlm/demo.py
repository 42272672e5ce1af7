"""The end-to-end demo: a paper-style comparison of adaptation methods on the bundled toy world.

The shipped toy LLaVA was pretrained on some question families (:data:`~skipvlm.toy.PRETRAIN_FAMILIES`);
the downstream task is the others (counting, left / right and above / below relations). Each method
adapts the same base model with the same data, steps and seed, then is measured on the same test
split: trainable parameters, MACs of a prefill, test accuracy, and prefill / decode latency (merged
models where the method allows it; all latencies interleaved in one run).

Methods: ``zero_shot`` (the base model), ``full_ft`` (LLM + projector), ``lora`` (the peft library, merged),
``pia`` (adapters, nothing skipped), ``eas`` (k attentions found by the bandit, for two k), ``eas_random``
and ``eas_last_k`` (the same k, chosen at random / the last k layers), ``mlp_skip`` (k MLPs found by
the bandit), ``das`` (whole layers found by the bandit, replaced by ReLU adapters; not mergeable) and
``eas_vtw`` (the first merged EAS model, also withdrawing its visual tokens from the layer VTW's KL
calibration picks on the val split).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from skipvlm.bench import format_rows, lora_model, measure_models
from skipvlm.cost import count_macs
from skipvlm.data.chat import ChatCollator, ChatExample
from skipvlm.data.synthetic import SyntheticBatches, SyntheticTask
from skipvlm.eas import EASConfig
from skipvlm.evaluate import evaluate
from skipvlm.io import atomic_write_text
from skipvlm.plan import Plan
from skipvlm.plots import plot_tradeoff
from skipvlm.runinfo import run_info
from skipvlm.runtime import apply_plan, current_plan
from skipvlm.search import Candidates, control_plan
from skipvlm.tokens.vtw import calibrate_vtw
from skipvlm.toy import DOWNSTREAM_FAMILIES, SHIPPED, load_toy
from skipvlm.train import SearchConfig, TrainConfig, eas_config_for_plan, fit, search, train

__all__ = ["DemoConfig", "ToySetup", "format_table", "run_demo", "toy_setup"]

logger = logging.getLogger(__name__)

METHODS = (
    "zero_shot",
    "full_ft",
    "lora",
    "pia",
    "eas",
    "eas_random",
    "eas_last_k",
    "mlp_skip",
    "das",
    "eas_vtw",
)


@dataclass
class DemoConfig:
    """Sizes of the demo run. ``quick`` shrinks the data and the steps (a smoke run, not a result).

    Args:
        model: the toy checkpoint folder (default: the one shipped with skipvlm).
        k: attentions skipped by EAS, for each of two runs; the first k is also used for the controls
            and the MLP ablation.
        das_layers: whole layers skipped by DAS.
        train_examples / val_examples / test_examples: split sizes (val feeds the bandit only).
        batch_size / epochs / lr: shared by every adapter method (full fine-tuning uses ``lr / 10``).
        search_warmup_epochs / search_epochs / interval: the bandit search (METHODS §3).
        vtw_eta: the KL threshold of VTW's calibration (METHODS §4).
        new_tokens / repeats: decode tokens per latency measurement and interleaved rounds.
        seed: one seed for data, initialisation and shuffling.
    """

    model: str = str(SHIPPED)
    quick: bool = False
    k: tuple[int, int] = (2, 3)
    das_layers: int = 1
    train_examples: int = 3072
    val_examples: int = 64
    test_examples: int = 300
    batch_size: int = 16
    epochs: int = 3
    lr: float = 2e-3
    search_warmup_epochs: int = 1
    search_epochs: int = 1
    vtw_eta: float = 0.05
    interval: int = 8
    new_tokens: int = 16
    repeats: int = 7
    seed: int = 0

    @classmethod
    def quick_config(cls, **kw: Any) -> DemoConfig:
        """The ``--quick`` sizes: a quarter of the data, fewer epochs and timing rounds."""
        return cls(quick=True, train_examples=512, test_examples=120, epochs=2, repeats=3, interval=4, **kw)


@dataclass
class ToySetup:
    """The toy base model and the downstream task's data, shared by every method of a run.

    Attributes:
        base: the frozen toy LLaVA (copy it before adapting).
        collator: its chat collator.
        batches: the collated training batches (collated once, reused by every method).
        heldout: the collated val batches (the bandit's held-out set).
        val / test: the val and test examples.
    """

    base: nn.Module
    collator: ChatCollator
    batches: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    val: list[ChatExample]
    test: list[ChatExample]

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    @property
    def num_layers(self) -> int:
        return self.base.config.text_config.num_hidden_layers


def toy_setup(
    model: str | Path, train_examples: int, val_examples: int, test_examples: int, batch_size: int, seed: int
) -> ToySetup:
    """Load the toy checkpoint ``model`` (frozen) and build the downstream task's splits, seeded.

    Raises:
        FileNotFoundError: the toy checkpoint is missing.
    """
    base, processor = load_toy(model)
    base.requires_grad_(False)
    collator = ChatCollator(processor)
    task = SyntheticTask(families=DOWNSTREAM_FAMILIES, image_size=base.config.vision_config.image_size)
    bs = batch_size
    lazy = SyntheticBatches(task, collator, train_examples // bs, bs, "train", seed)
    val = task.examples(val_examples, "val", seed)
    heldout = [collator(val[i : i + bs]) for i in range(0, len(val), bs)]
    test = task.examples(test_examples, "test", seed)
    return ToySetup(base, collator, [lazy[i] for i in range(len(lazy))], heldout, val, test)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_demo(config: DemoConfig, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every method and measure it; returns the ``results.json`` content (also written to ``out``).

    Raises:
        FileNotFoundError: the toy checkpoint is missing.
    """
    start = time.perf_counter()
    out_dir = Path(out) if out is not None else None
    sizes = (config.train_examples, config.val_examples, config.test_examples)
    setup = toy_setup(config.model, *sizes, config.batch_size, config.seed)
    base, collator, batches, heldout = setup.base, setup.collator, setup.batches, setup.heldout
    val, test, total_params, num_layers = setup.val, setup.test, setup.total_params, setup.num_layers
    bs = config.batch_size
    k1, k2 = config.k
    tc = TrainConfig(epochs=config.epochs, lr=config.lr, seed=config.seed, progress=progress)
    search_cfg = {
        "warmup_epochs": config.search_warmup_epochs,
        "search_epochs": config.search_epochs,
        "interval": config.interval,
        "train": TrainConfig(lr=config.lr, seed=config.seed, progress=progress),
    }

    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    trajectories: dict[str, Path] = {}
    steps = tqdm(total=len(METHODS) + 2, desc="demo", disable=not progress)

    def record(
        method: str, model: nn.Module, trainable: int, k: int | None, merged: bool, **extra: Any
    ) -> None:
        name = method if k is None or method in ("pia",) else f"{method} k={k}"
        models[name] = model
        rows.append(
            {
                "name": name,
                "method": method,
                "k": k,
                "trainable_params": trainable,
                "trainable_pct": 100 * trainable / total_params,
                "merged": merged,
                **extra,
            }
        )

    def fresh() -> nn.Module:
        return copy.deepcopy(base)

    def eas_method(method: str, cfg: EASConfig, k: int | None) -> None:
        model = train(fresh(), batches, tc, eas=cfg)
        trainable = model.trainable_parameters()[0]
        das = bool(cfg.skip_layers)
        unmerged_acc = evaluate(model, collator, test, bs, 3, progress=False).accuracy
        final = model if das else model.merge_and_unload("static")
        # DAS's ReLU adapters stay in the model: down and up projection per token per skipped layer
        per_token = len(cfg.skip_layers) * 2 * base.config.text_config.hidden_size * cfg.replace_dim
        record(
            method,
            final,
            trainable,
            k,
            not das,
            accuracy_unmerged=unmerged_acc,
            adapter_macs_per_token=per_token,
        )

    def searched(kind: str, k: int, tag: str) -> Plan:
        folder = out_dir / f"search_{tag}" if out_dir is not None else None
        result = search(
            fresh(), batches, heldout, SearchConfig(k=k, candidates=kind, **search_cfg), out=folder
        )
        if folder is not None:
            trajectories[tag] = folder / "preferences.png"
        return result.plan

    # zero-shot: the base model itself
    record("zero_shot", base, 0, None, True)
    steps.update(1)
    # full fine-tuning of the LLM and projector (the vision tower stays frozen)
    full = fresh()
    for name, p in full.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    fit(
        full,
        batches,
        TrainConfig(epochs=config.epochs, lr=config.lr / 10, seed=config.seed, progress=progress),
        name="full_ft",
    )
    record("full_ft", full, _trainable(full), None, True)
    steps.update(1)
    # LoRA through peft, merged for inference
    lora = lora_model(fresh())  # every projection of the language model, none of the vision tower
    fit(lora, batches, tc, name="lora")
    lora_trainable = _trainable(lora)
    record("lora", lora.merge_and_unload(), lora_trainable, None, True)
    steps.update(1)
    # PIA adapters, nothing skipped
    eas_method("pia", EASConfig(), None)
    steps.update(1)
    # EAS: k attentions found by the bandit, for two k
    for k in (k1, k2):
        plan = searched("attention", k, f"eas_k{k}")
        eas_method("eas", eas_config_for_plan(plan, "attention"), k)
    steps.update(2)
    # controls of the same size
    attention = Candidates("attention", num_layers)
    eas_method(
        "eas_random", eas_config_for_plan(control_plan(attention, k1, "random", config.seed), "attention"), k1
    )
    eas_method("eas_last_k", eas_config_for_plan(control_plan(attention, k1, "last_k"), "attention"), k1)
    steps.update(2)
    # the MLP ablation and DAS
    eas_method("mlp_skip", eas_config_for_plan(searched("mlp", k1, f"mlp_k{k1}"), "mlp"), k1)
    das_plan = searched("layer", config.das_layers, f"das_k{config.das_layers}")
    eas_method("das", eas_config_for_plan(das_plan, "layer"), config.das_layers)
    steps.update(2)
    # visual-token exit composed with the first EAS model: VTW's layer calibrated on the val split
    vtw = copy.deepcopy(models[f"eas k={k1}"])
    calibration = calibrate_vtw(
        vtw,
        val,
        eta=config.vtw_eta,
        collator=collator,
        batch_size=bs,
        plot=out_dir / "vtw_kl.png" if out_dir is not None else None,
        progress=False,
    )
    apply_plan(vtw, current_plan(vtw).replace(visual_exit_layer=calibration.layer))
    eas_row = next(r for r in rows if r["name"] == f"eas k={k1}")
    record("eas_vtw", vtw, eas_row["trainable_params"], k1, True, vtw_kl=calibration.kl)
    steps.update(1)
    steps.close()

    # accuracy, MACs and latency of every final model
    prompt = collator([test[0]], train=False)
    prompt_tokens = int(prompt["input_ids"].shape[1])
    for row in tqdm(rows, desc="evaluating", disable=not progress, leave=False):
        model = models[row["name"]]
        row["accuracy"] = evaluate(model, collator, test, bs, 3, progress=False).accuracy
        plan = current_plan(model)
        row["skip_attention"], row["skip_mlp"] = list(plan.skip_attention), list(plan.skip_mlp)
        whole = sorted(set(plan.skip_attention) & set(plan.skip_mlp)) if row["method"] == "das" else []
        row["skip_layers"] = whole
        row["visual_exit_layer"] = plan.visual_exit_layer
        macs = count_macs(
            base.config, prompt_tokens, plan, extra_per_token=row.pop("adapter_macs_per_token", 0)
        )
        row["macs_g"] = macs.total / 1e9
    timings = measure_models(
        models, prompt, new_tokens=config.new_tokens, repeats=config.repeats, progress=progress
    )
    for row in rows:
        t = timings[row["name"]]
        row["prefill_ms"] = t.prefill_s * 1e3
        row["decode_ms_per_token"] = t.decode_s_per_token * 1e3
        row["kv_cache_bytes"] = t.kv_cache_bytes

    result = {
        "rows": rows,
        "meta": {
            "seed": config.seed,
            "quick": config.quick,
            "config": {k: v for k, v in asdict(config).items()},
            "prompt_tokens": prompt_tokens,
            "downstream_families": list(DOWNSTREAM_FAMILIES),
            **run_info(next(base.parameters()).device, next(base.parameters()).dtype),
            "seconds": time.perf_counter() - start,
        },
    }
    if out_dir is not None:
        atomic_write_text(out_dir / "results.json", json.dumps(result, indent=2) + "\n")
        plot_tradeoff(rows, out_dir / "accuracy_vs_decode.png")
        if f"eas_k{k1}" in trajectories:
            shutil.copyfile(trajectories[f"eas_k{k1}"], out_dir / "preferences.png")
    return result


def _skipped(r: dict[str, Any]) -> str:
    if r["skip_layers"]:
        return f"layers {r['skip_layers']}"
    parts = [
        f"attn {r['skip_attention']}" if r["skip_attention"] else "",
        f"mlp {r['skip_mlp']}" if r["skip_mlp"] else "",
    ]
    if r.get("visual_exit_layer") is not None:
        parts.append(f"visual K={r['visual_exit_layer']}")
    return " ".join(p for p in parts if p) or "-"


def format_table(result: dict[str, Any]) -> str:
    """The demo's results as a fixed-width table."""
    return format_rows(
        result["rows"],
        [
            ("method", 18, lambda r: r["name"]),
            ("trainable", 11, lambda r: f"{r['trainable_params']:,}"),
            ("%", 8, lambda r: f"{r['trainable_pct']:.2f}"),
            ("GMACs", 8, lambda r: f"{r['macs_g']:.3f}"),
            ("acc %", 8, lambda r: f"{100 * r['accuracy']:.1f}"),
            ("prefill ms", 12, lambda r: f"{r['prefill_ms']:.2f}"),
            ("decode ms/tok", 15, lambda r: f"{r['decode_ms_per_token']:.2f}"),
            ("merged", 8, lambda r: "yes" if r["merged"] else "no"),
            ("  skipped", 34, lambda r: f"  {_skipped(r)}", "<"),
        ],
    )
