"""What the model registry shows a person: a version's and a registered model's markdown descriptions and tags.

MLflow renders descriptions as markdown, so every piece of recipe text goes through `md_escape`: "[V1] (cat)"
stays literal instead of becoming a link. Images and links are relative to the UI's own address, so they work
under `mlflow ui`, a server, or a server behind a path prefix.
"""

from urllib.parse import quote

from palp_trainer.config import ALIGNMENT_ONLY, key_tags

from .labels import md_escape, run_name, short_id, trial_label
from .recipe import format_value


def artifact_link(run_id: str, path: str) -> str:
    """The UI's URL of a run artifact, relative to the page (the server's /get-artifact endpoint)."""
    return f"get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"


def run_link(experiment_id: str, run_id: str) -> str:
    """The run's page, on the UI's model-training side (MLflow 3 opens the GenAI side by default)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def samples_artifact(best: dict) -> str:
    """The run artifact holding the final-step grid of the trial's best sampling method (RunLog.samples)."""
    method = best.get("best_method") or "cfg"
    suffix = "" if method == "cfg" else f"-{method}"
    return f"samples/step-{int(best['step']):06d}{suffix}.png"


def score_table(best: dict, score_names: tuple[str, ...], described: dict[str, str]) -> list[str]:
    """One row per sampling method the trial was scored with (CFG alone if none), the best one in bold."""
    methods = best.get("methods") or {"cfg": {k: best.get(k) for k in score_names}}
    header = ["method", *(md_escape(described.get(k, k)) for k in score_names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, scores in methods.items():
        cells = [md_escape(method), *(_score(scores.get(k)) for k in score_names)]
        if method == (best.get("best_method") or "cfg"):
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def version_description(*, pair: str, subjects, prompt, best: dict, trials: int, recipe_name: str, base_model: str,
                        experiment_id: str, run_id: str, score_names: tuple[str, ...],
                        described: dict[str, str]) -> str:
    """The version page's description: what the adapter is for, its scores per sampling method, its samples,
    how it was trained, and a link to its run. `subjects`/`prompt`: recipe.Subject and recipe.Prompt."""
    label = trial_label(best.get("alignment", "palp"), best["hparams"])
    who = ", ".join(f"{md_escape(s.name)} as {md_escape(s.token)} ({md_escape(s.class_word)})" for s in subjects)
    method = best.get("best_method") or "cfg"
    lines = [  # the first line reads well as plain text too: the model page's versions table shows it raw
        f"Trial {md_escape(short_id(best['trial_id']))} ({md_escape(label)}), the best of {trials} in sweep "
        f"{md_escape(recipe_name)}: composite {_score(best.get('composite'))} after {best['step']} steps.",
        "",
        f"**PALP adapter**: {who}, for the prompt “{md_escape(prompt.target)}”.",
        "",
        *score_table(best, score_names, described),
        "",
        f"Samples at step {best['step']} with **{md_escape(method)}**, its best sampling method "
        "(the pyfunc model's default `method`):",
        "",
        f"![samples with {md_escape(method)}]({artifact_link(run_id, samples_artifact(best))})",
        "",
        f"- target prompt: {md_escape(prompt.target)}",
        f"- clean prompt: {md_escape(prompt.clean)}",
        *(f"- {md_escape(s.token)} ({md_escape(s.class_word)}): subject {md_escape(s.name)}, "
          f"trained on “{md_escape(s.prompt)}”" for s in subjects),
        f"- hyperparameters: {md_escape(hparams_text(best))}",
        f"- base model: {md_escape(base_model)}",
        f"- source run: [{md_escape(run_name(pair, best['trial_id'], label))}]({run_link(experiment_id, run_id)})",
    ]
    return "\n".join(lines)


def model_description(*, subjects, prompt, base_model: str, name: str, champion: str, best: dict,
                      run_id: str) -> str:
    """The registered model's description: what every version of it is, its champion (version `champion`, the
    trial `best` of run `run_id`) with its samples, and how to use one."""
    who = ", ".join(f"{md_escape(s.name)} ({md_escape(s.token)}, a {md_escape(s.class_word)})" for s in subjects)
    label = trial_label(best.get("alignment", "palp"), best["hparams"])
    method = best.get("best_method") or "cfg"
    return "\n".join([
        f"**PALP adapters** of {who} for the prompt “{md_escape(prompt.target)}”, on base model "
        f"{md_escape(base_model)}.",
        "",
        f"**@champion: [version {champion}](#/models/{name}/versions/{champion})**, trial "
        f"{md_escape(short_id(best['trial_id']))} ({md_escape(label)}): composite {_score(best.get('composite'))}, "
        f"best sampling method {md_escape(method)}.",
        "",
        f"![samples of the champion with {md_escape(method)}]({artifact_link(run_id, samples_artifact(best))})",
        "",
        "Each version is the best trial of one sweep (its description has the scores and samples); the alias "
        "**@champion** is the best version scored under the same evaluation settings (tag eval\\_hash).",
        "",
        f"- sample it: `mlflow.pyfunc.load_model(\"models:/{name}@champion\").predict([\"...\"])` "
        "(PNG bytes; the version's best sampling method by default)",
        f"- get the diffusers files: `palp-sweep models pull {name}@champion DIR`",
    ])


def model_tags(*, subjects, prompt, base_model: str, recipe_name: str) -> dict[str, str]:
    return {"subjects": " ".join(s.name for s in subjects), "tokens": " ".join(s.token for s in subjects),
            "target_prompt": prompt.target, "base_model": base_model, "recipe": recipe_name}


def version_tags(best: dict, manifest: dict, score_names: tuple[str, ...], metric: str, eval_hash: str,
                 recipe_name: str) -> dict[str, str]:
    """The few tags a person compares versions by, scores first (the model page lists them in this order; the
    version page sorts them by name). Every other knob is a parameter of the source run."""
    tags = {f"metric.{k}": best[k] for k in (*score_names, metric) if k in best}
    if best.get("best_method"):
        tags["best_method"] = best["best_method"]
    unused = ALIGNMENT_ONLY if manifest["alignment"] == "none" else ()  # the baseline has no α, β to speak of
    tags.update({k: manifest[k] for k in key_tags() if k not in unused})
    tags.update({k: v for k, v in best["hparams"].items() if k not in tags})  # what else was searched
    tags.update(recipe=recipe_name, eval_hash=eval_hash)
    return {k: str(v) for k, v in tags.items()}


def hparams_text(best: dict) -> str:
    return ", ".join(f"{k} {format_value(v)}" for k, v in sorted(best["hparams"].items()))


def _score(value) -> str:
    return "–" if value is None or value != value else f"{value:.4f}"
