"""The study: the paper's experiment tables, reproduced on the bundled toy (METHODS §2 and §3).

``skipvlm study --out DIR`` adapts the toy LLaVA of :mod:`skipvlm.demo` to the same downstream task and
writes four parts, each as JSON, a markdown table and a plot (:mod:`skipvlm.study_report`):

* ``validation``: the search against ground truth. Every plan that skips ``validation_k`` attentions
  (all ``C(L, k)`` of them: 28 on the 8-layer toy at k = 2) is trained with the same budget and
  measured on the test split (accuracy and the answers' negative log-likelihood); the bandit searches
  with several seeds and its plan is placed in that distribution (percentile), beside the random and
  last-k controls. The rank correlation between the bandit's final preferences (the summed ``H`` of a
  plan's arms) and the plans' test scores says whether it learnt the ordering at all; the same
  correlation for the supernet's own held-out loss of every plan (the proxy the bandit samples from)
  separates a weak proxy from a weak bandit. A few plans are trained again with another seed to
  measure the noise of one ground-truth number.
* ``k_sweep``: k = 0, 1, ... skipped attentions (plans found by the bandit): accuracy, trainable %,
  MACs, decode ms/token of the merged model.
* ``candidates``: the candidate table: MHA, FFN (replaced by an FFN-PIA, and plainly skipped) and
  MHA-or-FFN at each k.
* ``ablations``: the PIA design table (Base = one path; + Info. Exc.; + Frozen bias; + Re-param) and
  the replace-PIA reading ``rms(h)``.

Every training and every search is a *job* with a JSON spec; its result is written atomically to
``DIR/jobs/<id>.json`` (with the adapters of trained plans), so a rerun with the same settings
continues where a killed one stopped and a rerun with other settings never reuses a stale result.
Jobs run in ``workers`` processes (one thread each); timing runs afterwards in this process, every
timed model interleaved in one measurement.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from skipvlm.demo import ToySetup, toy_setup
from skipvlm.eas import EASConfig, EASModel
from skipvlm.evaluate import answer_loss, evaluate
from skipvlm.io import atomic_write_text
from skipvlm.search import Candidates, control_plan
from skipvlm.toy import SHIPPED
from skipvlm.train import SearchConfig, TrainConfig, eas_config_for_plan, search, train

__all__ = ["PARTS", "StudyConfig", "run_study"]

logger = logging.getLogger(__name__)

PARTS = ("validation", "k_sweep", "candidates", "ablations")

# The PIA design table, cumulative like the paper's, then the replace-input variant: row -> (EASConfig
# fields, merged). "Re-param" is the "+ Frozen bias" model merged into the weights.
ABLATIONS: dict[str, tuple[dict[str, Any], bool]] = {
    "Base (single path)": ({"single_path": True, "info_exchange": False, "freeze_pooled": False}, False),
    "+ Info. Exc.": ({"freeze_pooled": False}, False),
    "+ Frozen bias": ({}, False),
    "+ Re-param": ({}, True),
    "replace_input=rms (merged)": ({"replace_input": "rms"}, True),
}
# The candidate table's rows: row -> (search candidates, EASConfig fields of supernet and plan).
CANDIDATE_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "MHA": ("attention", {}),
    "FFN (PIA)": ("mlp", {"mlp_replace": "pia"}),
    "FFN (plain skip)": ("mlp", {}),
    "MHA or FFN (PIA)": ("attention_or_mlp", {"mlp_replace": "pia"}),
}


@dataclass
class StudyConfig:
    """Sizes and settings of the study. ``quick_config`` shrinks everything (a smoke run, not a result).

    Args:
        model: the toy checkpoint folder.
        parts: which of :data:`PARTS` to run.
        train_examples / val_examples / test_examples: split sizes; val feeds the bandit and the
            supernet-proxy ranking only.
        batch_size / epochs / lr: every trained plan's budget.
        search_warmup_epochs / search_epochs / interval / n_candidates: the bandit search (METHODS §3).
        score_batches: held-out batches each subset is scored on per bandit update (see
            :class:`~skipvlm.train.SearchConfig`; 4 x 16 questions: less reward noise than one batch).
        validation_k: attentions skipped by every plan of the ground truth.
        search_seeds: seeds of the validation's searches (and of its random controls).
        ground_seeds: training seeds of every ground-truth plan (seed, seed + 1, ...): its score is their
            mean, and their spread measures the noise of one training run.
        contrast_k: where the choice should matter more: the validation's searches also run at this k,
            and their plans are trained beside ``contrast_random`` distinct random plans and the last-k
            plan (one training seed each; 0 leaves this out).
        contrast_random: random plans of the contrast.
        sweep_k: the k of the sweep (0 = nothing skipped).
        candidate_k: the k of the candidate table.
        ablation_k: attentions skipped by the ablation models (the bandit's plan at that k).
        new_tokens / repeats: decode tokens per latency measurement and interleaved rounds.
        workers: processes that run jobs in parallel (one CPU thread each); 1 runs them here.
        seed: seed of data, training and the k-sweep / candidate / ablation searches.
    """

    model: str = field(default=str(SHIPPED), metadata={"help": "toy checkpoint folder"})
    quick: bool = field(default=False, metadata={"help": "smoke-run sizes"})
    parts: tuple[str, ...] = field(default=PARTS, metadata={"help": "parts to run"})
    train_examples: int = field(default=3072, metadata={"help": "training examples"})
    val_examples: int = field(default=256, metadata={"help": "held-out examples (bandit, proxy ranking)"})
    test_examples: int = field(default=600, metadata={"help": "test questions"})
    batch_size: int = field(default=16, metadata={"help": "batch size"})
    epochs: int = field(default=2, metadata={"help": "epochs of every trained plan"})
    lr: float = field(default=2e-3, metadata={"help": "learning rate"})
    search_warmup_epochs: int = field(default=1, metadata={"help": "search warm-up epochs"})
    search_epochs: int = field(default=1, metadata={"help": "bandit epochs"})
    interval: int = field(default=8, metadata={"help": "micro-batches (here: steps) between bandit updates"})
    n_candidates: int = field(default=3, metadata={"help": "subsets scored per bandit update"})
    score_batches: int = field(default=4, metadata={"help": "held-out batches per subset per update"})
    validation_k: int = field(default=2, metadata={"help": "attentions skipped by the ground-truth plans"})
    search_seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "validation search seeds"})
    ground_seeds: int = field(default=2, metadata={"help": "training seeds per ground-truth plan"})
    contrast_k: int = field(default=4, metadata={"help": "k of the bandit-vs-random contrast (0: none)"})
    contrast_random: int = field(default=6, metadata={"help": "random plans of the contrast"})
    sweep_k: tuple[int, ...] = field(default=(0, 1, 2, 3, 4, 5, 6), metadata={"help": "k of the sweep"})
    candidate_k: tuple[int, ...] = field(default=(1, 2, 3, 4), metadata={"help": "k of the candidate table"})
    ablation_k: int = field(default=2, metadata={"help": "attentions skipped by the ablation models"})
    new_tokens: int = field(default=16, metadata={"help": "decoded tokens per timing"})
    repeats: int = field(default=5, metadata={"help": "interleaved timing rounds"})
    workers: int = field(default=2, metadata={"help": "parallel job processes"})
    seed: int = field(default=0, metadata={"help": "seed"})

    def __post_init__(self) -> None:
        self.parts = tuple(self.parts)
        self.search_seeds, self.sweep_k, self.candidate_k = (
            tuple(self.search_seeds),
            tuple(self.sweep_k),
            tuple(self.candidate_k),
        )
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise ValueError(f"StudyConfig.parts must be some of {PARTS}, got {list(self.parts)}")
        for name in ("train_examples", "val_examples", "test_examples", "batch_size", "epochs", "interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"StudyConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "search_epochs", "validation_k", "ablation_k", "n_candidates", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"StudyConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ground_seeds", "contrast_random"):
            if getattr(self, name) < 1:
                raise ValueError(f"StudyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.search_seeds:
            raise ValueError("StudyConfig.search_seeds needs at least one seed")
        if min(self.sweep_k, default=0) < 0 or min(self.candidate_k, default=1) < 1:
            raise ValueError("StudyConfig.sweep_k must be >= 0 and candidate_k >= 1")
        for name in ("train_examples", "val_examples"):
            if getattr(self, name) < self.batch_size:
                raise ValueError(
                    f"StudyConfig.{name}={getattr(self, name)} holds no full batch of {self.batch_size}; "
                    "raise it or lower batch_size"
                )

    @classmethod
    def quick_config(cls, **kw: Any) -> StudyConfig:
        """The ``--quick`` sizes: every part and row, on tiny data with few steps (k = 1 ground truth)."""
        sizes = dict(
            quick=True,
            train_examples=32,
            val_examples=16,
            test_examples=16,
            epochs=1,
            interval=1,
            n_candidates=2,
            score_batches=1,
            validation_k=1,
            contrast_k=2,
            contrast_random=2,
            search_seeds=(0, 1),
            ground_seeds=2,
            sweep_k=(0, 1, 2),
            candidate_k=(2,),
            ablation_k=1,
            new_tokens=3,
            repeats=1,
            workers=1,
        )
        return cls(**(sizes | kw))

    def training(self) -> dict[str, Any]:
        """What every job's result depends on besides its own spec (a changed value reruns every job)."""
        keep = ("train_examples", "val_examples", "test_examples", "batch_size", "epochs", "lr")
        keep += ("search_warmup_epochs", "search_epochs", "interval", "n_candidates", "score_batches")
        return {"model": _model_name(self.model), **{k: getattr(self, k) for k in keep}}


_SHIPPED_NAME = "skipvlm:toy-llava"  # the shipped toy, wherever this checkout lies


def _model_name(folder: str) -> str:
    """How the settings name a toy: the shipped one by name (a moved checkout reuses its jobs), others by
    their absolute path."""
    path = Path(folder).resolve()
    return _SHIPPED_NAME if path == SHIPPED.resolve() else str(path)


def _model_folder(name: str) -> str:
    return str(SHIPPED) if name == _SHIPPED_NAME else name


# --- jobs ----------------------------------------------------------------------------------------------


def _train_spec(eas: EASConfig, seed: int) -> dict[str, Any]:
    return {"kind": "train", "eas": eas.to_dict(), "seed": seed}


def _search_spec(
    candidates: str, k: int, seed: int, eas: dict[str, Any], proxy: bool = False
) -> dict[str, Any]:
    return {"kind": "search", "candidates": candidates, "k": k, "seed": seed, "eas": eas, "proxy": proxy}


def job_id(spec: dict[str, Any]) -> str:
    """A readable, content-addressed name of a job: its kind, what it skips or searches, a digest."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    if spec["kind"] == "search":
        return f"search-{spec['candidates']}-k{spec['k']}-s{spec['seed']}-{digest}"
    eas = spec["eas"]
    skips = "-".join([*(f"a{i}" for i in eas["skip_attention"]), *(f"m{i}" for i in eas["skip_mlp"])])
    return f"train-{skips or 'none'}-s{spec['seed']}-{digest}"


_SETUP: dict[str, ToySetup] = {}  # one per process: the data of the settings it was built for


def _setup(settings: dict[str, Any], seed: int) -> ToySetup:
    key = json.dumps([settings, seed], sort_keys=True)
    if key not in _SETUP:
        _SETUP.clear()
        sizes = (settings["train_examples"], settings["val_examples"], settings["test_examples"])
        _SETUP[key] = toy_setup(_model_folder(settings["model"]), *sizes, settings["batch_size"], seed)
    return _SETUP[key]


def run_job(spec: dict[str, Any], settings: dict[str, Any], data_seed: int, folder: str) -> dict[str, Any]:
    """Run one job (a training or a search) and return its result; trained adapters go to ``folder``."""
    start = time.perf_counter()
    setup = _setup(settings, data_seed)
    base = copy.deepcopy(setup.base)
    lr, bs = settings["lr"], settings["batch_size"]
    if spec["kind"] == "train":
        cfg = EASConfig.from_dict(spec["eas"])
        tc = TrainConfig(epochs=settings["epochs"], lr=lr, seed=spec["seed"], progress=False)
        model = train(base, setup.batches, tc, eas=cfg)
        model.save_pretrained(Path(folder) / "adapters")
        result = {
            "trainable_params": model.trainable_parameters()[0],
            "accuracy": evaluate(model, setup.collator, setup.test, bs, 3, progress=False).accuracy,
            "answer_nll": answer_loss(model, setup.collator, setup.test, bs),
        }
    else:
        sc = SearchConfig(
            k=spec["k"],
            candidates=spec["candidates"],
            warmup_epochs=settings["search_warmup_epochs"],
            search_epochs=settings["search_epochs"],
            interval=settings["interval"],
            n_candidates=settings["n_candidates"],
            score_batches=settings["score_batches"],
            train=TrainConfig(lr=lr, seed=spec["seed"], progress=False),
        )
        eas = EASConfig.from_dict(EASConfig(init_seed=spec["seed"]).to_dict() | spec["eas"])
        found = search(base, setup.batches, setup.heldout, sc, eas=eas)
        result = {
            "arms": found.arms,
            "plan": found.plan.to_dict(),
            "preferences": found.bandit.preferences.tolist(),
            "updates": found.bandit.updates,
            "trajectory": [{"step": t["step"], "preferences": t["preferences"]} for t in found.trajectory],
        }
        if spec["proxy"]:
            result["proxy_nll"] = _proxy_losses(found.model, spec, setup)
    result["seconds"] = time.perf_counter() - start
    return result


def _proxy_losses(supernet: EASModel, spec: dict[str, Any], setup: ToySetup) -> dict[str, float]:
    """The supernet's answer NLL on the whole val split for every k-subset (the search's own proxy)."""
    cands = Candidates(spec["candidates"], setup.num_layers)
    losses = {}
    for arms in itertools.combinations(range(cands.num_arms), spec["k"]):
        supernet.set_plan(cands.plan(list(arms)))
        losses[",".join(map(str, arms))] = answer_loss(supernet, setup.collator, setup.val, 64)
    return losses


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group: only the parent acts on it (it terminates the workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    logging.getLogger("skipvlm").setLevel(logging.WARNING)


def _run_keyed(item: tuple[str, tuple[Any, ...]]) -> tuple[str, dict[str, Any]]:
    jid, args = item
    return jid, run_job(*args)


class _Terminated(Exception):
    """The study was sent SIGTERM (``kill``): stop the workers too, keep the finished jobs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(f"stopped by signal {signum}; finished jobs are kept, run the same command to continue")


def run_jobs(
    specs: list[dict[str, Any]], config: StudyConfig, out: Path, progress: bool = True, desc: str = "jobs"
) -> dict[str, dict[str, Any]]:
    """Results of ``specs`` by :func:`job_id`: those already in ``out/jobs`` with the same spec and
    settings are read back, the others run (in ``config.workers`` processes) and are written atomically."""
    settings = config.training()
    jobs = out / "jobs"
    results: dict[str, dict[str, Any]] = {}
    todo: dict[str, dict[str, Any]] = {}
    for spec in specs:
        jid = job_id(spec)
        path = jobs / f"{jid}.json"
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except ValueError:  # damaged (written by hand): run it again rather than trust it
                saved = {}
            if (
                saved.get("spec") == spec
                and saved.get("settings") == settings
                and saved.get("seed") == config.seed
            ):
                results[jid] = saved["result"]
                continue
        todo[jid] = spec

    def finish(jid: str, result: dict[str, Any]) -> None:
        record = {"spec": todo[jid], "settings": settings, "seed": config.seed, "result": result}
        atomic_write_text(jobs / f"{jid}.json", json.dumps(record, indent=1) + "\n")
        results[jid] = result

    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo)
    args = {jid: (spec, settings, config.seed, str(jobs / jid)) for jid, spec in todo.items()}
    if config.workers > 1 and len(todo) > 1:
        context = get_context("spawn")  # fresh interpreters: no forked torch thread pools
        # a failed job, Ctrl-C or kill: the pool's exit terminates the workers (finished jobs are kept)
        main = threading.current_thread() is threading.main_thread()  # where signal handlers may be set
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
        try:
            with context.Pool(min(config.workers, len(todo)), _init_worker) as pool:
                for jid, result in pool.imap_unordered(_run_keyed, list(args.items())):
                    finish(jid, result)
                    bar.update(1)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
    else:
        for jid, a in args.items():
            finish(jid, run_job(*a))
            bar.update(1)
    bar.close()
    return results


# --- the study -----------------------------------------------------------------------------------------


def _plan_specs(config: StudyConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every search the chosen parts need, and what each part needs of them (by job id)."""
    searches: list[dict[str, Any]] = []
    need: dict[str, Any] = {}

    def add(spec: dict[str, Any]) -> str:
        if spec not in searches:
            searches.append(spec)
        return job_id(spec)

    if "validation" in config.parts:
        need["validation"] = {
            s: add(_search_spec("attention", config.validation_k, s, {}, proxy=True))
            for s in config.search_seeds
        }
        if config.contrast_k:
            need["contrast"] = {
                s: add(_search_spec("attention", config.contrast_k, s, {})) for s in config.search_seeds
            }
    if "k_sweep" in config.parts:
        need["k_sweep"] = {k: add(_search_spec("attention", k, config.seed, {})) for k in config.sweep_k if k}
    if "candidates" in config.parts:
        need["candidates"] = {
            (row, k): add(_search_spec(kind, k, config.seed, fields))
            for row, (kind, fields) in CANDIDATE_ROWS.items()
            if row != "FFN (plain skip)"  # trains the plan the FFN-PIA search found
            for k in config.candidate_k
        }
    if "ablations" in config.parts:
        need["ablations"] = add(_search_spec("attention", config.ablation_k, config.seed, {}))
    return searches, need


def run_study(config: StudyConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the chosen parts (searches, then trainings, then timing) and write every result to ``out``.

    Returns:
        The content of ``out/study.json``.
    """
    from skipvlm.study_report import assemble, write_report

    start = time.perf_counter()
    out = Path(out)
    setup = _setup(config.training(), config.seed)
    num_layers = setup.num_layers
    searches, need = _plan_specs(config)
    found = run_jobs(searches, config, out, progress, "searches")
    trainings, rows = _training_specs(config, need, found, num_layers)
    trained = run_jobs(list({job_id(s): s for s in trainings}.values()), config, out, progress, "training")
    parts = assemble(config, setup, need, found, rows, trained, out, progress)
    meta = {
        "config": asdict(config),
        "prompt_tokens": int(setup.collator([setup.test[0]], train=False)["input_ids"].shape[1]),
    }
    result = {"parts": parts, "meta": meta | {"seconds": time.perf_counter() - start}}
    write_report(result, out)
    return result


def _training_specs(
    config: StudyConfig, need: dict[str, Any], found: dict[str, dict[str, Any]], num_layers: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every training the parts need, and each part's rows as (row name, training job id, extras)."""
    specs: list[dict[str, Any]] = []
    rows: dict[str, Any] = {}
    seed = config.seed

    def add(cfg: EASConfig, s: int = seed) -> str:
        spec = _train_spec(cfg, s)
        specs.append(spec)
        return job_id(spec)

    def searched(jid: str, kind: str, fields: dict[str, Any]) -> EASConfig:
        from skipvlm.plan import Plan

        plan = Plan.from_dict(found[jid]["plan"])
        return eas_config_for_plan(plan, kind, EASConfig.from_dict(EASConfig().to_dict() | fields))

    if "validation" in need:
        cands = Candidates("attention", num_layers)
        k = config.validation_k
        plans = [list(c) for c in itertools.combinations(range(num_layers), k)]
        seeds = range(seed, seed + config.ground_seeds)
        ground = {
            ",".join(map(str, p)): [add(EASConfig(skip_attention=p, init_seed=s), s) for s in seeds]
            for p in plans
        }
        controls = {
            "last_k": control_plan(cands, k, "last_k").skip_attention,
            **{
                f"random s={s}": control_plan(cands, k, "random", s).skip_attention
                for s in config.search_seeds
            },
        }
        rows["validation"] = {
            "ground": ground,
            "contrast": _contrast(config, need, found, cands, add) if "contrast" in need else None,
            "controls": {name: ",".join(map(str, p)) for name, p in controls.items()},
        }
    if "k_sweep" in need:
        sweep = []
        for k in config.sweep_k:
            cfg = searched(need["k_sweep"][k], "attention", {}) if k else EASConfig()
            sweep.append({"k": k, "train": add(cfg)})
        rows["k_sweep"] = sweep
    if "candidates" in need:
        table = []
        for row, (kind, fields) in CANDIDATE_ROWS.items():
            for k in config.candidate_k:
                source = "FFN (PIA)" if row == "FFN (plain skip)" else row
                jid = need["candidates"][(source, k)]
                table.append({"row": row, "k": k, "search": jid, "train": add(searched(jid, kind, fields))})
        rows["candidates"] = table
    if "ablations" in need:
        table = []
        for row, (fields, merged) in ABLATIONS.items():
            cfg = searched(need["ablations"], "attention", fields)
            table.append({"row": row, "merged": merged, "train": add(cfg)})
        rows["ablations"] = table
    return specs, rows


def _contrast(
    config: StudyConfig, need: dict[str, Any], found: dict[str, Any], cands: Candidates, add
) -> dict:
    """The contrast's plans by who chose them (bandit seeds, distinct random plans, last k) -> training id."""
    k = config.contrast_k
    plans = {f"bandit s={s}": found[jid]["arms"] for s, jid in need["contrast"].items()}
    randoms: list[list[int]] = []
    seed = 1000  # other seeds than the validation's random controls
    while len(randoms) < min(config.contrast_random, math.comb(cands.num_arms, k)):
        arms = control_plan(cands, k, "random", seed).skip_attention
        if list(arms) not in randoms:
            randoms.append(list(arms))
        seed += 1
    plans |= {f"random {i}": arms for i, arms in enumerate(randoms)}
    plans["last_k"] = list(control_plan(cands, k, "last_k").skip_attention)
    return {
        who: {
            "plan": ",".join(map(str, arms)),
            "train": add(EASConfig(skip_attention=arms, init_seed=config.seed)),
        }
        for who, arms in plans.items()
    }
