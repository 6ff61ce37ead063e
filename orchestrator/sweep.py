"""A recipe as one Ray Tune experiment: (subject set, prompt) pairs x hyperparameters, ASHA on milestones."""

import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import ray
from mlflow import MlflowClient
from ray import tune
from ray.experimental import internal_kv
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from palp_trainer import storage as store
from palp_trainer.config import SMALL_BASES
from palp_trainer.evaluation.scorers import metric_names
from palp_trainer.loops.worker import DECISIONS, decision_key
from palp_trainer.storage import is_remote, join

from . import overview
from .base_model import check_base
from .connect import TRIAL_ACTOR, autoscaler_node_types, check_feasible, connect, resolve_address
from .labels import trial_label
from .recipe import Recipe, RecipeError
from .registry import register_best
from .search_space import hparams_of, param_space
from .selection import pareto_front, plot_curves, plot_pareto, point_label
from .tracking import (STOPPED_TAG, Tracking, browse_lines, close_open_children, default_store, end_run, fail_run,
                       in_job_working_dir, job_storage, mask, preflight, reason, resolve_tracking_uri, start_sweep)
from .groups import run_member, start_coordinator
from .trial import run_trial, scheduler_key, trial_output_uri

INTERRUPTED = 130  # the shell's code for a Ctrl-C'd command
STAGED = ".palp-staged"  # written last into a base model copied to storage
# passed from the driver's environment to every process of the cluster (never printed): storage and MLflow
# credentials, endpoint overrides (an S3 API that is not AWS), the Hugging Face token for gated bases
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE")


def score_keys(recipe: Recipe) -> tuple[str, str, str]:
    """(text alignment, subject fidelity, composite): the recipe's scorer names the first two."""
    return (*metric_names(recipe.eval), "composite")


def check_storage(storage: str) -> None:
    """Fail in one line, before Ray starts, on a storage path the sweep could not write."""
    try:
        fs, path = store.filesystem(storage)
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.palp-sweep-write-test"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as e:
        raise RecipeError(f"storage_path: cannot write to {mask(storage)}: {' '.join(str(e).split())}") from None


def resolve_storage(storage_path: str) -> str:
    """Absolute storage root. In a job's temporary working dir a relative path goes under the home
    directory instead, so outputs outlive the job (the sweep prints where)."""
    if is_remote(storage_path) or os.path.isabs(os.path.expanduser(storage_path)):
        return os.path.expanduser(storage_path)
    if in_job_working_dir():
        return str(job_storage(storage_path))
    return str(Path(storage_path).resolve())


def check_nodes(recipe: Recipe, storage: str, uri: str) -> None:
    """On a cluster of several nodes (now, or once its autoscaler adds some) every node must reach the
    storage and the MLflow store: a path on the driver's disk is refused unless the recipe says it is shared."""
    nodes, autoscaling = sum(1 for n in ray.nodes() if n["Alive"]), bool(autoscaler_node_types())
    if (nodes > 1 or autoscaling) and not is_remote(storage) and not recipe.storage_shared:
        many = f"the Ray cluster has {nodes} nodes" if nodes > 1 else "the Ray cluster's autoscaler adds nodes"
        raise RecipeError(f"storage_path: {storage} is a folder on this machine, but {many} that cannot see it; "
                          "use s3://... (or gs://...), or set storage_shared: true if it is a shared filesystem "
                          "mounted at the same path on every node")
    preflight(uri, nodes, autoscaling)


def stage_subjects(recipe: Recipe, storage: str) -> Recipe:
    """The recipe with its subject images copied into the storage (content-addressed: a changed photo gets a new
    name), so that workers on any node read them there; nodes cache them (palp_trainer.storage.cached)."""
    subjects = []
    for s in recipe.subjects:
        images = []
        for f in s.images:
            digest = hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16]
            target = join(storage, recipe.name, "subjects", s.name, digest, Path(f).name)
            if not store.exists(target):
                store.upload(f, target)
            images.append(target)
        subjects.append(replace(s, images=tuple(images)))
    return replace(recipe, subjects=tuple(subjects))


def stage_base(recipe: Recipe, storage: str) -> Recipe:
    """A base model given as a directory on the driver's disk, copied into the storage once (named by its files'
    sizes and times, so an edited model is copied again), where every node fetches it once. Hub ids go to
    each node's Hugging Face cache; the built-in bases are in the package."""
    path = Path(recipe.base_model).expanduser()
    if recipe.base_model in SMALL_BASES or not path.is_dir():
        return recipe
    files = sorted(f for f in path.rglob("*") if f.is_file())
    listing = "\n".join(f"{f.relative_to(path)} {f.stat().st_size} {f.stat().st_mtime_ns}" for f in files)
    target = join(storage, "models", f"{path.name}-{hashlib.sha256(listing.encode()).hexdigest()[:16]}")
    done = join(target, STAGED)
    if not store.exists(done):
        store.upload(path, target)
        store.touch(done)  # last: a copy cut short is copied again
    return replace(recipe, base_model=target)


def trial_resources(recipe: Recipe) -> dict:
    r = recipe.resources
    return {"CPU": r.workers_per_trial * r.cpus_per_worker,
            "GPU": r.workers_per_trial * r.gpus_per_worker if r.use_gpu else 0}


def max_concurrent(recipe: Recipe) -> int | None:
    """Tune only counts its own (0.01-CPU) trial actor, not the Train workers: size concurrency from
    the cluster so concurrent trials never starve each other's worker groups."""
    if recipe.resources.max_concurrent_trials:
        return recipe.resources.max_concurrent_trials
    if os.environ.get("RAY_ADDRESS"):
        return None  # an existing (possibly autoscaling) cluster: queued worker groups make it grow
    have = ray.cluster_resources()
    need = trial_resources(recipe)
    fits = max(1, min(math.floor(have.get(k, 0) / v) for k, v in need.items() if v))
    group = recipe.resources.trials_per_group
    # a group's members wait in their (resource-free) trials until it forms: room for a full group per pair
    return fits if group == 1 else fits * group * len(recipe.pair_ids())


class PublishingASHA(ASHAScheduler):
    """ASHA that publishes each decision where the trial's workers wait for it after a milestone, so a trial
    it stops stops training at that milestone (train_loop's scheduler_decision)."""

    def __init__(self, recipe_name: str, **kwargs):
        super().__init__(**kwargs)
        self.recipe_name = recipe_name

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if "step" in result:
            internal_kv._internal_kv_put(decision_key(scheduler_key(self.recipe_name, trial.trial_id), result["step"]),
                                         decision.encode(), namespace=DECISIONS)
        return decision


def scheduler(recipe: Recipe):
    s, steps = recipe.scheduler, sorted(recipe.search.steps)
    if s.type == "fifo":
        return FIFOScheduler()
    # rungs at milestones: time is the training step, grace is the grace_period-th milestone
    # stop_last_trials=False: a trial at its last milestone ends by itself, after its final evaluation and export
    return PublishingASHA(recipe.name, time_attr="step", max_t=steps[-1],
                          grace_period=steps[min(s.grace_period, len(steps)) - 1],
                          reduction_factor=s.reduction_factor, stop_last_trials=False)


def build_tuner(recipe: Recipe, storage: str, resume: bool, tracking: Tracking) -> tune.Tuner:
    function = run_member if recipe.resources.trials_per_group > 1 else run_trial
    trainable = tune.with_resources(
        tune.with_parameters(function, recipe=recipe, storage_path=storage, tracking=tracking),
        {k.lower(): v for k, v in TRIAL_ACTOR.items()})  # on the head; it only waits on its TorchTrainer
    experiment = os.path.join(storage, recipe.name)
    # a checkpoint reported before a trial's first evaluation carries no score yet (train_loop); the scheduler
    # ignores such reports, and Tune must not reject them
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if resume:
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(recipe),
        tune_config=tune.TuneConfig(
            metric=recipe.scheduler.metric, mode=recipe.scheduler.mode, scheduler=scheduler(recipe),
            num_samples=recipe.search.num_samples, max_concurrent_trials=max_concurrent(recipe),
        ),
        run_config=tune.RunConfig(name=recipe.name, storage_path=storage, verbose=1),
    )


def summarize(recipe: Recipe, results, report_dir: Path, report_uri: str | None = None,
              storage: str | None = None) -> tuple[dict, list[str]]:
    """Per pair: every trial's final scores, the Pareto front, the best trial; plots written to `report_dir`
    and named in summary.json where they end up (`report_uri`, the storage's report folder)."""
    report_uri = report_uri or str(report_dir)
    metric, sign = recipe.scheduler.metric, (1 if recipe.scheduler.mode == "max" else -1)
    keys = score_keys(recipe)
    text, subject = metric_names(recipe.eval)
    last_step = max(recipe.search.steps)
    methods = recipe.eval.methods  # labels already: EvalConfig parses the recipe's list
    pairs: dict[str, list] = {p: [] for p in recipe.pair_ids()}
    for result in results:
        m = result.metrics or {}
        hparams = hparams_of(result.config)
        alignment = hparams.get("alignment", recipe.train.alignment)
        row = {"trial_id": m.get("trial_id", Path(result.path).name), "pair": result.config["pair"],
               "hparams": hparams, "alignment": alignment, "label": trial_label(alignment, hparams),
               "step": m.get("step"), "error": reason(result.error) if result.error else None,
               "adapter": None, "best_method": m.get("best_method"),
               **{k: m.get(k, float("nan")) for k in (*keys, metric, recipe.mlflow.champion_metric or metric)},
               # every sampling method's scores on the finished trial (evaluate_methods)
               "methods": {label: {k: m[f"method/{label}/{k}"] for k in keys if f"method/{label}/{k}" in m}
                           for label in methods if f"method/{label}/composite" in m}}
        history = milestone_history(result.metrics_dataframe, recipe.search.steps, keys)
        if storage and row["step"] == last_step:  # where the trial's final adapter was written
            row["adapter"] = join(trial_output_uri(storage, recipe, row["pair"], row["trial_id"]), "adapter")
        pairs[row["pair"]].append((row, history))
    summary, failed = {}, []
    for pair, trials in pairs.items():
        rows = [r for r, _ in trials]
        # registrable: trials that ran to the last step (an early-stopped trial has no final adapter)
        ok = [r for r in rows if r["error"] is None and r["step"] == last_step and not _nan(r[metric])]
        for i in pareto_front([(r[text], r[subject]) for r in rows]):
            rows[i]["pareto"] = True
        best = max(ok, key=lambda r: sign * r[metric]) if ok else None
        out = report_dir / pair
        out.mkdir(parents=True, exist_ok=True)
        plots = {}
        if rows:
            title = pair.replace("__", " / ")
            plot_pareto(rows, out / "pareto.png", title, text, subject, registered=best and best["trial_id"])
            stopped = {r["trial_id"]: f" (stopped at {r['step']})" for r in rows
                       if r["error"] is None and r["step"] is not None and r["step"] < last_step}
            plot_curves({point_label(r) + stopped.get(r["trial_id"], ""): h for r, h in trials}, out / "curves.png",
                        list(keys), title, registered=best and point_label(best))
            plots = {name: join(report_uri, pair, f"{name}.png") for name in ("pareto", "curves")}
        summary[pair] = {"best": best, "trials": rows, "plots": plots}
        if best is None:
            reasons = "; ".join(sorted({r["error"] or "no score" for r in rows})) or "no trial ran"
            failed.append(f"{pair}: {reasons}")
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary, failed


def milestone_history(df, milestones, keys) -> list[dict]:
    """A trial's scores at each milestone, from Tune's results: what its MLflow run holds. Reports between
    milestones (checkpoints) repeat the last scores at a step never evaluated, and a trial resumed after its
    last step reports that step again; neither becomes a point."""
    if df is None or "step" not in df:
        return []
    at = {}
    for r in df.to_dict("records"):
        if not _nan(r["step"]) and int(r["step"]) in milestones:
            at[int(r["step"])] = {"step": float(r["step"]),
                                  **{k: float(r[k]) for k in keys if k in r and not _nan(r[k])}}
    return [at[step] for step in sorted(at)]


def trial_statuses(experiment: str) -> dict[str, str]:
    """Tune's own record of each trial, as saved before it stopped its actors: TERMINATED (ran to the end or
    stopped by the scheduler), ERROR, or RUNNING / PENDING / PAUSED (the sweep was interrupted)."""
    trials = tune.ExperimentAnalysis(experiment).trials
    # keyed by id and by folder name: a trial that failed before its first report is known by its folder only
    return {**{Path(t.path).name: t.status for t in trials}, **{t.trial_id: t.status for t in trials}}


def record_outcomes(tracking: Tracking, summary: dict, statuses: dict[str, str], last_step: int) -> list[str]:
    """Every trial's run gets its true final state; returns the ids of trials the sweep left unfinished."""
    client = MlflowClient(tracking.uri)
    unfinished = []
    for s in summary.values():
        for row in s["trials"]:
            status, run_id = statuses.get(row["trial_id"]), tracking.find_run(row["trial_id"])
            if status not in ("TERMINATED", "ERROR"):
                unfinished.append(row["trial_id"])
            if run_id is None:
                continue  # never started
            if row["error"] is not None or status == "ERROR":
                fail_run(client, run_id, row["error"] or "error")
            elif status != "TERMINATED":
                end_run(client, run_id, "KILLED", "interrupted: resume with --resume")
            elif row["step"] is not None and row["step"] < last_step:
                end_run(client, run_id, "FINISHED", f"stopped by ASHA at step {row['step']}",
                        **{STOPPED_TAG: row["step"]})
            else:
                end_run(client, run_id, "FINISHED")
    return unfinished


def print_summary(recipe: Recipe, summary: dict) -> None:
    metric = recipe.scheduler.metric
    text, subject = metric_names(recipe.eval)
    for pair, s in summary.items():
        print(f"\n== {pair} ==")
        print(f"{'trial':<18} {'step':>5} {text:>13} {subject:>13} {metric:>10}  front  hyperparameters")
        for r in sorted(s["trials"], key=lambda r: str(r["trial_id"])):
            star = "*" if s["best"] is r else " "
            hp = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(r["hparams"].items()))
            print(f"{star}{str(r['trial_id']):<17} {str(r['step']):>5} {_fmt(r[text]):>13} "
                  f"{_fmt(r[subject]):>13} {_fmt(r[metric]):>10}  {'yes' if r.get('pareto') else '':<5}  {hp}"
                  + (f"  ERROR: {r['error']}" if r["error"] else ""))
        if s["best"]:
            print(f"best: {s['best']['trial_id']}  adapter: {mask(str(s['best']['adapter']))}")
            if s["best"]["best_method"]:
                print(f"best sampling method: {s['best']['best_method']}")
        for name, path in s["plots"].items():
            print(f"{name}: {path}")


def run_sweep(recipe: Recipe, resume: bool = False, recipe_path: str | None = None,
              overrides: tuple[str, ...] = (), address: str | None = None) -> int:
    storage = resolve_storage(recipe.storage_path)
    check_storage(storage)
    check_base(recipe.base_model)  # a missing or unsupported model: exit 2 now, not once per trial
    uri = resolve_tracking_uri(recipe.mlflow.tracking_uri, storage, in_job=in_job_working_dir())
    preflight(uri, nodes=1)  # unreachable or misconfigured: exit 2 before Ray starts
    experiment = os.path.join(storage, recipe.name)
    if resume and not tune.Tuner.can_restore(experiment):
        raise RecipeError(f"--resume: no sweep to resume at {mask(experiment)}")
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    connect(resolve_address(address), env_vars={"TOKENIZERS_PARALLELISM": "false", **forwarded})
    check_feasible(recipe)  # a trial no node can ever hold: exit 2 now, not a worker group retried forever
    check_nodes(recipe, storage, uri)
    if is_remote(storage):
        recipe = stage_base(recipe, storage)
    if is_remote(storage) or recipe.storage_shared:
        recipe = stage_subjects(recipe, storage)  # every node reads the photos from there
    tracking = start_sweep(uri, recipe, recipe_path, storage, overrides, resume=resume)
    print(f"palp-sweep: {recipe.name}: {len(recipe.pair_ids())} pair(s)\n  storage: {mask(storage)}\n"
          f"  mlflow:  {mask(uri)}")
    resume_hint = "palp-sweep " + shlex.join([recipe_path or "RECIPE", *overrides, "--resume"])
    client = MlflowClient(uri)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # `ray job stop`, a batch scheduler: like a second Ctrl-C
    try:
        # trial groups: the coordinator that forms them and runs their TorchTrainers (orchestrator/groups.py)
        coordinator = start_coordinator(recipe, storage) if recipe.resources.trials_per_group > 1 else None
        try:
            results = build_tuner(recipe, storage, resume, tracking).fit()  # Ctrl-C: Tune stops and saves state
        finally:
            if coordinator is not None:
                ray.kill(coordinator)  # and with it the groups it runs
        report_uri = join(storage, recipe.name, "report")
        report_dir = Path(tempfile.mkdtemp(prefix="palp-report-")) if is_remote(storage) else Path(report_uri)
        summary, failed = summarize(recipe, results, report_dir, report_uri, storage)
        unfinished = record_outcomes(tracking, summary, trial_statuses(experiment), max(recipe.search.steps))
        client.log_artifacts(tracking.parent_run_id, str(report_dir), "report")
        if not unfinished:
            overview.log_report(client, tracking.parent_run_id, recipe, summary, report_dir)
        if is_remote(storage):
            store.upload(report_dir, report_uri)
            shutil.rmtree(report_dir)  # the driver's copy: the storage holds the report
    except KeyboardInterrupt:  # SIGTERM, or a second Ctrl-C while Tune was stopping
        close_open_children(tracking, "KILLED", "interrupted: resume with --resume")
        end_run(client, tracking.parent_run_id, "KILLED", "interrupted")
        print(f"\npalp-sweep: interrupted; nothing registered. Resume with: {resume_hint}", file=sys.stderr)
        return INTERRUPTED
    except BaseException as e:
        why = reason(e)
        close_open_children(tracking, "FAILED", f"the sweep failed: {why}")
        fail_run(client, tracking.parent_run_id, why)
        raise
    print_summary(recipe, summary)
    print(f"\nsummary: {mask(join(report_uri, 'summary.json'))}")
    if unfinished:
        end_run(client, tracking.parent_run_id, "KILLED", f"interrupted with {len(unfinished)} trial(s) unfinished")
        print(f"palp-sweep: interrupted with {len(unfinished)} trial(s) unfinished; nothing registered. "
              f"Resume with: {resume_hint}", file=sys.stderr)
        return INTERRUPTED
    registered = {pair: register_best(tracking, recipe, pair, s["best"], len(s["trials"]))
                  for pair, s in summary.items() if s["best"]}
    overview.describe(tracking, recipe, summary, registered, failed)  # its note says which pairs failed
    end_run(client, tracking.parent_run_id, "FAILED" if failed else "FINISHED")
    for r in registered.values():
        print(f"registered: models:/{r['name']}/{r['version']}" + ("  (champion)" if r["champion"] else "")
              + (f"  ({r['note']})" if r.get("note") else ""))
    print("browse: " + "\n        ".join(browse_lines(uri, tracking.experiment_id)))
    # `models` finds ./mlflow.db without a flag, and a job's ~/palp-sweep/runs/mlflow.db only where no ./mlflow.db is
    if registered and uri != default_store(Path.cwd()):  # (tracking.default_stores)
        print(f"models: palp-sweep models list --tracking-uri {mask(uri)}")
    if failed:
        print("palp-sweep: pairs with no finished trial: " + " | ".join(failed))
        return 1
    return 0


def _terminated(signum, frame):
    raise KeyboardInterrupt


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
