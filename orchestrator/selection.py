"""Sweep-level selection: the text-alignment / subject-fidelity Pareto front and the report plots."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from .labels import ARMS, short_id, trial_label  # noqa: E402


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
ARM_STYLE = {"none": ("s", "tab:gray"), "palp": ("o", "tab:blue")}  # other arms (sds, nfsd): triangles
MIN_SPAN = 0.02  # scores live in [0, 1]: an axis never spans less, so near-equal scores read as near-equal
STAR = dict(marker="*", s=320, color="gold", edgecolors="black", linewidths=0.8, zorder=4)


def padded_limits(values: list[float], min_span: float = MIN_SPAN, pad: float = 0.08) -> tuple[float, float]:
    """Axis limits around `values`: at least `min_span` wide (centred on them) and padded by `pad` of the span
    each side, so points and their labels sit inside the frame and equal scores do not fill the axis."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    lo, hi = min(lo, mid - span / 2), max(hi, mid + span / 2)
    return lo - pad * span, hi + pad * span


def point_label(row: dict) -> str:
    """"00001 palp α7.5 r4": the short trial id, the arm and the searched values."""
    return f"{short_id(row['trial_id'])} {row.get('label') or trial_label(row['alignment'], row.get('hparams', {}))}"


def _plain(ax) -> None:
    """Tick labels as the numbers themselves: no "1e-6+3.084e-1" offset, no scientific notation."""
    ax.ticklabel_format(useOffset=False, style="plain")


def plot_pareto(rows: list[dict], path: str | Path, title: str, text: str = "clip_t", subject: str = "clip_i",
                registered: str | None = None) -> Path:
    """Every scored trial at (subject, text), coloured by arm and labelled with its arm and searched values (and
    its step, when it stopped before the others); the front ringed and joined; the `registered` trial (its id)
    starred."""
    scored = [r for r in rows if not math.isnan(r[subject]) and not math.isnan(r[text])]
    front = sorted((scored[i] for i in pareto_front([(r[subject], r[text]) for r in scored])),
                   key=lambda r: r[subject])
    fig, ax = plt.subplots(figsize=(7, 5.5), layout="constrained")
    for arm in dict.fromkeys(r["alignment"] for r in scored):
        marker, color = ARM_STYLE.get(arm, ("^", "tab:purple"))
        points = [r for r in scored if r["alignment"] == arm]
        ax.scatter([r[subject] for r in points], [r[text] for r in points], marker=marker, color=color, s=45,
                   label=ARMS.get(arm, arm) + (f" (alignment: {arm})" if arm in ARMS else ""), zorder=2)
    if front:
        ax.plot([r[subject] for r in front], [r[text] for r in front], color="tab:red", lw=1, zorder=1)
        ax.scatter([r[subject] for r in front], [r[text] for r in front], s=160, facecolors="none",
                   edgecolors="tab:red", label="Pareto front", zorder=3)
    for r in scored:
        if str(r["trial_id"]) == str(registered):
            ax.scatter([r[subject]], [r[text]], label=f"registered: {point_label(r)}", **STAR)
    ax.set_xlim(*padded_limits([r[subject] for r in scored]))
    ax.set_ylim(*padded_limits([r[text] for r in scored]))
    x_mid = sum(ax.get_xlim()) / 2
    last = max((r["step"] for r in scored if r.get("step") is not None), default=None)
    for r in scored:  # the label on the side facing the middle: it stays inside the frame
        right = r[subject] > x_mid
        at = f" (step {r['step']})" if r.get("step") is not None and r["step"] != last else ""  # stopped early
        ax.annotate(point_label(r) + at, (r[subject], r[text]), fontsize=7, xytext=(-6 if right else 6, 4),
                    textcoords="offset points", ha="right" if right else "left", annotation_clip=True)
    _plain(ax)
    ax.set_xlabel(AXIS_LABELS.get(subject, subject))
    ax.set_ylabel(AXIS_LABELS.get(text, text))
    ax.set_title(f"{title}\n{len(scored)}/{len(rows)} trials scored; up and right is better", fontsize=10)
    if scored:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(histories: dict[str, list[dict]], path: str | Path, metric_names: list[str], title: str = "",
                registered: str | None = None) -> Path:
    """One panel per metric, one line per trial (keyed by its legend label): the metric at each evaluated step;
    the `registered` trial's line thicker, its last point starred; one legend below the panels."""
    if not metric_names:
        raise ValueError("plot_curves: name at least one metric to plot")
    fig, axes = plt.subplots(1, len(metric_names), figsize=(4.5 * len(metric_names), 4.4), squeeze=False,
                             layout="constrained")
    handles = {}
    for ax, name in zip(axes[0], metric_names):
        ax.set_prop_cycle(None)  # the same colour for a trial in every panel
        for label, history in histories.items():
            points = [(h["step"], h[name]) for h in history if name in h]  # missing: not evaluated / NaN
            best = label == registered
            line, = ax.plot(*zip(*points), marker=".", lw=2.5 if best else 1.2,
                            label=f"registered: {label}" if best else label) if points else ax.plot([], [])
            if points:
                handles.setdefault(line.get_label(), line)
                if best:
                    ax.scatter(*points[-1], **STAR)
        ax.set_ylim(*padded_limits([h[name] for hs in histories.values() for h in hs if name in h]))
        steps = sorted({h["step"] for hs in histories.values() for h in hs})
        if 0 < len(steps) <= 8:
            ax.set_xticks(steps)  # the milestones: the only steps with scores
        _plain(ax)
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize=8,
                   ncol=min(len(handles), 4 if len(metric_names) > 1 else 2))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
