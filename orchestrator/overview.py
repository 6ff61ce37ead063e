"""The sweep's parent run as a person reads it: a description of what was searched and who won, each pair's
winner (scores, hyperparameters, registered version) as metrics and tags, the report plots as images, and a
trials x methods x scores table."""

import re
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from PIL import Image

from palp_trainer.evaluation.scorers import metric_names

from .labels import md_escape, run_name, short_id
from .model_card import run_link
from .recipe import Recipe, format_value
from .tracking import Tracking

TABLE = "trials.json"  # the parent run's table artifact (MlflowClient.log_table)


def key_part(text: str) -> str:
    """`text` as part of an MLflow metric/tag key (letters, digits, _ - . / space and colon): "cat+mug" -> "cat_mug"."""
    return re.sub(r"[^A-Za-z0-9_\-./ :]", "_", text)


def searched_text(recipe: Recipe) -> str:
    """"alignment [palp, none] × rank [4, 8]": every searched knob; fixed ones as their value."""
    dims = " × ".join(f"{k} {d.describe()}" for k, d in recipe.search.dims.items()) or "the recipe's train settings"
    return dims + (f", {recipe.search.num_samples} samples" if recipe.search.num_samples > 1 else "")


def sweep_note(recipe: Recipe, summary: dict, registered: dict, failed: list[str],
               runs: dict[str, str] | None = None, experiment_id: str = "") -> str:
    """The parent run's description (markdown): what was searched, how, and each pair's winner (linked to its
    run, `runs`: trial id -> run id, and to its registered version)."""
    rows = [r for s in summary.values() for r in s["trials"]]
    steps = sorted(recipe.search.steps)
    stopped = sum(1 for r in rows if r["error"] is None and r["step"] is not None and r["step"] < steps[-1])
    s = recipe.scheduler
    if s.type == "asha":
        how = (f"ASHA (reduction factor {s.reduction_factor}, from milestone {s.grace_period}) stopped "
               f"{stopped} of {len(rows)} trial(s) early")
    else:
        how = "every trial ran to the end (FIFO)"
    text, subject = metric_names(recipe.eval)
    scores = (text, subject, "composite")
    lines = [
        f"**{md_escape(recipe.name)}**: {len(rows)} trial(s) over {len(summary)} (subject, prompt) pair(s); "
        "each pair's winner:",
        "",
        "| pair | winner | " + " | ".join(md_escape(k) for k in scores) + " | best method | registered |",
        "|" + "---|" * (len(scores) + 4),
    ]
    for pair, entry in summary.items():
        best, model = entry["best"], registered.get(pair)
        if best is None:
            lines.append(f"| {md_escape(pair)} | none finished |" + " |" * (len(scores) + 2))
            continue
        version = f"[{md_escape(model['name'])} v{model['version']}](#/models/{model['name']}/versions/" \
                  f"{model['version']})" if model else "–"
        winner = f"{md_escape(short_id(best['trial_id']))} · {md_escape(best['label'])}"
        if (runs or {}).get(best["trial_id"]):
            winner = f"[{winner}]({run_link(experiment_id, runs[best['trial_id']])})"
        lines.append(f"| {md_escape(pair)} | {winner} | " + " | ".join(_score(best.get(k)) for k in scores)
                     + f" | {md_escape(best.get('best_method') or 'cfg')} | {version} |")
    lines += [
        "",
        f"PALP personalization of {md_escape(recipe.base_model)}, searched over {md_escape(searched_text(recipe))}; "
        f"trained to step {steps[-1]}, scored at step(s) {', '.join(map(str, steps))} ({md_escape(text)}: text "
        f"alignment, {md_escape(subject)}: subject fidelity); {how}.",
        "",
        "Report plots: the images of this run (report/<pair>/pareto, curves); every trial and sampling "
        f"method's scores: the table {TABLE}; summary.json and the plots as files: the report folder."]
    if failed:
        lines += ["", "**Pairs with no finished trial:** " + md_escape(" | ".join(failed))]
    return "\n".join(lines)


def winner_fields(recipe: Recipe, summary: dict, registered: dict) -> tuple[dict[str, float], dict[str, str]]:
    """Each pair's winner as parent-run metrics `best.<pair>.<score>` and tags `best.<pair>.<what>`."""
    scores = dict.fromkeys((*metric_names(recipe.eval), "composite", recipe.scheduler.metric))
    metrics, tags = {}, {}
    for pair, entry in summary.items():
        best, prefix = entry["best"], f"best.{key_part(pair)}"
        if best is None:
            continue
        metrics.update({f"{prefix}.{k}": best[k] for k in scores if best.get(k) is not None})
        metrics[f"{prefix}.step"] = best["step"]
        tags.update({f"{prefix}.trial": best["trial_id"], f"{prefix}.label": best["label"],
                     f"{prefix}.best_method": best.get("best_method") or "cfg",
                     **{f"{prefix}.{key_part(k)}": format_value(v) for k, v in best["hparams"].items()}})
        if pair in registered:
            tags[f"{prefix}.model"] = f"models:/{registered[pair]['name']}/{registered[pair]['version']}"
    return metrics, tags


def trials_table(recipe: Recipe, summary: dict) -> dict[str, list]:
    """One row per trial and sampling method it was scored with (a trial stopped early: CFG at its step). `run`,
    the run's name, names the row: MlflowClient.load_table (pandas) reads a trial id such as "1e041_00000" as a
    number."""
    text, subject = metric_names(recipe.eval)
    columns = ("run", "pair", "trial", "step", "status", "method", text, subject, "composite", "registered")
    table = {c: [] for c in columns}
    last = max(recipe.search.steps)
    for pair, entry in summary.items():
        for r in entry["trials"]:
            status = "failed" if r["error"] else "stopped early" if (r["step"] or 0) < last else "finished"
            for method, scores in (r.get("methods") or {"cfg": r}).items():
                values = (run_name(pair, r["trial_id"], r["label"]), pair, r["trial_id"], r["step"], status, method,
                          _num(scores.get(text)),
                          _num(scores.get(subject)), _num(scores.get("composite")), entry["best"] is r)
                for column, value in zip(columns, values):
                    table[column].append(value)
    return table


def log_report(client: MlflowClient, run_id: str, recipe: Recipe, summary: dict, report_dir: Path) -> None:
    """The report's plots as MLflow images (shown on the run page, not only as files) and the trials table;
    once per parent run (a resumed sweep's parent has them already; the table would be appended to)."""
    if any(a.path == TABLE for a in client.list_artifacts(run_id)):
        return
    for pair in summary:
        for name in ("pareto", "curves"):
            path = report_dir / pair / f"{name}.png"
            if path.is_file():
                with Image.open(path) as image:
                    client.log_image(run_id, image.convert("RGB"), key=f"report/{key_part(pair)}/{name}", step=0)
    client.log_table(run_id, data=trials_table(recipe, summary), artifact_file=TABLE)


def describe(tracking: Tracking, recipe: Recipe, summary: dict, registered: dict, failed: list[str]) -> None:
    """The parent run's description, winner metrics and tags."""
    client = MlflowClient(tracking.uri)
    runs = {s["best"]["trial_id"]: tracking.find_run(s["best"]["trial_id"]) for s in summary.values() if s["best"]}
    metrics, tags = winner_fields(recipe, summary, registered)
    rows = [r for s in summary.values() for r in s["trials"]]
    metrics.update(trials=len(rows), trials_failed=sum(1 for r in rows if r["error"]),
                   trials_stopped_early=sum(1 for r in rows if r["error"] is None and r["step"] is not None
                                            and r["step"] < max(recipe.search.steps)))
    tags["mlflow.note.content"] = sweep_note(recipe, summary, registered, failed, runs, tracking.experiment_id)
    now = int(time.time() * 1000)
    client.log_batch(tracking.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _score(value) -> str:
    return "–" if value is None or value != value else f"{value:.4f}"


def _num(value):
    return None if value is None or value != value else float(value)
