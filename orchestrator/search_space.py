"""Recipe.search -> Tune param_space; one trial's (pair, hyperparameters) -> the trainer's TrainConfig."""

import itertools
from dataclasses import replace

from ray import tune

from palp_trainer.config import SubjectSpec, TrainConfig

from .recipe import Dim, Recipe, RecipeError


def _domain(dim: Dim):
    if dim.kind == "fixed":
        return dim.values[0]
    if dim.kind == "grid":
        return tune.grid_search(list(dim.values))
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    lo, hi = dim.values
    return tune.uniform(lo, hi) if dim.kind == "uniform" else tune.loguniform(lo, hi)


def param_space(recipe: Recipe) -> dict:
    """Tune domains for the searched knobs, plus a grid over the recipe's (subject set, prompt) pairs."""
    return {"pair": tune.grid_search(recipe.pair_ids()),
            **{knob: _domain(dim) for knob, dim in recipe.search.dims.items()}}


def train_config(recipe: Recipe, pair_id: str, hparams: dict, output_dir: str) -> TrainConfig:
    """The trainer's config for one trial: the recipe's train defaults, overridden by `hparams`."""
    subjects, prompt = recipe.pair_parts(pair_id)
    knobs = recipe.train.as_kwargs()
    for key in hparams:
        if key not in knobs:
            raise RecipeError(f"hparams.{key}: not a trainer knob; known: {', '.join(knobs)}")
    return TrainConfig(
        subjects=tuple(SubjectSpec(s.name, s.token, s.class_word, s.images, s.prompt) for s in subjects),
        target_prompt=prompt.target,
        clean_prompt=prompt.clean,
        output_dir=output_dir,
        base_model=recipe.base_model,
        resolution=recipe.resolution,
        precision=recipe.precision,
        seed=recipe.seed,
        steps=max(recipe.search.steps),
        milestones=tuple(recipe.search.steps),
        eval=replace(recipe.eval, elements=prompt.elements),
        **{**knobs, **hparams},
    )


def expand_trials(recipe: Recipe) -> list[dict]:
    """The trial table `--dry-run` prints: grids expanded, sampled dims as their distribution,
    repeated num_samples times (what Tune will run, before ASHA stops any)."""
    dims = recipe.search.dims
    grid = {k: d.values for k, d in dims.items() if d.kind == "grid"}
    r = recipe.resources
    rows = []
    for _ in range(recipe.search.num_samples):
        for pair, *values in itertools.product(recipe.pair_ids(), *grid.values()):
            chosen = dict(zip(grid, values))
            hparams = {k: chosen[k] if k in chosen else d.describe() for k, d in dims.items()}
            rows.append({"trial": len(rows), "pair": pair, **hparams, "workers": r.workers_per_trial,
                         "cpus_per_worker": r.cpus_per_worker, "gpus_per_worker": r.gpus_per_worker})
    return rows
