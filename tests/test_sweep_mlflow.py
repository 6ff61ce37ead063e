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
        # "00001 · palp α7.5 · cat/a-sketch-of-v1": short trial id first, then the arm and searched values, the pair
        trial_id, arm = child.data.tags["palp.trial_id"], {"palp": "palp α7.5", "none": "baseline"}[
            child.data.params["alignment"]]
        assert child.info.run_name == f"{trial_id.rsplit('_', 1)[1]} · {arm} · cat/a-sketch-of-v1"
        assert child.data.tags["palp.pair"] == "cat__a-sketch-of-v1"
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
    note = ended["none"].data.tags["mlflow.note.content"]  # why it ended, then its step-4 samples
    assert note.startswith("stopped by ASHA at step 4\n\n**Samples at step 4**") and "samples%2Fstep-000004.png" in note
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


def test_parent_run_describes_the_sweep_and_its_winner(sweep, tmp_path):
    client = MlflowClient(sweep["uri"])
    experiment = client.get_experiment_by_name("smoke")
    [parent] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'smoke'")
    summary = json.loads((sweep["storage"] / "smoke" / "report" / "summary.json").read_text())
    best = summary["cat__a-sketch-of-v1"]["best"]
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**smoke**: 2 trial(s) over 1 (subject, prompt) pair(s); each pair's winner:")
    assert r"PALP personalization of tiny, searched over alpha 7.5 × alignment \[palp, none\]" in note
    assert "ASHA (reduction factor 2, from milestone 1) stopped 1 of 2 trial(s) early" in note
    assert "[palp-cat-a-sketch-of-v1 v1](#/models/palp-cat-a-sketch-of-v1/versions/1)" in note
    metrics, tags = parent.data.metrics, parent.data.tags
    for score in ("clip_t", "clip_i", "composite"):
        assert metrics[f"best.cat__a-sketch-of-v1.{score}"] == pytest.approx(best[score])
    assert metrics["trials"] == 2 and metrics["trials_stopped_early"] == 1 and metrics["trials_failed"] == 0
    assert tags["best.cat__a-sketch-of-v1.trial"] == best["trial_id"]
    assert tags["best.cat__a-sketch-of-v1.label"] == "palp α7.5" and tags["best.cat__a-sketch-of-v1.alpha"] == "7.5"
    assert tags["best.cat__a-sketch-of-v1.model"] == "models:/palp-cat-a-sketch-of-v1/1"
    # the report plots as MLflow images, and the trials x methods x scores table
    images = [a.path for a in client.list_artifacts(parent.info.run_id, "images")]
    for name in ("pareto", "curves"):
        assert any(p.startswith(f"images/report~cat__a-sketch-of-v1~{name}+step+0+") for p in images), images
    table = client.load_table(experiment.experiment_id, "trials.json", run_ids=[parent.info.run_id])
    assert sorted(table["method"]) == ["alignit", "cfg", "cfg", "pg-0.6"]
    assert sorted(zip(table["status"], table["step"])) == [("finished", 8)] * 3 + [("stopped early", 4)]
    winner = [r for _, r in table.iterrows() if r["registered"]]  # its trial id may read as a number ("1e041_00000")
    assert {r["run"] for r in winner} == {client.get_run(client.get_model_version(
        "palp-cat-a-sketch-of-v1", "1").run_id).info.run_name} and len(winner) == 3
    raw = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))).read_text())
    assert {row[raw["columns"].index("trial")] for row in raw["data"]} == set(t["trial_id"] for t in
                                                                            summary["cat__a-sketch-of-v1"]["trials"])
    # MLflow's standard source tags, on the parent and every child
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    sha = parent.data.params["git_sha"]
    for run in (parent, *children):
        assert run.data.tags["mlflow.source.name"] == f"palp-sweep {SMOKE}"
        assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]
        assert run.data.tags.get("mlflow.source.git.commit", "unknown") == sha
    view = json.loads(experiment.tags["mlflow.sharedViewState.palp-sweep"])
    assert view["orderByKey"] == "metrics.`composite`" and "metrics.`clip_t`" in view["selectedColumns"]


def test_sample_grids_are_images_with_steps_and_stopped_trials_agree_everywhere(sweep):
    client = MlflowClient(sweep["uri"])
    experiment = client.get_experiment_by_name("smoke")
    summary = json.loads((sweep["storage"] / "smoke" / "report" / "summary.json").read_text())
    rows = {r["trial_id"]: r for r in summary["cat__a-sketch-of-v1"]["trials"]}
    for run in client.search_runs([experiment.experiment_id], "tags.`palp.trial_id` LIKE '%'"):
        row = rows[run.data.tags["palp.trial_id"]]
        images = {a.path.split("+timestamp+")[0] for a in client.list_artifacts(run.info.run_id, "images")}
        want = {f"images/samples+step+{s}" for s in (4, 8) if s <= row["step"]}
        if row["step"] == 8:  # every sampling method's grid on the finished trial, at its last step
            want |= {"images/method~pg-0.6~samples+step+8", "images/method~alignit~samples+step+8"}
        assert images == want
        for path in want:  # big enough to see: 32 px samples in a 2-image grid, upscaled
            artifact = next(a for a in client.list_artifacts(run.info.run_id, "images") if a.path.startswith(path)
                            and a.path.endswith(".png"))
            local = client.download_artifacts(run.info.run_id, artifact.path)
            assert Image.open(local).width >= 512
        # the run page's latest scores, summary.json and the plotted history: the same step, the same numbers
        for score in ("clip_t", "clip_i", "composite"):
            history = client.get_metric_history(run.info.run_id, score)
            assert max(m.step for m in history) == row["step"]
            assert run.data.metrics[score] == pytest.approx(row[score])
        assert run.data.tags.get("palp.stopped_early_at", str(8)) == str(row["step"])


def test_registry_version_alias_and_pyfunc(sweep, tmp_path):
    client = MlflowClient(sweep["uri"])
    [model] = client.search_registered_models()
    assert model.name == "palp-cat-a-sketch-of-v1"
    version = client.get_model_version_by_alias(model.name, "champion")
    best_method = version.tags["best_method"]
    assert best_method in ("cfg", "pg-0.6", "alignit")
    # the scores first, then what a person compares versions by; every other knob is a param of the source run
    assert set(version.tags) == {"metric.clip_t", "metric.clip_i", "metric.composite", "best_method", "alignment",
                                 "alpha", "beta", "rank", "steps", "base_model", "recipe", "eval_hash"}
    assert client.get_run(version.run_id).data.params["align_every"] == "1"
    # markdown, escaped: "[V1] (cat)" stays literal; the scores, the best method's samples, the run
    assert r"A sketch of \[V1\]" in version.description and "[V1]" not in version.description
    assert r"\[V1\] (cat): subject cat, trained on “A photo of \[V1\]”" in version.description
    grid = "samples/step-000008" + ("" if best_method == "cfg" else f"-{best_method}") + ".png"
    assert f"get-artifact?path={grid.replace('/', '%2F')}&run_uuid={version.run_id}" in version.description
    assert {a.path for a in client.list_artifacts(version.run_id, "samples")} >= {grid}
    assert f"| **{best_method}** |" in version.description
    assert f"**@champion: [version {version.version}](#/models/{model.name}/versions/{version.version})**" in \
        model.description and "A sketch of \\[V1\\]" in model.description
    assert f"get-artifact?path={grid.replace('/', '%2F')}&run_uuid={version.run_id}" in model.description
    assert model.tags == {"subjects": "cat", "tokens": "[V1]", "target_prompt": "A sketch of [V1]",
                          "base_model": "tiny", "recipe": "smoke"}

    import mlflow
    mlflow.set_tracking_uri(sweep["uri"])
    info = mlflow.models.get_model_info(f"models:/{model.name}@champion")
    assert info.name == "palp-adapter" and info.saved_input_example_info["type"] == "json_object"
    meta = mlflow.models.Model.load(f"models:/{model.name}@champion")
    example = mlflow.artifacts.download_artifacts(f"models:/{model.name}@champion/input_example.json",
                                                  dst_path=str(tmp_path / "example"))
    assert json.loads(Path(example).read_text()) == ["A sketch of [V1]"]
    defaults = {p.name: p.default for p in meta.signature.params.params}
    config = meta.flavors["python_function"]["config"]["sampling"]
    assert defaults["method"] == config["method"] == best_method.split("-")[0]
    # the model's config is logged as params of its run too: namespaced, it leaves the training's params alone
    params = client.get_run(version.run_id).data.params
    assert params["sampling/method"] == config["method"] and params["steps"] == "8"
    loaded = mlflow.pyfunc.load_model(f"models:/{model.name}@champion")
    [png] = loaded.predict(["A sketch of [V1]"], params={"seed": 3, "steps": 4, "guidance_scale": 5.0, "method": "cfg"})
    got = np.asarray(Image.open(io.BytesIO(png)))

    # the trainer's own generation path on the same adapter and seed
    assert models_main(["--tracking-uri", sweep["uri"], "pull", f"{model.name}@champion", str(tmp_path / "pulled")]) == 0
    from palp_trainer.sampling.pipeline import generate, pipeline_from
    from palp_trainer.export.adapter import load_adapter
    base, manifest = load_adapter(tmp_path / "pulled")
    for file in (manifest["kohya_lora"], *manifest["a1111_embeddings"].values(),
                 *(r["file"] for r in manifest["subjects"][0]["images"])):  # registered with the model
        assert (tmp_path / "pulled" / file).is_file(), file
    [want] = generate(pipeline_from(base), "A sketch of [V1]", (3,), 4, 5.0, 1, manifest["resolution"])
    assert np.array_equal(got, np.asarray(want))
    # by default the version's best method, as the trainer's own sampler runs it
    from palp_trainer.config import method_of
    from palp_trainer.sampling.guidance import sample
    [png] = loaded.predict(["A sketch of [V1]"], params={"seed": 3, "steps": 4, "guidance_scale": 5.0})
    method, options = method_of(best_method)
    [want] = sample(pipeline_from(base), "A sketch of [V1]", method, seeds=(3,), steps=4, guidance_scale=5.0,
                    batch_size=1, resolution=manifest["resolution"], placeholders=manifest["placeholders"], **options)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(want))

    # the pulled files load into a stock pipeline
    from diffusers import StableDiffusionPipeline
    from palp_trainer.export.adapter import load_into_pipeline
    from palp_trainer.families.tiny import build_tiny
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
    # one trial, CFG alone: the parent run and the registered version are what this checks
    assert main([SMOKE, *sweep["overrides"], "search.alignment=palp", "eval.methods=[cfg]"]) == 0
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
