"""The study's numbers, tables and plots (see :mod:`skipvlm.study`; METHODS §2 and §3).

Search validation statistics, over the ``N`` ground-truth plans with test scores ``a_p``:

* percentile of plan ``p``: ``100 * (#{q != p: a_q < a_p} + #{q != p: a_q = a_p} / 2) / (N - 1)``, the
  share of the other plans it beats (ties half); the median plan is at 50 and the best at 100;
* Spearman's ``rho``: the Pearson correlation of the average ranks of two score lists;
* the noise of one ground-truth number: ``sd = sqrt(mean_p (a_p - a'_p)^2 / 2)`` over plans trained
  twice with different seeds (``a'``), beside the binomial standard error ``sqrt(a (1 - a) / T)`` of an
  accuracy on ``T`` test questions.

Answer NLL (lower is better) is reported beside accuracy; its percentiles and correlations are taken
on ``-nll`` so that higher is better everywhere.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skipvlm.bench import measure_models
from skipvlm.bench.methods import adapter_macs_per_token
from skipvlm.cost import count_macs
from skipvlm.eas import EASConfig, EASModel
from skipvlm.evaluate import answer_loss, evaluate
from skipvlm.io import atomic_write_text
from skipvlm.plan import Plan
from skipvlm.plots import plot_distribution, plot_preferences, plot_series, plot_tradeoff
from skipvlm.runinfo import run_info
from skipvlm.runtime import current_plan
from skipvlm.search import Candidates

__all__ = ["assemble", "format_tables", "percentile", "spearman", "write_report"]


def percentile(scores: Sequence[float], index: int) -> float:
    """The share (%) of the other scores that ``scores[index]`` beats, ties counted half."""
    mine, others = scores[index], [s for i, s in enumerate(scores) if i != index]
    if not others:
        return 50.0
    beaten = sum(s < mine for s in others) + 0.5 * sum(s == mine for s in others)
    return 100.0 * beaten / len(others)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either list is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two lists of the same length >= 2, got {len(x)} and {len(y)}")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else float("nan")


def _key(arms: Sequence[int]) -> str:
    return ",".join(map(str, sorted(arms)))


# --- the parts ------------------------------------------------------------------------------------------


def _validation(config, setup, need, found, rows, trained) -> dict[str, Any]:
    runs = {plan: [trained[jid] for jid in jids] for plan, jids in rows["ground"].items()}
    ground = {
        plan: {m: statistics.fmean(r[m] for r in rs) for m in ("accuracy", "answer_nll")}
        for plan, rs in runs.items()
    }
    plans = list(ground)
    acc = [ground[p]["accuracy"] for p in plans]
    nll = [-ground[p]["answer_nll"] for p in plans]  # higher is better

    def place(plan: str) -> dict[str, Any]:
        i = plans.index(plan)
        return {
            "plan": plan,
            "accuracy": acc[i],
            "answer_nll": -nll[i],
            "percentile_accuracy": percentile(acc, i),
            "percentile_nll": percentile(nll, i),
        }

    searches = []
    for seed, jid in need.items():
        res = found[jid]
        h = res["preferences"]
        h_sum = [sum(h[int(a)] for a in p.split(",")) for p in plans]
        entry = {"seed": seed, **place(_key(res["arms"])), "preferences": h, "updates": res["updates"]}
        entry["spearman_h_accuracy"], entry["spearman_h_nll"] = spearman(h_sum, acc), spearman(h_sum, nll)
        proxy = [-res["proxy_nll"][p] for p in plans]
        entry["spearman_proxy_accuracy"], entry["spearman_proxy_nll"] = (
            spearman(proxy, acc),
            spearman(proxy, nll),
        )
        entry["proxy_best"] = plans[max(range(len(plans)), key=lambda i: proxy[i])]
        searches.append(entry)

    def seed_sd(metric: str) -> float | None:
        """The sd of one training run's number around its plan's mean, pooled over the plans."""
        if config.ground_seeds < 2:
            return None
        return math.sqrt(statistics.fmean(statistics.variance(r[metric] for r in rs) for rs in runs.values()))

    mean_acc = statistics.fmean(acc)
    summary = {
        "plans": len(plans),
        "accuracy_mean": mean_acc,
        "accuracy_sd": statistics.pstdev(acc),
        "accuracy_min": min(acc),
        "accuracy_median": statistics.median(acc),
        "accuracy_max": max(acc),
        "nll_sd": statistics.pstdev(nll),
        "best_plan": plans[max(range(len(plans)), key=lambda i: acc[i])],
        "binomial_se": math.sqrt(mean_acc * (1 - mean_acc) / config.test_examples),
        "seed_sd_accuracy": seed_sd("accuracy"),
        "seed_sd_nll": seed_sd("answer_nll"),
        "seeds": config.ground_seeds,
        "bandit_percentile_accuracy_mean": statistics.fmean(s["percentile_accuracy"] for s in searches),
        "bandit_percentile_nll_mean": statistics.fmean(s["percentile_nll"] for s in searches),
    }
    return {
        "contrast": _contrast(config, rows["contrast"], trained) if rows.get("contrast") else None,
        "k": config.validation_k,
        "ground_truth": [
            {"plan": p, **ground[p], "runs": [{m: r[m] for m in ("accuracy", "answer_nll")} for r in runs[p]]}
            for p in plans
        ],
        "searches": searches,
        "controls": {name: place(plan) for name, plan in rows["controls"].items()},
        "summary": summary,
        "trajectories": {str(s): found[jid]["trajectory"] for s, jid in need.items()},
    }


def _contrast(config, rows: dict[str, Any], trained) -> dict[str, Any]:
    """The bandit's plans at ``contrast_k`` beside random plans: each bandit plan's share of the random plans
    it beats (ties half), and the means."""
    plans = {who: {"plan": r["plan"], **_scores(trained[r["train"]])} for who, r in rows.items()}
    randoms = [p for who, p in plans.items() if who.startswith("random")]
    for who, p in plans.items():
        if who.startswith("bandit"):
            for metric, sign in (("accuracy", 1), ("answer_nll", -1)):
                scores = [sign * p[metric]] + [sign * r[metric] for r in randoms]
                p[f"beats_random_{metric}"] = percentile(scores, 0)
    bandits = [p for who, p in plans.items() if who.startswith("bandit")]
    return {
        "k": config.contrast_k,
        "plans": plans,
        "bandit_accuracy_mean": statistics.fmean(p["accuracy"] for p in bandits),
        "random_accuracy_mean": statistics.fmean(p["accuracy"] for p in randoms),
        "bandit_nll_mean": statistics.fmean(p["answer_nll"] for p in bandits),
        "random_nll_mean": statistics.fmean(p["answer_nll"] for p in randoms),
    }


def _scores(result: dict[str, Any]) -> dict[str, float]:
    return {m: result[m] for m in ("accuracy", "answer_nll")}


def _measured_row(setup, trained, jid, merged, models, name, prompt_tokens) -> dict[str, Any]:
    """A trained plan's row, its model reloaded for timing: merged, it is measured again (the static merge
    folds calibration means, so its answers may differ from the unmerged model's)."""
    folder = Path(trained[jid]["folder"]) / "adapters"
    model = EASModel.from_pretrained(copy.deepcopy(setup.base), folder)
    cfg, plan, result = model.eas_config, current_plan(model), dict(trained[jid])
    final = model.merge_and_unload("static") if merged else model
    if merged:
        bs = len(setup.heldout[0]["input_ids"])
        result["accuracy_unmerged"] = result["accuracy"]
        result["accuracy"] = evaluate(final, setup.collator, setup.test, bs, 3, progress=False).accuracy
        result["answer_nll"] = answer_loss(final, setup.collator, setup.test, bs)
    models[name] = final
    row = _row(setup, result, cfg, plan, prompt_tokens, adapter_macs_per_token(final))
    return row | {"merged": merged, "accuracy_unmerged": result.get("accuracy_unmerged")}


def _row(setup, result, cfg, plan: Plan, prompt_tokens: int, extra: int = 0) -> dict[str, Any]:
    # a skipped MLP's FFN-PIA, merged: a rank-d_r affine map per token (0 for the plain skip)
    ffn = cfg.mlp_replacement_macs(setup.base.config.text_config.hidden_size)
    macs = count_macs(setup.base.config, prompt_tokens, plan, extra_per_token=extra, mlp_replacement=ffn)
    return {
        "skip_attention": list(plan.skip_attention),
        "skip_mlp": list(plan.skip_mlp),
        "accuracy": result["accuracy"],
        "answer_nll": result["answer_nll"],
        "trainable_params": result["trainable_params"],
        "trainable_pct": 100 * result["trainable_params"] / setup.total_params,
        "macs_g": macs.total / 1e9,
    }


def assemble(config, setup, need, found, rows, trained, out: Path, progress: bool) -> dict[str, Any]:
    """Every part's rows and statistics from the finished jobs; times the k-sweep and ablation models."""
    for jid in trained:
        trained[jid]["folder"] = str(out / "jobs" / jid)
    prompt = setup.collator([setup.test[0]], train=False)
    prompt_tokens = int(prompt["input_ids"].shape[1])
    parts: dict[str, Any] = {}
    models: dict[str, Any] = {}
    if "validation" in rows:
        parts["validation"] = _validation(
            config, setup, need["validation"], found, rows["validation"], trained
        )
    if "k_sweep" in rows:
        sweep = []
        for r in rows["k_sweep"]:
            name = f"k={r['k']}"
            sweep.append(
                {"name": name, "k": r["k"]}
                | _measured_row(setup, trained, r["train"], True, models, name, prompt_tokens)
            )
        parts["k_sweep"] = sweep
    if "candidates" in rows:
        table = []
        for r in rows["candidates"]:
            spec = json.loads((out / "jobs" / f"{r['train']}.json").read_text())["spec"]
            cfg = EASConfig.from_dict(spec["eas"])
            entry = {"name": f"{r['row']} k={r['k']}", "row": r["row"], "k": r["k"]}
            table.append(entry | _row(setup, trained[r["train"]], cfg, cfg.plan(), prompt_tokens))
        parts["candidates"] = table
    if "ablations" in rows:
        table = []
        for r in rows["ablations"]:
            table.append(
                {"name": r["row"]}
                | _measured_row(setup, trained, r["train"], r["merged"], models, r["row"], prompt_tokens)
            )
        parts["ablations"] = table
    if models:
        timings = measure_models(
            models, prompt, new_tokens=config.new_tokens, repeats=config.repeats, progress=progress
        )
        for part in ("k_sweep", "ablations"):
            for row in parts.get(part, []):
                t = timings[row["name"]]
                row["prefill_ms"], row["decode_ms_per_token"] = t.prefill_s * 1e3, t.decode_s_per_token * 1e3
                row["kv_cache_bytes"] = t.kv_cache_bytes
    return parts


# --- tables, plots, files ------------------------------------------------------------------------------


def _md(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Any]]) -> str:
    """A markdown table: one line per row, one cell per (header, row -> text) column."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def _skips(row: dict[str, Any]) -> str:
    attn = f"attn {row['skip_attention']}" if row["skip_attention"] else ""
    mlp = f"mlp {row['skip_mlp']}" if row["skip_mlp"] else ""
    return " ".join(p for p in (attn, mlp) if p) or "-"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


_ACC = ("accuracy %", lambda r: _pct(r["accuracy"]))
_NLL = ("answer NLL", lambda r: f"{r['answer_nll']:.3f}")
_UNMERGED = ("unmerged acc %", lambda r: _pct(r.get("accuracy_unmerged")))
_TRAINABLE = ("trainable %", lambda r: f"{r['trainable_pct']:.2f}")
_MACS = ("GMACs", lambda r: f"{r['macs_g']:.4f}")
_TIMES = [
    ("prefill ms", lambda r: f"{r['prefill_ms']:.2f}"),
    ("decode ms/token", lambda r: f"{r['decode_ms_per_token']:.2f}"),
]
_PLACES = [
    ("percentile (acc)", lambda r: f"{r['percentile_accuracy']:.0f}"),
    ("percentile (NLL)", lambda r: f"{r['percentile_nll']:.0f}"),
]
_RHOS = [
    (f"rho({a}, {b})", lambda r, k=f"spearman_{key}_{m}": f"{r[k]:.2f}" if k in r else "")
    for a, key in (("H", "h"), ("proxy", "proxy"))
    for b, m in (("acc", "accuracy"), ("-NLL", "nll"))
]


def _validation_text(v: dict[str, Any]) -> str:
    s = v["summary"]
    rows = [e | {"who": f"bandit seed {e['seed']}"} for e in v["searches"]]
    rows += [c | {"who": name} for name, c in v["controls"].items()]
    table = _md(
        rows, [("plan", lambda r: r["plan"]), ("who", lambda r: r["who"]), _ACC, _NLL, *_PLACES, *_RHOS]
    )
    seeds = s["seeds"]
    noise = (
        f"one training run's seed sd is {_pct(s['seed_sd_accuracy'])} points of accuracy and "
        f"{s['seed_sd_nll']:.3f} of NLL, so a plan's mean of {seeds} runs is uncertain by about "
        f"{_pct(s['seed_sd_accuracy'] / math.sqrt(seeds))} points and "
        f"{s['seed_sd_nll'] / math.sqrt(seeds):.3f}"
        if s["seed_sd_accuracy"] is not None
        else "one training seed per plan: its seed noise is not measured"
    )
    return (
        f"## Search validation: the bandit's k={v['k']} plan among all {s['plans']} plans\n\n{table}\n\n"
        f"The {s['plans']} plans (each the mean of {seeds} training seed(s)): accuracy "
        f"{_pct(s['accuracy_min'])} / {_pct(s['accuracy_median'])} / {_pct(s['accuracy_max'])} % (min / "
        f"median / max), sd {_pct(s['accuracy_sd'])} points; NLL sd {s['nll_sd']:.3f}; best plan "
        f"[{s['best_plan']}]. Noise: the binomial se of one accuracy is {_pct(s['binomial_se'])} points; "
        f"{noise}. Mean bandit percentile: {s['bandit_percentile_accuracy_mean']:.0f} (accuracy), "
        f"{s['bandit_percentile_nll_mean']:.0f} (NLL)."
    ) + (_contrast_text(v["contrast"]) if v.get("contrast") else "")


def _beats(metric: str) -> Any:
    key = f"beats_random_{metric}"
    return lambda r: f"{r[key]:.0f}" if key in r else ""


def _contrast_text(c: dict[str, Any]) -> str:
    rows = [p | {"who": who} for who, p in c["plans"].items()]
    beats = [("beats random (acc) %", _beats("accuracy")), ("beats random (NLL) %", _beats("answer_nll"))]
    table = _md(rows, [("plan", lambda r: r["plan"]), ("who", lambda r: r["who"]), _ACC, _NLL, *beats])
    return (
        f"\n\n### Where the choice matters more: k={c['k']} (one training seed per plan)\n\n{table}\n\n"
        f"Bandit plans: mean accuracy {_pct(c['bandit_accuracy_mean'])} %, NLL {c['bandit_nll_mean']:.3f}; "
        f"random plans: {_pct(c['random_accuracy_mean'])} %, NLL {c['random_nll_mean']:.3f}."
    )


def format_tables(result: dict[str, Any]) -> str:
    """Every part of a study result as markdown tables (the content of ``tables.md``)."""
    parts, out = result["parts"], []
    skipped = ("skipped", _skips)
    if "validation" in parts:
        out.append(_validation_text(parts["validation"]))
    if "k_sweep" in parts:
        columns = [("k", lambda r: r["k"]), skipped, _ACC, _UNMERGED, _NLL, _TRAINABLE, _MACS, *_TIMES]
        out.append("## Skipped attentions k (plans found by the bandit; merged models)")
        out.append(_md(parts["k_sweep"], columns))
    if "candidates" in parts:
        columns = [("candidates", lambda r: r["row"]), ("k", lambda r: r["k"]), skipped, _ACC, _NLL]
        out.append("## Candidates: what is skipped (plans found by the bandit; unmerged models)")
        out.append(_md(parts["candidates"], [*columns, _TRAINABLE, _MACS]))
    if "ablations" in parts:
        merged = ("merged", lambda r: "yes" if r["merged"] else "no")
        columns = [("PIA", lambda r: r["name"]), merged, _ACC, _UNMERGED, _NLL, _TRAINABLE, _MACS, *_TIMES]
        out.append("## PIA design ablations (the bandit's plan at the ablation k)")
        out.append(_md(parts["ablations"], columns))
    return "\n\n".join(out) + "\n"


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """Write ``study.json``, ``tables.md`` and every part's plot into ``out``; returns the paths."""
    result["meta"] |= run_info("cpu", "float32")
    paths = [atomic_write_text(out / "study.json", json.dumps(result, indent=1) + "\n")]
    paths.append(atomic_write_text(out / "tables.md", format_tables(result)))
    parts = result["parts"]
    if "validation" in parts:
        v = parts["validation"]
        marks = {f"bandit s={e['seed']}": e["accuracy"] for e in v["searches"]}
        marks |= {name: c["accuracy"] for name, c in v["controls"].items()}
        scores = [100 * g["accuracy"] for g in v["ground_truth"]]
        paths.append(
            plot_distribution(
                scores, {k: 100 * a for k, a in marks.items()}, out / "validation.png", "test accuracy %",
                f"all {len(scores)} plans skipping {v['k']} attentions",
            )
        )  # fmt: skip
        arms = Candidates("attention", len(v["searches"][0]["preferences"]))
        for seed, trajectory in v["trajectories"].items():
            paths.append(
                plot_preferences(
                    [t["preferences"] for t in trajectory],
                    [t["step"] for t in trajectory],
                    [arms.describe(a) for a in range(arms.num_arms)],
                    out / f"preferences_s{seed}.png",
                )
            )
        if v.get("contrast"):
            c = v["contrast"]
            randoms = [100 * p["accuracy"] for who, p in c["plans"].items() if who.startswith("random")]
            others = {
                who: 100 * p["accuracy"] for who, p in c["plans"].items() if not who.startswith("random")
            }
            title = f"{len(randoms)} random plans skipping {c['k']} attentions (histogram) and the others"
            paths.append(plot_distribution(randoms, others, out / "contrast.png", "test accuracy %", title))
    if "k_sweep" in parts:
        paths.append(plot_tradeoff(parts["k_sweep"], out / "k_sweep.png"))
    if "candidates" in parts:
        series: dict[str, tuple[list[float], list[float]]] = {}
        for r in parts["candidates"]:
            xs, ys = series.setdefault(r["row"], ([], []))
            xs.append(r["k"])
            ys.append(100 * r["accuracy"])
        paths.append(plot_series(series, out / "candidates.png", "modules skipped k", "test accuracy %"))
    if "ablations" in parts:
        paths.append(plot_tradeoff(parts["ablations"], out / "ablations.png"))
    return paths
