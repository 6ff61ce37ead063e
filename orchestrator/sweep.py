"""A recipe as one Ray Tune experiment: (subject set, prompt) pairs x hyperparameters, ASHA on milestones."""

import json
import math
import os
import re
from pathlib import Path

import ray
from mlflow import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from .connect import check_feasible, connect, resolve_address
from .recipe import Recipe, RecipeError
from .registry import register_best
from .search_space import param_space
from .selection import pareto_front, plot_curves, plot_pareto
from .tracking import Tracking, preflight, resolve_tracking_uri, start_sweep
from .trial import is_remote, run_trial


def score_keys(recipe: Recipe) -> tuple[str, str, str]:
    """(text alignment, subject fidelity, composite): the recipe's scorer names the first two."""
    return (*recipe.eval.metric_names, "composite")


def in_job_working_dir() -> bool:
    """True under `ray job submit --working-dir`: the CWD is a temporary copy Ray deletes."""
    return "runtime_resources" in os.getcwd()


def resolve_storage(storage_path: str) -> str:
    """Absolute storage root. In a job's temporary working dir a relative path goes under the home
    directory instead, so outputs outlive the job (the sweep prints where)."""
    if is_remote(storage_path) or os.path.isabs(os.path.expanduser(storage_path)):
        return os.path.expanduser(storage_path)
    if in_job_working_dir():
        return str(Path.home() / "palp-sweep" / storage_path)
    return str(Path(storage_path).resolve())


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
    fits = [math.floor(have.get(k, 0) / v) for k, v in need.items() if v]
    return max(1, min(fits))


def scheduler(recipe: Recipe):
    s, steps = recipe.scheduler, sorted(recipe.search.steps)
    if s.type == "fifo":
        return FIFOScheduler()
    # rungs at milestones: time is the training step, grace is the grace_period-th milestone
    return ASHAScheduler(time_attr="step", max_t=steps[-1], grace_period=steps[min(s.grace_period, len(steps)) - 1],
                         reduction_factor=s.reduction_factor)


def build_tuner(recipe: Recipe, storage: str, resume: bool, tracking: Tracking) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, recipe=recipe, storage_path=storage, tracking=tracking),
        {"cpu": 0.01})  # the trial actor only waits on its TorchTrainer: next to no CPU
    experiment = os.path.join(storage, recipe.name)
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise RecipeError(f"--resume: no sweep to resume at {experiment}")
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


def summarize(recipe: Recipe, results, report_dir: Path) -> tuple[dict, list[str]]:
    """Per pair: every trial's final scores, the Pareto front, the best trial; plots on disk."""
    metric, sign = recipe.scheduler.metric, (1 if recipe.scheduler.mode == "max" else -1)
    keys = score_keys(recipe)
    text, subject = recipe.eval.metric_names
    pairs: dict[str, list] = {p: [] for p in recipe.pair_ids()}
    for result in results:
        m = result.metrics or {}
        row = {"trial_id": m.get("trial_id", Path(result.path).name), "pair": result.config["pair"],
               "hparams": {k: v for k, v in result.config.items() if k != "pair"},
               "alignment": result.config.get("alignment", recipe.train.alignment),
               "step": m.get("step"), "error": _reason(result.error) if result.error else None,
               "adapter": m.get("checkpoint_path"), "best_method": m.get("best_method"),
               **{k: m.get(k, float("nan")) for k in keys},
               metric: m.get(metric, float("nan"))}
        df = result.metrics_dataframe
        history = [] if df is None or "step" not in df else [
            {k: float(r[k]) for k in ("step", *keys) if k in df and not _nan(r[k])}
            for r in df.to_dict("records")]
        pairs[row["pair"]].append((row, history))
    summary, failed = {}, []
    for pair, trials in pairs.items():
        rows = [r for r, _ in trials]
        ok = [r for r in rows if r["error"] is None and not _nan(r[metric])]
        for i in pareto_front([(r[text], r[subject]) for r in rows]):
            rows[i]["pareto"] = True
        best = max(ok, key=lambda r: sign * r[metric]) if ok else None
        out = report_dir / pair
        out.mkdir(parents=True, exist_ok=True)
        plots = {}
        if rows:
            plots["pareto"] = str(plot_pareto(rows, out / "pareto.png", pair, text, subject))
            plots["curves"] = str(plot_curves({r["trial_id"]: h for r, h in trials}, out / "curves.png", list(keys)))
        summary[pair] = {"best": best, "trials": rows, "plots": plots}
        if best is None:
            reasons = "; ".join(sorted({r["error"] or "no score" for r in rows})) or "no trial ran"
            failed.append(f"{pair}: {reasons}")
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary, failed


def mark_stopped(tracking: Tracking, summary: dict, last_step: int) -> None:
    """Trials ASHA stopped never reach their own `set_terminated`: close their runs as KILLED."""
    client = MlflowClient(tracking.uri)
    for s in summary.values():
        for row in s["trials"]:
            if row["error"] is None and row["step"] is not None and row["step"] < last_step:
                run_id = tracking.find_run(row["trial_id"])
                client.set_tag(run_id, "palp.stopped_early_at", str(row["step"]))
                client.set_terminated(run_id, "KILLED")


def print_summary(recipe: Recipe, summary: dict) -> None:
    metric = recipe.scheduler.metric
    text, subject = recipe.eval.metric_names
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
            print(f"best: {s['best']['trial_id']}  adapter: {s['best']['adapter']}")
            if s["best"]["best_method"]:
                print(f"best sampling method: {s['best']['best_method']}")
        for name, path in s["plots"].items():
            print(f"{name}: {path}")


def run_sweep(recipe: Recipe, resume: bool = False, recipe_path: str | None = None,
              overrides: tuple[str, ...] = (), address: str | None = None) -> int:
    storage = resolve_storage(recipe.storage_path)
    uri = resolve_tracking_uri(recipe.mlflow.tracking_uri, storage, in_job=in_job_working_dir())
    preflight(uri, nodes=1)  # unreachable or misconfigured: exit 2 before Ray starts
    connect(resolve_address(address), env_vars={"TOKENIZERS_PARALLELISM": "false"})
    check_feasible(recipe)  # a trial no node can ever hold: exit 2 now, not a worker group retried forever
    preflight(uri, nodes=sum(1 for n in ray.nodes() if n["Alive"]))
    tracking = start_sweep(uri, recipe, recipe_path, storage, overrides)
    print(f"palp-sweep: {recipe.name}: {len(recipe.pair_ids())} pair(s)\n  storage: {storage}\n  mlflow:  {uri}")
    results = build_tuner(recipe, storage, resume, tracking).fit()
    report_dir = (Path(storage) if not is_remote(storage) else Path.cwd() / "runs") / recipe.name / "report"
    summary, failed = summarize(recipe, results, report_dir)
    client = MlflowClient(uri)
    mark_stopped(tracking, summary, max(recipe.search.steps))
    client.log_artifacts(tracking.parent_run_id, str(report_dir), "report")
    print_summary(recipe, summary)
    registered = [register_best(tracking, recipe, pair, s["best"]) for pair, s in summary.items() if s["best"]]
    client.set_terminated(tracking.parent_run_id, "FAILED" if failed else "FINISHED")
    print(f"\nsummary: {report_dir / 'summary.json'}")
    for r in registered:
        print(f"registered: models:/{r['name']}/{r['version']}" + ("  (champion)" if r["champion"] else ""))
    print(f"browse: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"browse: {uri}")
    if failed:
        print("palp-sweep: pairs with no finished trial: " + " | ".join(failed))
        return 1
    return 0


def _reason(error: BaseException) -> str:
    """The exception line a person needs: the last line of the worker traceback, ANSI colours stripped."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    return next((line for line in reversed(lines) if line), type(error).__name__)


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
