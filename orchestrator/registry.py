"""Model registry: the best trial of each pair becomes a pyfunc model version; `champion` moves only forward."""

import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

import palp_trainer
from palp_trainer import pyfunc_model
from palp_trainer.export import read_manifest
from palp_trainer.pyfunc_model import SIGNATURE

from .recipe import slugify
from .tracking import CHAMPION, Tracking

REQUIREMENTS = ["torch", "diffusers", "transformers", "peft", "safetensors", "mlflow", "pillow"]


def _better(new: float, old: float, mode: str) -> bool:
    return new > old if mode == "max" else new < old


def register_best(tracking: Tracking, recipe, pair: str, best: dict) -> dict:
    """Log the best trial's adapter as a pyfunc model in its own run, register a version, tag it,
    and move `champion` to it if it beats the current champion on the recipe's metric, scored under the same
    evaluation settings. A run already registered (a resumed sweep) is not registered again."""
    client = MlflowClient(tracking.uri)
    mlflow.set_tracking_uri(tracking.uri)
    run = client.get_run(tracking.find_run(best["trial_id"]))
    subjects, prompt = recipe.pair_parts(pair)
    name = recipe.mlflow.registered_model_template.format(
        subjects="-".join(slugify(s.name) for s in subjects), prompt_slug=prompt.slug)
    metric, mode = recipe.mlflow.champion_metric or recipe.scheduler.metric, recipe.scheduler.mode
    done = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if done:
        aliases = client.get_registered_model(name).aliases or {}
        return {"name": name, "version": done[0].version, "champion": aliases.get(CHAMPION) == done[0].version,
                "note": "registered before, not again"}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter", dst_path=tmp)
        manifest = read_manifest(adapter)
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=pyfunc_model.__file__, artifacts={"adapter": adapter},
                code_paths=[str(Path(palp_trainer.__file__).parent)], pip_requirements=REQUIREMENTS,
            )
        # predict's type hints give inputs/outputs; the params (seed, steps, ...) are added here
        mlflow.models.set_signature(info.model_uri, SIGNATURE)
    version = mlflow.register_model(info.model_uri, name)
    knobs = ("alpha", "beta", "rank", "alignment", "align_weight", "align_every")
    common = dict(tracking.common_params)
    tags = {**best["hparams"], **{k: manifest[k] for k in knobs},
            "steps": manifest["steps"], "base_model": manifest["base_model"], "recipe": recipe.name,
            "recipe_hash": common["recipe_hash"], "eval_hash": common["eval_hash"], "source_run": run.info.run_id,
            "pair": pair, **{f"metric.{k}": best[k] for k in (*recipe.eval.metric_names, "composite") if k in best},
            f"metric.{metric}": best[metric]}
    if best.get("best_method"):
        tags["best_method"] = best["best_method"]
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    client.update_model_version(name, version.version, description=(
        f"PALP adapter for {pair}.\ntarget prompt: {prompt.target}\nclean prompt: {prompt.clean}\n"
        + "".join(f"{s.token} ({s.class_word}): {s.prompt}\n" for s in subjects)
        + f"source run: {run.info.run_id}"))
    # the registry's own aliases, not an error caught as "no champion": MLflow failures surface
    current = (client.get_registered_model(name).aliases or {}).get(CHAMPION)
    promoted, note = True, None
    if current is not None and recipe.mlflow.promote_only_if_better:
        champion = client.get_model_version(name, current)
        old = float(champion.tags.get(f"metric.{metric}", "nan"))
        if champion.tags.get("eval_hash") != common["eval_hash"]:
            promoted = False
            note = (f"champion v{current} was scored under other evaluation settings, not compared; "
                    "move the alias in the MLflow UI to choose")
        elif old == old and not _better(best[metric], old, mode):
            promoted, note = False, f"champion v{current} has {metric} {old:.4g}, this one {best[metric]:.4g}"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {"name": name, "version": version.version, "champion": promoted, "note": note}
