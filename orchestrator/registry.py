"""Model registry: the best trial of each pair becomes a pyfunc model version; `champion` moves only forward."""

import json
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.models import Model

import palp_trainer
from palp_trainer.evaluation.scorers import metric_names
from palp_trainer.export import pyfunc_model
from palp_trainer.export.adapter import read_manifest

from . import model_card
from .recipe import slugify
from .tracking import CHAMPION, Tracking

REQUIREMENTS = ["torch", "diffusers", "transformers", "peft", "safetensors", "mlflow", "pillow"]
MODEL_NAME = "palp-adapter"  # the logged model's name (MLflow's default is "model")


def _finish_model(client: MlflowClient, info, signature, example: list[str], folder: Path) -> None:
    """Write the logged model's signature (its params' defaults are the version's) and input example into its
    MLmodel. Given to log_model instead, an input example makes MLflow load the base model and sample it, twice,
    to check the example: minutes on a CPU driver, and a hub download on a head node that never needed one."""
    folder.mkdir()
    meta = Model.load(info.model_uri)  # its MLmodel file
    meta.signature = signature
    (folder / "input_example.json").write_text(json.dumps(example))
    (folder / "serving_input_example.json").write_text(json.dumps({"inputs": example}, indent=2))
    meta.saved_input_example_info = {"artifact_path": "input_example.json", "type": "json_object",
                                     "serving_input_path": "serving_input_example.json"}
    meta.save(str(folder / "MLmodel"))
    client.log_model_artifacts(info.model_id, str(folder))


def _better(new: float, old: float, mode: str) -> bool:
    return new > old if mode == "max" else new < old


def register_best(tracking: Tracking, recipe, pair: str, best: dict, trials: int = 1) -> dict:
    """Log the best trial's adapter as a pyfunc model in its own run, register a version, describe and tag it
    and its registered model, and move `champion` to it if it beats the current champion on the recipe's metric,
    scored under the same evaluation settings. A run already registered (a resumed sweep) is not registered
    again. `trials`: how many the pair's sweep ran (the description says of how many this is the best)."""
    client = MlflowClient(tracking.uri)
    mlflow.set_tracking_uri(tracking.uri)
    run = client.get_run(tracking.find_run(best["trial_id"]))
    subjects, prompt = recipe.pair_parts(pair)
    name = recipe.mlflow.registered_model_template.format(
        subjects="-".join(slugify(s.name) for s in subjects), prompt_slug=prompt.slug)
    metric, mode = recipe.mlflow.champion_metric or recipe.scheduler.metric, recipe.scheduler.mode
    score_keys = (*metric_names(recipe.eval), "composite")
    done = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if done:
        aliases = client.get_registered_model(name).aliases or {}
        return {"name": name, "version": done[0].version, "champion": aliases.get(CHAMPION) == done[0].version,
                "note": "registered before, not again"}
    defaults = pyfunc_model.sampling_defaults(best.get("best_method"))
    with tempfile.TemporaryDirectory() as tmp:
        adapter = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter", dst_path=tmp)
        manifest = read_manifest(adapter)
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=pyfunc_model.__file__, artifacts={"adapter": adapter},
                code_paths=[str(Path(palp_trainer.__file__).parent)], pip_requirements=REQUIREMENTS,
                # predict samples with the version's best method unless told otherwise
                model_config=pyfunc_model.model_config(defaults),
            )
        _finish_model(client, info, pyfunc_model.signature(defaults), [prompt.target], Path(tmp) / "meta")
    version = mlflow.register_model(info.model_uri, name)
    common = dict(tracking.common_params)
    text, subject = metric_names(recipe.eval)
    for key, value in model_card.version_tags(best, manifest, score_keys, metric, common["eval_hash"],
                                              recipe.name).items():
        client.set_model_version_tag(name, version.version, key, value)
    client.update_model_version(name, version.version, description=model_card.version_description(
        pair=pair, subjects=subjects, prompt=prompt, best=best, trials=trials, recipe_name=recipe.name,
        base_model=manifest["base_model"], experiment_id=tracking.experiment_id, run_id=run.info.run_id,
        score_names=score_keys, described={text: f"{text} (text alignment)", subject: f"{subject} (subject fidelity)"}))
    for key, value in model_card.model_tags(subjects=subjects, prompt=prompt, base_model=manifest["base_model"],
                                            recipe_name=recipe.name).items():
        client.set_registered_model_tag(name, key, value)
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
        client.update_registered_model(name, description=model_card.model_description(
            subjects=subjects, prompt=prompt, base_model=manifest["base_model"], name=name,
            champion=version.version, best=best, run_id=run.info.run_id))
    return {"name": name, "version": version.version, "champion": promoted, "note": note}
