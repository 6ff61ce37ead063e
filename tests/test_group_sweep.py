"""A sweep with trial groups on local Ray: each member is its own Tune trial, MLflow run and adapter; ASHA stops
members alone; the group trained them in one worker group (orchestrator/groups.py)."""

import json
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from orchestrator.cli import main
from orchestrator.tracking import STOPPED_TAG

pytestmark = pytest.mark.integration
SMOKE = str(Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml")
ALPHAS = (12.0, 7.5, 3.0)  # on this tiny model the score at step 4 falls with α; the group reports in this order


def test_members_are_trials_with_their_own_runs_adapters_and_decisions(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main([SMOKE, "name=grouped", f"storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={uri}",
                 "search.alignment=palp", f"search.alpha=[{', '.join(map(str, ALPHAS))}]",
                 "resources.trials_per_group=3", "resources.max_concurrent_trials=null", "eval.methods=[cfg]"])
    ray.shutdown()
    assert code == 0
    summary = json.loads((tmp_path / "runs" / "grouped" / "report" / "summary.json").read_text())
    (pair,) = summary.values()
    rows = {r["hparams"]["alpha"]: r for r in pair["trials"]}
    assert sorted(rows) == sorted(ALPHAS) and all(r["error"] is None for r in rows.values())
    # ASHA judged each member at step 4 as it would any trial (reduction factor 2): the best, first to report, went
    # on to step 8; the worst, below the rung's cutoff, was stopped there, alone
    assert rows[12.0]["step"] == 8 and rows[3.0]["step"] == 4

    client = MlflowClient(uri)
    runs = {r.data.params["alpha"]: r for r in client.search_runs(
        [client.get_experiment_by_name("grouped").experiment_id], "tags.`palp.trial_id` != ''")}
    assert sorted(map(float, runs)) == sorted(ALPHAS)  # one child run per member
    for alpha, row in rows.items():
        run = runs[str(alpha)]
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "denoise_loss")
        assert sorted(m.step for m in history) == list(range(1, row["step"] + 1))  # its own steps, once each
        assert run.data.metrics["time/group_size"] == 3.0  # trained in a group of 3
        trial = tmp_path / "runs" / "grouped" / "trials" / row["pair"] / row["trial_id"]
        lines = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == list(range(1, row["step"] + 1))
        if row["step"] == 8:
            manifest = json.loads((trial / "adapter" / "manifest.json").read_text())
            assert manifest["alpha"] == alpha and manifest["steps"] == 8  # its own adapter
            assert "composite" in run.data.metrics
        else:
            assert run.data.tags[STOPPED_TAG] == "4" and not (trial / "adapter").exists()
    # members trained apart: equal data and start, different α, so different losses from step 1 on
    first = {alpha: client.get_metric_history(runs[str(alpha)].info.run_id, "align_loss")[0].value for alpha in rows}
    assert len(set(first.values())) == 3
    assert pair["best"] is not None
