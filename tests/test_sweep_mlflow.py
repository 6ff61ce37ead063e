"""The smoke sweep end to end: local Ray, a real `mlflow server` (sqlite), the registry, pyfunc, resume."""

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
from mlflow import MlflowClient
from PIL import Image

from orchestrator.cli import main
from orchestrator.registry_cli import main as models_main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "recipes" / "smoke.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(360):
        try:
            urllib.request.urlopen(uri + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    overrides = [f"storage_path={storage}", f"mlflow.tracking_uri={mlflow_server}"]
    code = main([SMOKE, *overrides])
    yield {"code": code, "storage": storage, "uri": mlflow_server, "overrides": overrides}
    ray.shutdown()


def test_sweep_succeeds_and_writes_the_report(sweep):
    assert sweep["code"] == 0
    report = sweep["storage"] / "smoke" / "report"
    for png in report.glob("*/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in report.glob("*/*.png")} == {"pareto.png", "curves.png"}
    adapters = list((sweep["storage"] / "smoke" / "trials").glob("*/*/adapter/manifest.json"))
    assert len(adapters) >= 1


def test_runs_params_metrics_and_artifacts(sweep):
    client = MlflowClient(sweep["uri"])
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2  # the smoke grid: alignment in [palp, none]
    assert parents[0].data.params["base_model"] == "tiny"
    assert {"recipe_hash", "version.torch", "version.diffusers", "version.ray", "git_sha"} <= set(parents[0].data.params)
    for child in children:
        pair, trial_id = child.info.run_name.split("/")
        assert pair == child.data.tags["palp.pair"] and trial_id == child.data.tags["palp.trial_id"]
        assert float(child.data.params["alpha"]) == 7.5 and child.data.params["rank"] == "4"
        losses = client.get_metric_history(child.info.run_id, "denoise_loss")
        scores = client.get_metric_history(child.info.run_id, "clip_t")
        # the baseline ASHA stopped at step 4 stopped training there: its workers waited for the decision
        last = 8 if child.data.params["alignment"] == "palp" else 4
        assert sorted(m.step for m in losses) == list(range(1, last + 1))
        assert [m.step for m in scores] == [4, 8][:len(scores)] and scores
        samples = [a.path for a in client.list_artifacts(child.info.run_id, "samples")]
        assert "samples/step-000004.png" in samples
    summary = json.loads((sweep["storage"] / "smoke" / "report" / "summary.json").read_text())
    [trials] = [s["trials"] for s in summary.values()]
    # ASHA stopped the weaker baseline at the first milestone (its run is marked so in MLflow)
    assert {t["hparams"]["alignment"]: t["step"] for t in trials} == {"palp": 8, "none": 4}
    # both ran as planned: the baseline's run says where ASHA stopped it, neither looks like a crash
    ended = {c.data.params["alignment"]: client.get_run(c.info.run_id) for c in children}
    assert {k: r.info.status for k, r in ended.items()} == {"palp": "FINISHED", "none": "FINISHED"}
    assert ended["none"].data.tags["palp.stopped_early_at"] == "4" and "palp.stopped_early_at" not in ended["palp"].data.tags
    assert ended["none"].data.tags["mlflow.note.content"] == "stopped by ASHA at step 4"
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
    finished = [c for c in children if c.data.params["alignment"] == "palp"]
    for method in ("cfg", "pg-0.6", "alignit"):  # every sampling method scored on the finished trial
        assert client.get_metric_history(finished[0].info.run_id, f"method/{method}/composite")
    adapter = {a.path for a in client.list_artifacts(finished[0].info.run_id, "adapter")}
    assert {"adapter/pytorch_lora_weights.safetensors", "adapter/manifest.json",
            "adapter/learned_embeds-V1.safetensors"} <= adapter
    assert {"adapter/kohya", "adapter/embeddings", "adapter/references"} <= adapter  # the UIs' files, CLIP-I's photos
    report = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert "report/summary.json" in report
    assert any(a.path == "recipe/smoke.yaml" for a in client.list_artifacts(parents[0].info.run_id, "recipe"))


def test_registry_version_alias_and_pyfunc(sweep, tmp_path):
    client = MlflowClient(sweep["uri"])
    [model] = client.search_registered_models()
    assert model.name == "palp-cat-a-sketch-of-v1"
    version = client.get_model_version_by_alias(model.name, "champion")
    assert {"alpha", "beta", "rank", "align_every", "steps", "base_model", "recipe_hash",
            "metric.composite"} <= set(version.tags)
    assert version.tags["best_method"] in ("cfg", "pg-0.6", "alignit")
    assert "A sketch of [V1]" in version.description

    import mlflow
    mlflow.set_tracking_uri(sweep["uri"])
    loaded = mlflow.pyfunc.load_model(f"models:/{model.name}@champion")
    [png] = loaded.predict(["A sketch of [V1]"], params={"seed": 3, "steps": 4, "guidance_scale": 5.0})
    got = np.asarray(Image.open(io.BytesIO(png)))

    # the trainer's own generation path on the same adapter and seed
    assert models_main(["--tracking-uri", sweep["uri"], "pull", f"{model.name}@champion", str(tmp_path / "pulled")]) == 0
    from palp_trainer.evaluate import generate, pipeline_from
    from palp_trainer.export import load_adapter
    base, manifest = load_adapter(tmp_path / "pulled")
    for file in (manifest["kohya_lora"], *manifest["a1111_embeddings"].values(),
                 *(r["file"] for r in manifest["subjects"][0]["images"])):  # registered with the model
        assert (tmp_path / "pulled" / file).is_file(), file
    [want] = generate(pipeline_from(base), "A sketch of [V1]", (3,), 4, 5.0, 1, manifest["resolution"])
    assert np.array_equal(got, np.asarray(want))

    # the pulled files load into a stock pipeline
    from diffusers import StableDiffusionPipeline
    from palp_trainer.export import load_into_pipeline
    from palp_trainer.tiny import build_tiny
    stock = StableDiffusionPipeline(**build_tiny(), safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    assert load_into_pipeline(stock, tmp_path / "pulled")["placeholders"] == {"[V1]": "cat"}


def test_models_list_shows_champion(sweep, capsys):
    assert models_main(["--tracking-uri", sweep["uri"], "list"]) == 0
    out = capsys.readouterr().out
    assert "palp-cat-a-sketch-of-v1" in out and "@champion" in out and "composite=" in out


def test_resume_reruns_nothing_and_adds_no_child_run(sweep):
    client = MlflowClient(sweep["uri"])
    experiment = client.get_experiment_by_name("smoke")
    before = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    assert main([SMOKE, *sweep["overrides"], "--resume"]) == 0
    after = client.search_runs([experiment.experiment_id])
    assert {r.info.run_id for r in after} == before
    versions = client.search_model_versions("name = 'palp-cat-a-sketch-of-v1'")
    assert len(versions) == 1  # the resumed sweep's best run is registered already: not again
    parents = [r for r in after if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["FINISHED"]


def test_a_new_sweep_gets_its_own_parent_run_and_version(sweep):
    client = MlflowClient(sweep["uri"])
    assert main([SMOKE, *sweep["overrides"]]) == 0
    experiment = client.get_experiment_by_name("smoke")
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    versions = client.search_model_versions("name = 'palp-cat-a-sketch-of-v1'")
    assert len(versions) == 2 and len({v.run_id for v in versions}) == 2


def test_unreachable_tracking_server_exits_2_before_training(tmp_path, capsys):
    port = free_port()  # nothing listens here
    started = time.time()
    code = main([SMOKE, f"storage_path={tmp_path}", f"mlflow.tracking_uri=http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mlflow.tracking_uri" in err[0] and str(port) in err[0]
    assert not (tmp_path / "smoke").exists() and time.time() - started < 30


def test_unwritable_storage_exits_2_before_ray_starts(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main([SMOKE, f"storage_path={blocker / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("palp-sweep: error: storage_path: cannot write to")
    assert str(blocker) in err[0] and not (tmp_path / "m.db").exists()
