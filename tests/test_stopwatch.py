"""The trial phase timer and the sweep benchmark's split of a trial's wall time."""

import time

import pytest

from benchmarks.sweep_bench import PHASES, bench_overrides, trial_times
from palp_trainer.loops.stopwatch import Stopwatch


def test_phases_add_up_and_name_the_loop_times():
    watch = Stopwatch()
    for _ in range(2):
        with watch("steps"):
            time.sleep(0.02)
    with pytest.raises(ValueError), watch("export"):  # a phase that raises still counts
        time.sleep(0.01)
        raise ValueError
    m = watch.metrics()
    assert 0.04 <= m["time/steps_s"] < 0.5 and 0.01 <= m["time/export_s"] < 0.5
    assert m["time/loop_entry_unix"] <= m["time/loop_end_unix"] <= time.time()
    assert m["time/loop_end_unix"] - m["time/loop_entry_unix"] >= 0.05
    # this process: started before the watch (to the second: /proc/stat gives the boot time in whole seconds)
    assert time.time() - 365 * 86400 < m["time/process_start_unix"] <= watch.entered + 1.0


def test_the_split_accounts_for_the_whole_wall_time():
    m = {"time/trial_start_unix": 1000.0, "time/process_start_unix": 1004.0, "time/loop_entry_unix": 1012.0, "time/loop_end_unix": 1050.0,
         "time/steps_s": 20.0, "time/eval_s": 5.0, "time/base_s": 3.0, "time/first_step_s": 1.0, "time/export_s": 2.0}
    t = trial_times(m)
    assert (t["wall"], t["launch"], t["imports"], t["steps"], t["eval"]) == (50.0, 4.0, 8.0, 20.0, 5.0)
    assert t["overhead"] == 25.0 and t["other"] == pytest.approx(25.0 - 12 - 3 - 1 - 2)
    assert t["overhead"] == pytest.approx(sum(t[p] for p in (*PHASES, "other")))


def test_bench_overrides_make_n_trials(tmp_path):
    from orchestrator.recipe_yaml import load_recipe
    from orchestrator.search_space import expand_trials
    from tests.test_recipe import ROOT

    r = load_recipe(ROOT / "recipes" / "smoke.yaml", bench_overrides(8, 100, 2))
    assert len(expand_trials(r)) == 8 and r.search.steps == (100,) and r.scheduler.type == "fifo"
    assert r.resources.max_concurrent_trials == 2
