"""recipes/sdxl_smoke.yaml with base_model set to a tiny SDXL folder, through the whole sweep on local Ray:
training (from_pretrained on the worker), evaluation, the registry, then `generate` with all three methods."""

import json
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from orchestrator.cli import main
from orchestrator.generate import main as generate_main
from palp_trainer.tiny_xl import save_tiny_xl

pytestmark = pytest.mark.integration
RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "sdxl_smoke.yaml")


def test_an_sdxl_folder_sweeps_registers_and_generates(tmp_path, capsys):
    base = save_tiny_xl(tmp_path / "tiny-sdxl")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main([RECIPE, f"base_model={base}", "resolution=32", f"storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={uri}",
                 "search.alignment=palp", "search.steps=[4]", "eval.methods=[cfg]"])
    ray.shutdown()
    assert code == 0
    (pair,) = json.loads((tmp_path / "runs" / "sdxl-smoke" / "report" / "summary.json").read_text()).values()
    (trial,) = pair["trials"]
    assert trial["error"] is None and trial["step"] == 4 and pair["best"] is not None
    adapter = tmp_path / "runs" / "sdxl-smoke" / "trials" / trial["pair"] / trial["trial_id"] / "adapter"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["base_model"] == str(base)

    client = MlflowClient(uri)
    [model] = client.search_registered_models()
    [version] = client.search_model_versions(f"name='{model.name}'")
    assert client.get_run(version.run_id).data.metrics["clip_t"] == pytest.approx(trial["clip_t"])

    out = tmp_path / "generated"
    capsys.readouterr()
    code = generate_main([f"models:/{model.name}@champion", "--tracking-uri", uri, "--prompt", "A sketch of [V1]",
                          "--seeds", "0,1", "--steps", "2", "--method", "cfg,pg,alignit", "--out", str(out),
                          "--clip-model", "tiny"])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {f"{m}-seed{s}.png" for m in ("cfg", "pg-0.6", "alignit")
                                               for s in (0, 1)} | {"grid.png"}
