"""Sweep-level selection: the text-alignment / subject-fidelity Pareto front and the report plots."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, maximizing both coordinates.

    q dominates p when q >= p in both coordinates and q > p in one, so identical points are all on the
    front. Points with a NaN never are, and never dominate.
    """
    valid = [(i, p) for i, p in enumerate(points) if not any(math.isnan(v) for v in p)]
    return [i for i, (a, b) in valid
            if not any(c >= a and d >= b and (c > a or d > b) for _, (c, d) in valid)]


AXIS_LABELS = {"clip_t": "CLIP-T (text alignment, raw cosine)", "clip_i": "CLIP-I (image alignment, raw cosine)",
               "judge_text": "judge: text alignment (P of each prompt attribute)",
               "judge_subject": "judge: subject fidelity (P of its defining features)"}


def plot_pareto(rows: list[dict], path: str | Path, title: str, text: str = "clip_t", subject: str = "clip_i") -> Path:
    """Every scored trial at (subject, text); the front ringed and joined; the "none" arm as squares."""
    scored = [r for r in rows if not math.isnan(r[subject]) and not math.isnan(r[text])]
    front = sorted((scored[i] for i in pareto_front([(r[subject], r[text]) for r in scored])),
                   key=lambda r: r[subject])
    fig, ax = plt.subplots(figsize=(6, 5))
    for baseline, marker, label in ((False, "o", "trials"), (True, "s", "baseline (alignment: none)")):
        arm = [r for r in scored if (r["alignment"] == "none") == baseline]
        if arm:
            ax.scatter([r[subject] for r in arm], [r[text] for r in arm], marker=marker,
                       color="tab:gray" if baseline else "tab:blue", label=label, zorder=2)
    if front:
        ax.plot([r[subject] for r in front], [r[text] for r in front], color="tab:red", lw=1, zorder=1)
        ax.scatter([r[subject] for r in front], [r[text] for r in front], s=140, facecolors="none",
                   edgecolors="tab:red", label="Pareto front", zorder=3)
    for r in scored:
        ax.annotate(str(r["trial_id"]), (r[subject], r[text]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(AXIS_LABELS.get(subject, subject))
    ax.set_ylabel(AXIS_LABELS.get(text, text))
    ax.set_title(f"{title}  ({len(scored)}/{len(rows)} trials scored)")
    if scored:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(histories: dict[str, list[dict]], path: str | Path, metric_names: list[str]) -> Path:
    """One panel per metric, one line per trial: the metric at each evaluated step."""
    if not metric_names:
        raise ValueError("plot_curves: name at least one metric to plot")
    fig, axes = plt.subplots(1, len(metric_names), figsize=(4.5 * len(metric_names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], metric_names):
        for trial_id, history in histories.items():
            points = [(h["step"], h[name]) for h in history if name in h]  # missing: not evaluated / NaN
            if points:
                ax.plot(*zip(*points), marker=".", label=str(trial_id))
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if any(ax.lines for ax in axes[0]):
        axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
