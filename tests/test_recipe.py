"""Recipes -> typed objects, overrides, pairs, the Tune param_space and per-trial TrainConfig. No model is built."""

from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from ray.tune.search.sample import Categorical, Float

from orchestrator.recipe import Recipe, RecipeError, Search, TrainDefaults
from orchestrator.recipe_yaml import apply_override, load_recipe
from orchestrator.search_space import expand_trials, grid_points, hparams_of, param_space, train_config
from palp_trainer.config import (ALIGNMENT_ONLY, GROUP_KNOBS, KNOBS, TINY_RESOLUTION, SubjectSpec, TrainConfig,
                                 knobs_where)
from palp_trainer.evaluation.scorers import metric_names
from tests.conftest import write_images

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "palp-sweep recipes/" + path.name in first  # the command that runs it
    recipe = load_recipe(path)
    assert recipe.pair_ids()
    for pair in recipe.pair_ids():
        config = train_config(recipe, pair, {}, "out")
        assert all(Path(f).is_file() for s in config.subjects for f in s.images)
    assert len(expand_trials(recipe)) >= 1


def test_shipped_recipes_exist():
    assert {p.name for p in RECIPES} >= {"smoke.yaml", "single_subject.yaml", "single_shot.yaml",
                                         "multi_subject.yaml", "art_inspired.yaml", "paper_table2.yaml",
                                         "world_demo.yaml", "world_single_subject.yaml", "world_multi_subject.yaml",
                                         "world_art_inspired.yaml", "world_table2.yaml"}


def test_world_recipes_score_with_the_judge_on_the_world_base():
    for path in RECIPES:
        recipe = load_recipe(path)
        world = recipe.base_model == "world"
        assert (recipe.eval.scorer == "world") == world, path.name
        assert metric_names(recipe.eval) == (("judge_text", "judge_subject") if world else ("clip_t", "clip_i"))
        if world:  # orientation is part of an arrow's or a moon's identity: no flipped references
            assert (recipe.resolution, recipe.precision, recipe.train.flip) == (32, "fp32", False), path.name


def test_train_defaults_are_trainconfig_defaults():
    trainer = {f.name: f.default for f in fields(TrainConfig)}
    for f in fields(TrainDefaults):
        assert f.default == trainer[f.name], f.name


@pytest.mark.parametrize("knob, bad", [("alpha", -1.0), ("beta", 0.0), ("lr", 0.0), ("align_weight", -0.5),
                                       ("rank", 0), ("t_range", (5, 5)), ("alignment", "sdss"), ("resolution", 30)])
def test_one_rule_per_knob_for_direct_callers_and_recipes(tmp_path, knob, bad):
    """KNOBS' rule is TrainConfig's (a benchmark building TrainConfig(alpha=-1) is refused), and a recipe's message
    is the same rule under its field path."""
    with pytest.raises(ValueError) as direct:
        TrainConfig(subjects=(SubjectSpec("cat", "[V1]", "cat", ("x.png",), "A photo of [V1]"),),
                    target_prompt="[V1]", clean_prompt="cat", output_dir="o", **{knob: bad})
    assert str(direct.value).startswith(f"{knob}: ")
    section = "" if knob == "resolution" else "train."
    with pytest.raises(RecipeError) as recipe:
        load_recipe(write_recipe(tmp_path), [f"{section}{knob}={list(bad) if isinstance(bad, tuple) else bad}"])
    assert str(recipe.value) == section + str(direct.value)


def test_every_list_of_knobs_reads_the_table():
    assert [f.name for f in fields(TrainDefaults)] == list(knobs_where("train"))
    assert [f.name for f in fields(Search)][:-2] == list(knobs_where("searchable"))
    assert GROUP_KNOBS == ("alpha", "beta", "lr", "embedding_lr", "align_weight")
    assert ALIGNMENT_ONLY == ("alpha", "beta", "align_weight", "align_every", "same_noise")
    assert set(KNOBS) == {f.name for f in fields(TrainConfig)}


def write_recipe(tmp_path, **sections) -> Path:
    write_images(tmp_path / "cat", 2, seed=0)
    write_images(tmp_path / "mug", 2, seed=1)
    raw = {"name": "t",
           "subjects": [{"name": "cat", "token": "[V1]", "class_word": "cat", "images": "cat"},
                        {"name": "mug", "token": "[V2]", "class_word": "mug", "images": "mug",
                         "prompt": "An oil painting of {token}"}],
           "prompts": ["A sketch of [V1]"], **sections}
    if "[V2]" not in str(raw["prompts"]):
        raw["subjects"] = raw["subjects"][:1]  # a subject no prompt mentions is an error
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_and_derived_fields(tmp_path):
    r = load_recipe(write_recipe(tmp_path, prompts=["A sketch of [V1]", "[V2] on a table"]))
    assert (r.resolution, r.precision) == (TINY_RESOLUTION, "fp32")  # tiny: 32 px on CPU
    assert r.subjects[0].prompt == "A photo of [V1]"
    assert r.subjects[1].prompt == "An oil painting of [V2]"
    assert r.subjects[0].images == tuple(str((tmp_path / "cat" / f"{i}.png").absolute()) for i in range(2))
    assert r.prompts[0].clean == "A sketch of cat"
    assert r.prompts[0].slug == "a-sketch-of-v1"
    assert r.search.steps == (500,) and r.scheduler.type == "asha" and r.resources.gpus_per_worker == 0
    assert r.eval.clip_model == "openai/clip-vit-base-patch32"
    assert r.eval.scorer == "clip"
    r = load_recipe(write_recipe(tmp_path, base_model="some/model", train={"allow_upscale": True}))
    assert len(r.subjects) == 1
    assert (r.resolution, r.precision) == (512, "bf16")
    r = load_recipe(write_recipe(tmp_path, base_model="world"))
    assert (r.resolution, r.precision, r.eval.scorer) == (32, "fp32", "world")
    r = load_recipe(write_recipe(tmp_path, base_model="world", eval={"scorer": "clip", "clip_model": "tiny"}))
    assert r.eval.scorer == "clip"  # an explicit scorer is kept


def test_clean_prompt_from_class_words(tmp_path):
    r = load_recipe(write_recipe(tmp_path, prompts=["A portrait of a [V1] and a [V2] at night"]))
    assert r.prompts[0].clean == "A portrait of a cat and a mug at night"


def test_pairs_train_all_subjects_a_prompt_mentions(tmp_path):
    r = load_recipe(write_recipe(tmp_path, prompts=[
        "A sketch of [V1]",
        {"target": "An oil painting of [V2] inspired by [V1]", "clean": "An oil painting of a mug on a rock"}]))
    assert r.pair_ids() == ["cat__a-sketch-of-v1", "mug+cat__an-oil-painting-of-v2-inspired-by-v1"]
    subjects, prompt = r.pair_parts(r.pair_ids()[1])
    assert [s.token for s in subjects] == ["[V2]", "[V1]"]  # order of appearance
    config = train_config(r, r.pair_ids()[1], {}, "out")
    assert config.tokens == ("[V2]", "[V1]") and config.clean_prompt == "An oil painting of a mug on a rock"
    with pytest.raises(RecipeError, match="no pair 'nope'"):
        r.pair("nope")


@pytest.mark.parametrize("name", ["multi_subject.yaml", "art_inspired.yaml"])
def test_shipped_multi_subject_recipes_train_both_tokens_in_one_pair(name):
    r = load_recipe(ROOT / "recipes" / name)
    assert len(r.pair_ids()) >= 2  # a sweep over several target prompts
    for pair in r.pair_ids():
        subjects, prompt = r.pair_parts(pair)
        assert {s.token for s in subjects} == {"[V1]", "[V2]"}
        assert "[" not in prompt.clean


def test_overrides_apply_before_validation(tmp_path):
    path = write_recipe(tmp_path)
    r = load_recipe(path, ["search.alpha=[7.5,15]", "train.rank=4", "resources.workers_per_trial=2",
                           "subjects[0].class_word=dog", "train.lr=5e-5", "mlflow.tracking_uri="])
    assert r.search.alpha.kind == "grid" and r.search.alpha.values == (7.5, 15.0)
    assert r.train.rank == 4 and r.train.lr == 5e-5 and r.resources.workers_per_trial == 2
    assert r.subjects[0].class_word == "dog" and r.prompts[0].clean == "A sketch of dog"
    assert r.mlflow.tracking_uri is None
    with pytest.raises(RecipeError, match=r"^train\.rank: expected int, got str 'abc'$"):
        load_recipe(path, ["train.rank=abc"])
    with pytest.raises(RecipeError, match=r"^subjects\[5\]: index out of range"):
        load_recipe(path, ["subjects[5].class_word=dog"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(path, ["train.rank"])


def test_apply_override_creates_missing_sections():
    assert apply_override({"name": "x"}, "search.lr={loguniform: [1e-5, 1e-4]}") == {
        "name": "x", "search": {"lr": {"loguniform": [1e-5, 1e-4]}}}


def test_param_space_domains(tmp_path):
    r = load_recipe(write_recipe(tmp_path, search={
        "alpha": [7.5, 15], "beta": 1.0, "rank": {"choice": [4, 8]}, "lr": {"loguniform": [1e-5, 1e-4]},
        "align_weight": {"uniform": [0.5, 2]}, "alignment": ["palp", "sds"]}))
    space = param_space(r)
    assert space["pair"] == {"grid_search": ["cat__a-sketch-of-v1"]}
    assert space["point"] == {"grid_search": [{"alpha": 7.5, "alignment": "palp"}, {"alpha": 7.5, "alignment": "sds"},
                                              {"alpha": 15.0, "alignment": "palp"}, {"alpha": 15.0, "alignment": "sds"}]}
    assert space["beta"] == 1.0
    assert isinstance(space["rank"], Categorical) and space["rank"].categories == [4, 8]
    assert isinstance(space["lr"], Float) and (space["lr"].lower, space["lr"].upper) == (1e-5, 1e-4)
    assert isinstance(space["align_weight"], Float)
    assert set(space) == {"pair", "point", "beta", "rank", "lr", "align_weight"}
    assert hparams_of({"pair": "p", "point": {"alpha": 15.0, "alignment": "sds"}, "lr": 2e-5}) == {
        "alpha": 15.0, "alignment": "sds", "lr": 2e-5}


def test_the_baseline_arm_is_one_point_per_value_of_the_knobs_it_uses(tmp_path):
    r = load_recipe(write_recipe(tmp_path, search={
        "alignment": ["palp", "none"], "alpha": [7.5, 15], "beta": [0.5, 1.0], "rank": [4, 8], "align_every": [1, 2]}))
    points = grid_points(r)
    palp = [p for p in points if p["alignment"] == "palp"]
    assert len(palp) == 16 and len({tuple(sorted(p.items())) for p in palp}) == 16
    assert [p for p in points if p["alignment"] == "none"] == [{"alignment": "none", "rank": 4},
                                                               {"alignment": "none", "rank": 8}]
    table = expand_trials(r)
    assert len(table) == 18 and {row["alpha"] for row in table if row["alignment"] == "none"} == {"-"}
    # a baseline-only recipe: alpha is not crossed with anything
    r = load_recipe(write_recipe(tmp_path, train={"alignment": "none"}, search={"alpha": [7.5, 15], "rank": [4, 8]}))
    assert grid_points(r) == [{"rank": 4}, {"rank": 8}]


def test_train_config_for_one_trial(tmp_path):
    r = load_recipe(write_recipe(tmp_path, search={"steps": [4, 8], "alpha": [7.5, 15]},
                                 train={"batch_size": 2, "rank": 4}, seed=3,
                                 prompts=[{"target": "A sketch of [V1] at night", "elements": ["a sketch", "at night"]}],
                                 eval={"clip_model": "tiny", "num_images": 2}))
    config = train_config(r, "cat__a-sketch-of-v1-at-night", {"alpha": 15.0, "rank": 8}, str(tmp_path / "o"))
    assert isinstance(config, TrainConfig)
    assert config.steps == 8 and config.milestones == (4, 8) and config.report_steps == (4, 8)
    assert (config.alpha, config.rank, config.batch_size, config.seed) == (15.0, 8, 2, 3)
    assert config.target_prompt == "A sketch of [V1] at night" and config.clean_prompt == "A sketch of cat at night"
    assert config.eval.elements == ("a sketch", "at night") and config.eval.clip_model == "tiny"
    assert config.subjects[0].prompt == "A photo of [V1]" and config.resolution == TINY_RESOLUTION
    assert TrainConfig.from_dict(config.to_dict()) == config  # what Ray ships to workers
    with pytest.raises(RecipeError, match=r"^hparams\.foo: not a trainer knob"):
        train_config(r, r.pair_ids()[0], {"foo": 1}, "o")


@pytest.mark.parametrize("search, pairs, rows", [
    ({}, 1, 1),
    ({"alpha": [7.5, 15]}, 1, 2),
    ({"alpha": [7.5, 15], "beta": [1.0, 2.0], "num_samples": 3}, 1, 12),
    ({"alpha": [7.5, 15], "lr": {"loguniform": [1e-5, 1e-4]}, "num_samples": 2}, 2, 8),
])
def test_expand_trials_counts(tmp_path, search, pairs, rows):
    prompts = ["A sketch of [V1]", "A photo of [V1] and [V2]"][:pairs]
    r = load_recipe(write_recipe(tmp_path, search=search, prompts=prompts))
    table = expand_trials(r)
    assert len(table) == rows
    assert {row["pair"] for row in table} == set(r.pair_ids())
    if "lr" in search:
        assert {row["lr"] for row in table} == {"loguniform(1e-5, 1e-4)"}
    assert all(row["workers"] == 1 and row["cpus_per_worker"] == 1 for row in table)


def test_recipe_is_frozen(tmp_path):
    r = load_recipe(write_recipe(tmp_path))
    assert isinstance(r, Recipe)
    with pytest.raises(AttributeError):
        r.name = "other"


def test_trial_groups_knob(tmp_path):
    """resources.trials_per_group: refused below 1 and with fp16 (a shared loss scale); points that can share a
    group sit next to each other in the grid; the driver counts each group key's trials (groups form when full)."""
    from orchestrator.groups import expected_members

    path = ROOT / "recipes" / "smoke.yaml"
    with pytest.raises(RecipeError, match=r"^resources\.trials_per_group: must be >= 1"):
        load_recipe(path, ["resources.trials_per_group=0"])
    with pytest.raises(RecipeError, match=r"^resources\.trials_per_group: a trial group trains on one worker"):
        load_recipe(path, ["resources.trials_per_group=4", "resources.workers_per_trial=2"])
    with pytest.raises(RecipeError, match=r"^resources\.trials_per_group: .*fp16"):
        load_recipe(path, ["resources.trials_per_group=4", "precision=fp16"])
    r = load_recipe(path, ["resources.trials_per_group=4", "search.alignment=palp", "search.alpha=[3, 7.5]",
                           "search.rank=[4, 8]", "search.lr=[1e-4, 2e-4]"])
    points = param_space(r)["point"]["grid_search"]
    assert [p["rank"] for p in points] == [4] * 4 + [8] * 4  # α x lr of a rank together
    assert sorted(expected_members(r).values()) == [4, 4]  # per rank, 2 α x 2 lr
    # a sampled knob outside the group knobs makes the keys random: groups then form by waiting
    assert expected_members(load_recipe(path, ["resources.trials_per_group=2", "search.rank={choice: [4, 8]}"])) is None
