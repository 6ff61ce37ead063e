"""`palp-sweep`: argv -> Recipe (+ key=value overrides) -> sweep; or the `models` / `generate` subcommands.

Imports here stay light (no torch, MLflow, Ray): `--help` and the `models` commands start in a fraction of the
seconds those take; each command imports what it needs once its command line is known to be good.
"""

import argparse
import os
import sys

from palp_trainer.errors import DataError

from .cli_args import OneLineParser, UsageError
from .recipe import Recipe, RecipeError, format_value

SUBCOMMANDS = ("models", "generate")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="palp-sweep",
        description="Run a PALP recipe as a Ray Tune sweep of Ray Train jobs, tracked in MLflow.",
        epilog="other commands: `palp-sweep models ...` (registered adapters), "
               "`palp-sweep generate ...` (sample from an adapter); add -h to either for help.")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/smoke.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a recipe field, e.g. train.rank=4 search.alpha=[7.5,15] subjects[0].class_word=dog")
    p.add_argument("--dry-run", action="store_true", help="validate, print the trial table and resources; run nothing")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="with --dry-run: the GPUs the estimate spreads trials over (default: "
                        "resources.max_concurrent_trials trials at a time, else one)")
    p.add_argument("--resume", action="store_true", help="continue the sweep stored under storage_path/<name>")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="the Ray cluster's GCS address (or auto); default: RAY_ADDRESS (set by `ray job submit`), "
                        "else a local Ray of this sweep's own")
    return p


def format_table(rows: list[dict]) -> str:
    """Plain aligned columns; the header is the union of the rows' keys in first-seen order."""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[format_value(row.get(c, "")) for c in cols] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def dry_run(recipe: Recipe, gpus: int | None = None) -> None:
    from .estimate import estimate, format_estimate
    from .search_space import expand_trials

    rows = expand_trials(recipe)
    s, r = recipe.search, recipe.resources
    grid = len(rows) // (len(recipe.pair_ids()) * s.num_samples)
    print(f"recipe {recipe.name}: {len(rows)} trial(s) = {len(recipe.pair_ids())} pair(s) x {grid} grid point(s)"
          f" x {s.num_samples} sample(s)")
    print(f"base_model {recipe.base_model}, {recipe.resolution} px, {recipe.precision}; train to step "
          f"{max(s.steps)}, report at {', '.join(map(str, s.steps))}; scheduler {recipe.scheduler.type} on "
          f"{recipe.scheduler.metric} ({recipe.scheduler.mode})")
    print()
    print(format_table(rows))
    print()
    trial_gpus = r.workers_per_trial * r.gpus_per_worker
    global_batch = r.workers_per_trial * recipe.train.batch_size * recipe.train.grad_accum
    print(f"resources per trial: {r.workers_per_trial} worker(s) x ({r.cpus_per_worker:g} CPU"
          + (f", {r.gpus_per_worker:g} GPU" if r.use_gpu else "") + f") = {r.workers_per_trial * r.cpus_per_worker:g}"
          f" CPU, {trial_gpus:g} GPU; global batch {global_batch}")
    print("max concurrent trials: " + (str(r.max_concurrent_trials) if r.max_concurrent_trials
                                       else "as many as the cluster fits (decided at run time)"))
    print(f"storage: {recipe.storage_path}/{recipe.name}")
    slots = max(1, gpus // max(1, int(trial_gpus))) if gpus else r.max_concurrent_trials or 1
    print()
    print(format_estimate(recipe, estimate(recipe, rows, slots)))


def _sweep(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.dry_run and args.resume:
        raise UsageError("--dry-run and --resume do not combine: a dry run starts nothing to resume")
    from .recipe_yaml import load_recipe  # checks the subject images: imports torch (seconds) that --help skips

    recipe = load_recipe(args.recipe, args.overrides)
    if args.gpus is not None and (not args.dry_run or args.gpus < 1):
        raise UsageError("--gpus: a number of GPUs >= 1, with --dry-run")
    if args.dry_run:
        dry_run(recipe, args.gpus)
        return 0
    from .sweep import run_sweep  # imports Ray, MLflow and the trainer

    return run_sweep(recipe, resume=args.resume, recipe_path=args.recipe, overrides=tuple(args.overrides),
                     address=args.address)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "models":
            from .registry_cli import main as models_main
            code = models_main(argv[1:])
        elif argv and argv[0] == "generate":
            from .generate import main as generate_main
            code = generate_main(argv[1:])
        else:
            code = _sweep(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
        return code
    except (RecipeError, DataError, UsageError) as e:
        print(f"palp-sweep: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `palp-sweep ... --dry-run | head`: the reader left; Python's own convention
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it


if __name__ == "__main__":
    raise SystemExit(main())
