"""Recipe.search -> Tune param_space; one trial's (pair, hyperparameters) -> the trainer's TrainConfig."""

import itertools
from dataclasses import replace

from ray import tune

from palp_trainer.config import ALIGNMENT_ONLY, GROUP_KNOBS, SubjectSpec, TrainConfig

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


def grid_points(recipe: Recipe) -> list[dict]:
    """The grid dims crossed, in order; a point of the baseline arm keeps only the knobs it uses, so α x β x rank
    with `alignment: [palp, none]` trains one baseline per rank instead of one per (α, β, rank)."""
    grid = {k: d.values for k, d in recipe.search.dims.items() if d.kind == "grid"}
    points = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        if point.get("alignment", recipe.train.alignment) == "none":
            point = {k: v for k, v in point.items() if k not in ALIGNMENT_ONLY}  # what the baseline never reads
        if point not in points:
            points.append(point)
    return points


def param_space(recipe: Recipe) -> dict:
    """Tune's space: a grid over the (subject set, prompt) pairs, one over `grid_points` (a dict per point, under
    "point"), and the sampled or fixed knobs."""
    points = grid_points(recipe)
    if recipe.resources.trials_per_group > 1:  # points that can share a trial group next to each other
        points.sort(key=lambda p: repr(sorted((k, v) for k, v in p.items() if k not in GROUP_KNOBS)))
    return {"pair": tune.grid_search(recipe.pair_ids()), "point": tune.grid_search(points),
            **{knob: _domain(dim) for knob, dim in recipe.search.dims.items() if dim.kind != "grid"}}


def hparams_of(config: dict) -> dict:
    """A trial's searched knobs, flat: its grid point's and the sampled ones (the pair left out)."""
    return {**config.get("point", {}), **{k: v for k, v in config.items() if k not in ("pair", "point")}}


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
    r = recipe.resources
    rows = []
    for _ in range(recipe.search.num_samples):
        for pair, point in itertools.product(recipe.pair_ids(), grid_points(recipe)):
            hparams = {k: point.get(k, "-") if d.kind == "grid" else d.describe() for k, d in dims.items()}
            rows.append({"trial": len(rows), "pair": pair, **hparams, "workers": r.workers_per_trial,
                         "cpus_per_worker": r.cpus_per_worker, "gpus_per_worker": r.gpus_per_worker})
    return rows
