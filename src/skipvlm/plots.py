"""PNG plots of what skipvlm measures (matplotlib, headless Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from skipvlm.io import atomic_path

__all__ = [
    "plot_distribution",
    "plot_kl_curve",
    "plot_preferences",
    "plot_series",
    "plot_speedups",
    "plot_tradeoff",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def plot_preferences(
    trajectory: Sequence[Sequence[float]],
    steps: Sequence[int],
    arm_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "bandit preferences (high = safe to skip)",
) -> Path:
    """Heat map of the bandit's preferences, arms x search updates, written atomically to ``path``.

    Args:
        trajectory: one row of preferences (one per arm) per update.
        steps: the training step of each row.
        arm_names: a label per arm.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * len(arm_names) + 1)))
    data = [list(row) for row in trajectory] or [[0.0] * len(arm_names)]
    image = ax.imshow(list(zip(*data, strict=True)), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(arm_names)), labels=list(arm_names), fontsize=7)
    if steps:
        ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 6))})
        ax.set_xticks(ticks, labels=[str(steps[t]) for t in ticks])
    ax.set_xlabel("training step")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="preference H")
    return _save(plt, fig, path)


def plot_tradeoff(
    points: Sequence[dict], path: str | os.PathLike, x: str = "decode_ms_per_token", y: str = "accuracy"
) -> Path:
    """Scatter of methods, ``y`` against ``x`` (e.g. accuracy vs decode latency), labelled by ``name``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        if p.get(x) is None or p.get(y) is None:
            continue
        ax.scatter(p[x], p[y])
        ax.annotate(p["name"], (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_speedups(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Measured prefill / decode speedups of skip plans and their roofline bounds, vs skipped modules."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = sorted(
        (r for r in rows if r["name"].startswith("eas") or r["name"] == "stock"),
        key=lambda r: r["skipped_attentions"],
    )
    k = [r["skipped_attentions"] for r in points]
    for key, style in (("prefill", "o-"), ("decode", "s-")):
        ax.plot(k, [r[f"{key}_speedup"] for r in points], style, label=f"{key} measured")
        ax.plot(
            k, [r[f"{key}_bound"] for r in points], style.replace("-", "--"), alpha=0.5, label=f"{key} bound"
        )
    ax.set_xlabel("skipped attentions")
    ax.set_ylabel("speedup vs stock")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def plot_kl_curve(
    kl: dict[int, float],
    eta: float,
    chosen: int | None,
    path: str | os.PathLike,
    title: str = "VTW calibration",
) -> Path:
    """KL(p_K || p_full) against the exit layer K, with the threshold eta and the chosen layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = sorted(kl)
    # A log axis cannot show 0; clamp to a floor far below any threshold worth choosing.
    floor = min([v for v in kl.values() if v > 0] + [eta]) / 100
    ax.semilogy(layers, [max(kl[k], floor) for k in layers], "o-", label="mean KL(p_K || p_full)")
    ax.axhline(eta, color="gray", linestyle="--", label=f"eta = {eta:g}")
    if chosen is not None and chosen in kl:
        ax.axvline(chosen, color="tab:red", alpha=0.5, label=f"chosen K = {chosen}")
    ax.set_xlabel("exit layer K (visual tokens withdrawn before it)")
    ax.set_ylabel("KL at the last prompt token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def plot_distribution(
    scores: Sequence[float],
    marks: dict[str, float],
    path: str | os.PathLike,
    xlabel: str,
    title: str = "",
) -> Path:
    """Every score as a dot on a strip (a histogram of the distribution), with labelled vertical lines
    at ``marks`` (e.g. where the searched plan and the controls fall among all plans)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.hist(scores, bins=min(20, max(5, len(scores) // 2)), color="0.8", edgecolor="0.5")
    for i, (name, x) in enumerate(marks.items()):
        ax.axvline(x, color=f"C{i}", linestyle="--", linewidth=1.2, label=f"{name}: {x:.1f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("plans")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    return _save(plt, fig, path)


def plot_series(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
) -> Path:
    """One line with markers per series (name -> (xs, ys)), e.g. accuracy against modules skipped."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
