"""Where a sweep's time goes: N trials of one recipe, each trial's wall time split into training steps, evaluation
and the per-trial overhead (worker-group start, base load, data, task build, scorer load, first step / capture,
checkpoints, ASHA decisions, export, tracking).

    python benchmarks/sweep_bench.py                        # CPU: 8 trials x 100 steps of the tiny base, in turn
    python benchmarks/sweep_bench.py --trials 8 --steps 100 --concurrent 2 --json out.json
    python benchmarks/sweep_bench.py --trials 8 --steps 100 --group 8   # one trial group of 8 (trials_per_group)
    python benchmarks/sweep_bench.py recipes/art_inspired.yaml --trials 8 --steps 500   # on GPUs

It runs a real sweep (local Ray, sqlite MLflow, in a temporary folder) and reads the phases each trial logged to
its MLflow run (`time/*`, palp_trainer/loops/stopwatch.py; `time/trial_start_unix` from orchestrator/trial.py).
Headline: overhead fraction = 1 - (sum of step time + evaluation time) / (sweep wall time x concurrent trials).
In a trial group the members share their steps: the group's step and evaluation time count once, `--concurrent`
counts groups, and throughput (trials finished per hour) is the figure to compare with one trial per group.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("launch", "imports", "base", "data", "task", "scorer", "tracking", "first_step", "checkpoint", "decision",
          "export")


def bench_overrides(trials: int, steps: int, concurrent: int, group: int = 1) -> list[str]:
    """N trials that differ in lr only (one grid), trained to `steps` in one go, nothing stopped early; `group`
    members per trial group, `concurrent` groups (or single trials) at a time."""
    lrs = ", ".join(f"{1e-4 * (1 + i / trials):.6g}" for i in range(trials))
    return ["search.alignment=palp", f"search.lr=[{lrs}]", f"search.steps=[{steps}]", "scheduler.type=fifo",
            f"resources.max_concurrent_trials={concurrent * group}", f"resources.trials_per_group={group}",
            "eval.methods=[]"]


def trial_times(metrics: dict) -> dict:
    """One trial's split, in seconds, from its run's `time/*` metrics."""
    wall = metrics["time/loop_end_unix"] - metrics["time/trial_start_unix"]
    # trial start -> the worker's process start: the Train controller, placement, process launch; then imports
    # and Ray Train's set-up up to train_loop (all "imports" when the process start is unknown)
    process = metrics.get("time/process_start_unix", metrics["time/trial_start_unix"])
    split = {"launch": process - metrics["time/trial_start_unix"],
             "imports": metrics["time/loop_entry_unix"] - process,
             **{p: metrics.get(f"time/{p}_s", 0.0) for p in PHASES[2:]}}
    steps, evaluation = metrics.get("time/steps_s", 0.0), metrics.get("time/eval_s", 0.0)
    split["other"] = wall - steps - evaluation - sum(split.values())
    return {"wall": wall, "steps": steps, "eval": evaluation, "overhead": wall - steps - evaluation, **split}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "smoke.yaml"))
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--concurrent", type=int, default=1, help="trials (or trial groups) at a time")
    p.add_argument("--group", type=int, default=1, help="resources.trials_per_group")
    p.add_argument("--json", type=Path)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    args = p.parse_args(argv)
    json_path = args.json.resolve() if args.json else None  # the sweep runs in a temporary folder

    from mlflow import MlflowClient

    from orchestrator.recipe_yaml import load_recipe
    from orchestrator.sweep import run_sweep

    recipe_path = str(Path(args.recipe).resolve())
    overrides = [*bench_overrides(args.trials, args.steps, args.concurrent, args.group), *args.set]
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        os.chdir(tmp)  # the sweep's runs/ and mlflow.db
        recipe = load_recipe(recipe_path, [*overrides, f"storage_path={tmp}/runs",
                                           f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db"])
        start = time.perf_counter()
        code = run_sweep(recipe, recipe_path=recipe_path, overrides=tuple(overrides))
        sweep_wall = time.perf_counter() - start
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                if "mlflow.parentRunId" in r.data.tags]
        rows = [{"trial": r.data.tags.get("palp.trial_id"), "group": r.data.metrics["time/loop_entry_unix"],
                 **trial_times(r.data.metrics)} for r in runs if "time/loop_end_unix" in r.data.metrics]
    if code != 0 or len(rows) != args.trials:
        print(f"sweep_bench: the sweep exited {code} with {len(rows)} of {args.trials} trials timed", file=sys.stderr)
        return 1
    groups = {r["group"]: r for r in rows}  # a group's members share one loop: its times count once
    useful = sum(r["steps"] + r["eval"] for r in groups.values())
    result = {
        "recipe": recipe.name, "trials": len(rows), "steps": args.steps, "concurrent": args.concurrent,
        "trials_per_group": args.group, "groups": len(groups), "sweep_wall_s": sweep_wall,
        "trials_per_hour": len(rows) / sweep_wall * 3600,
        "overhead_fraction": 1 - useful / (sweep_wall * args.concurrent),
        "overhead_per_trial_s": (sweep_wall * args.concurrent - useful) / len(rows),
        "per_trial_median_s": {k: statistics.median(r[k] for r in rows) for k in rows[0]
                               if k not in ("trial", "group")},
        "trials_timed": rows,
    }
    print(f"{recipe.name}: {len(rows)} trials x {args.steps} steps in {len(groups)} group(s), {args.concurrent} at "
          f"a time: sweep {sweep_wall:.1f} s, {result['trials_per_hour']:.0f} trials/hour, overhead fraction "
          f"{result['overhead_fraction']:.2f}, {result['overhead_per_trial_s']:.1f} s overhead per trial")
    print("per trial, median seconds:")
    for key, value in result["per_trial_median_s"].items():
        print(f"  {key:<13} {value:8.2f}")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
