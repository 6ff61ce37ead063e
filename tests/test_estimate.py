"""`--dry-run`'s GPU-hour estimate: measured step times scaled by the recipe, ASHA's rungs as Ray computes them."""

import math

import pytest
from ray.tune.schedulers.async_hyperband import _Bracket

from orchestrator.cli import main
from orchestrator.estimate import MEASURED, asha_rungs, estimate, step_ms, trial_seconds
from orchestrator.recipe_yaml import load_recipe
from orchestrator.search_space import expand_trials

from .test_recipe import write_recipe

H100 = MEASURED["gpu"]


def gpu_recipe(tmp_path, **sections):
    sections = {"base_model": "some/sd15", "resources": {"use_gpu": True}, **sections}
    sections["train"] = {"allow_upscale": True, **sections.get("train", {})}  # the test photos are 40 px
    return load_recipe(write_recipe(tmp_path, **sections))


def test_step_times_are_the_measured_rows_and_lines_between_them():
    palp = H100.step_ms["palp"]
    assert step_ms(palp, 1) == 42.4 and step_ms(palp, 16) == 306.1
    assert step_ms(palp, 2) == pytest.approx(42.4 + (117.7 - 42.4) / 3)
    assert step_ms(palp, 8) == pytest.approx(117.7 + (306.1 - 117.7) * 4 / 12)
    assert step_ms(palp, 32) == pytest.approx(2 * 306.1)  # above the last: proportional to the batch
    assert step_ms({4: 214.0}, 2) == pytest.approx(107.0)  # one measured batch: proportional


def test_one_trial_by_hand(tmp_path):
    # batch 1, 512 px, 500 steps, one evaluation of 4 images x 25 steps: start + steps + evaluation
    r = gpu_recipe(tmp_path, train={"batch_size": 1}, search={"steps": [500]}, eval={"num_images": 4, "steps": 25})
    assert trial_seconds(H100, r, {"alignment": "palp"}) == pytest.approx(25.8 + 500 * 0.0424 + 3.06)
    assert trial_seconds(H100, r, {"alignment": "none"}) == pytest.approx(25.8 + 500 * 0.0273 + 3.06)
    # every 2nd step aligned: the mean of the two step kinds
    assert trial_seconds(H100, r, {"alignment": "palp", "align_every": 2}) == pytest.approx(
        25.8 + 500 * (0.0424 + 0.0273) / 2 + 3.06)
    # 256 px: a quarter of the pixels, a quarter of the step and sampling time
    r = gpu_recipe(tmp_path, resolution=256, train={"batch_size": 1}, search={"steps": [500]},
                   eval={"num_images": 4, "steps": 25})
    assert trial_seconds(H100, r, {"alignment": "palp"}) == pytest.approx(25.8 + (500 * 0.0424 + 3.06) / 4)


@pytest.mark.parametrize("steps, grace, rf", [((125, 250, 500), 1, 2), ((100, 300), 1, 2), ((50, 100, 200, 400), 2, 2),
                                              ((10, 30, 90, 270), 1, 3), ((100, 250, 500), 1, 2)])
def test_rungs_are_rays(tmp_path, steps, grace, rf):
    r = gpu_recipe(tmp_path, search={"steps": list(steps)},
                   scheduler={"type": "asha", "grace_period": grace, "reduction_factor": rf})
    # Ray's own bracket (what sweep.scheduler builds): min_t = the grace milestone, max_t = the last step
    bracket = _Bracket(min_t=steps[grace - 1], max_t=steps[-1], reduction_factor=rf, s=0)
    ray_rungs = sorted(m for m, _ in bracket._rungs)
    # a trial reports at the recipe's steps only: a rung takes effect at the first report at or after it
    expected = sorted({next(s for s in steps if s >= m) for m in ray_rungs} - {steps[-1]})
    assert asha_rungs(r) == expected
    assert asha_rungs(gpu_recipe(tmp_path, search={"steps": list(steps)}, scheduler={"type": "fifo"})) == []


def test_asha_expectation_and_concurrency(tmp_path):
    r = gpu_recipe(tmp_path, search={"steps": [100, 200, 400], "alignment": ["palp", "none"], "alpha": [7.5, 15]},
                   train={"batch_size": 4})
    rows = expand_trials(r)
    assert len(rows) == 3  # the baseline once: alpha is not crossed with it
    est = estimate(r, rows, slots=2)
    full = sum(trial_seconds(H100, r, row) for row in rows)
    assert est["full_device_h"] == pytest.approx(full / 3600)
    assert est["rungs"] == [100, 200]
    # half stop at 100, a quarter at 200, a quarter finish
    asha = sum(0.5 * trial_seconds(H100, r, row, 100) + 0.25 * trial_seconds(H100, r, row, 200)
               + 0.25 * trial_seconds(H100, r, row) for row in rows)
    assert est["asha_device_h"] == pytest.approx(asha / 3600)
    assert est["full_wall_h"] == pytest.approx(full / 3600 / 2)
    assert estimate(r, rows, slots=8)["full_wall_h"] == pytest.approx(full / 3600 / 3)  # never more than the trials
    two = gpu_recipe(tmp_path, search={"steps": [100, 200, 400]}, resources={"use_gpu": True, "workers_per_trial": 2})
    rows = expand_trials(two)
    assert estimate(two, rows, 1)["full_device_h"] == pytest.approx(2 * trial_seconds(H100, two, rows[0]) / 3600)


def test_dry_run_prints_the_estimate(tmp_path, capsys):
    path = write_recipe(tmp_path, base_model="some/sd15", resources={"use_gpu": True, "max_concurrent_trials": 4},
                        search={"alpha": [7.5, 15], "rank": [4, 8], "steps": [250, 500]},
                        train={"allow_upscale": True})
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipe t: 4 trial(s)" in out and "NVIDIA H100" in out
    hours = float(out.split("GPU-hours: ")[1].split()[0])
    r = load_recipe(path)
    assert math.isclose(hours, estimate(r, expand_trials(r), 4)["full_device_h"], abs_tol=0.005)
    assert "on 4 GPU(s) (4 trial(s) at a time" in out
    assert main([str(path), "--dry-run", "--gpus", "2"]) == 0
    assert "on 2 GPU(s) (2 trial(s) at a time" in capsys.readouterr().out
    assert main([str(path), "--gpus", "2"]) == 2
    assert "--gpus" in capsys.readouterr().err
