"""One Tune trial: a Ray Train TorchTrainer running `train_loop` on the trial's (pair, hyperparameters)."""

import os
import time
from dataclasses import replace
from pathlib import Path

import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from mlflow import MlflowClient
from ray.tune.integration.ray_train import TuneReportCallback

from palp_trainer.config import TrainConfig, knobs_where
from palp_trainer.storage import is_remote, join

from .labels import trial_label
from .recipe import PLACEMENTS, Recipe
from .search_space import hparams_of, train_config
from .tracking import Tracking, end_run, fail_run, reason


def scheduler_key(recipe_name: str, trial_id: str) -> str:
    """Where the early-stopping scheduler publishes its decisions on a trial (worker.scheduler_decision)."""
    return f"{recipe_name}/{trial_id}"


def scaling_config(recipe: Recipe) -> ray.train.ScalingConfig:
    r = recipe.resources
    per_worker = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        per_worker["GPU"] = r.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=r.workers_per_trial, use_gpu=r.use_gpu,
                                   resources_per_worker=per_worker, placement_strategy=PLACEMENTS[r.placement])


def run_config(recipe: Recipe, storage_path: str, name: str, callbacks=()) -> ray.train.RunConfig:
    """A trial's (or a trial group's) Ray Train run: named so that a retry or `--resume` finds its checkpoints,
    under <storage>/<recipe>/train, with the recipe's restarts and checkpoints kept."""
    return ray.train.RunConfig(
        name=name,
        storage_path=os.path.join(storage_path, recipe.name, "train"),
        failure_config=ray.train.FailureConfig(max_failures=recipe.resources.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.resources.checkpoints_to_keep),
        callbacks=list(callbacks) or None,
    )


def train_worker(config: dict) -> None:
    """Each Ray Train worker's entry point. The trainer (diffusers, transformers, peft: ~5 s of imports on 2 cores)
    is imported here, in the workers, not in the Tune trial actor or the Train controller that only start them."""
    from palp_trainer.loops.solo import train_loop

    train_loop(config)


def trial_output_uri(storage_path: str, recipe: Recipe, pair: str, trial_id: str) -> str:
    """Where a trial's samples, metrics.jsonl and final adapter end up."""
    return join(storage_path, recipe.name, "trials", pair, trial_id)


def trial_output_dir(storage_path: str, recipe: Recipe, pair: str, trial_id: str) -> str:
    """Where rank 0 writes them: in the storage itself when it is a path, else a folder relative to the
    temp dir of whichever node rank 0 runs on, which rank 0 copies to `trial_output_uri` after every checkpoint
    and at the end (TrainConfig.output_uri)."""
    if not is_remote(storage_path):
        return trial_output_uri(storage_path, recipe, pair, trial_id)
    return str(Path("palp-sweep") / recipe.name / "trials" / pair / trial_id)


def start_trial(params: dict, recipe: Recipe, storage_path: str, tracking: Tracking) -> tuple[str, TrainConfig, str]:
    """In a Tune trial: (its id, its TrainConfig, its MLflow child run, created here)."""
    started = time.time()  # the trial's wall time, to the loop's time/loop_end_unix (benchmarks/sweep_bench.py)
    trial_id = ray.tune.get_context().get_trial_id()
    hparams = hparams_of(params)
    config = train_config(recipe, params["pair"], hparams,
                          trial_output_dir(storage_path, recipe, params["pair"], trial_id))
    if is_remote(storage_path):
        config = replace(config, output_uri=trial_output_uri(storage_path, recipe, params["pair"], trial_id))
    # every effective hyperparameter, searched or not (subjects, prompts and eval are in the parent run)
    knobs = {k: v for k, v in config.to_dict().items() if k in knobs_where("param")}
    run_id = tracking.child_run(params["pair"], trial_id, knobs, trial_label(config.alignment, hparams))
    MlflowClient(tracking.uri).log_metric(run_id, "time/trial_start_unix", started)
    config = replace(config, mlflow_uri=tracking.uri, mlflow_run_id=run_id,
                     scheduler_key=scheduler_key(recipe.name, trial_id) if recipe.scheduler.type == "asha" else None)
    return trial_id, config, run_id


def run_trial(params: dict, recipe: Recipe, storage_path: str, tracking: Tracking) -> None:
    """Tune function trainable. Metrics reach Tune through TuneReportCallback at every milestone."""
    trial_id, config, run_id = start_trial(params, recipe, storage_path, tracking)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config.to_dict(),
        scaling_config=scaling_config(recipe),
        run_config=run_config(recipe, storage_path, f"train-{trial_id}", [TuneReportCallback()]),  # the Tune trial's
    )
    # Tune stopping this trial (ASHA, Ctrl-C) ends this actor without running either branch; the driver then
    # records the run's state (sweep.record_outcomes)
    try:
        trainer.fit()
    except Exception as e:
        fail_run(MlflowClient(tracking.uri), run_id, reason(e))
        raise
    end_run(MlflowClient(tracking.uri), run_id, "FINISHED")
