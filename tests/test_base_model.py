"""The base model is checked once on the driver, offline: folders, the Hugging Face cache, an unreachable hub."""

import json
import socket

import pytest
from huggingface_hub import constants

from orchestrator.base_model import check_base
from orchestrator.recipe import RecipeError
from palp_trainer.families.tiny import main as tiny_main


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a hub endpoint where nothing listens (no request leaves the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hf"


def cache_model(cache, repo: str, class_name: str) -> None:
    """The layout huggingface_hub writes: refs/main names the snapshot holding the files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("abc123")
    (root / "snapshots" / "abc123").mkdir(parents=True)
    (root / "snapshots" / "abc123" / "model_index.json").write_text(json.dumps({"_class_name": class_name}))


def test_built_in_bases_and_a_saved_pipeline_pass(tmp_path):
    assert tiny_main([str(tmp_path / "tiny")]) == 0
    for ref in ("tiny", "world", str(tmp_path / "tiny")):
        assert check_base(ref) == "Stable Diffusion 1.x/2.x"
    assert check_base("tiny_xl") == "Stable Diffusion XL"
    assert check_base("s3://bucket/models/tiny-0123") == "staged"  # checked as a folder when the sweep staged it


def test_a_folder_that_is_not_a_supported_pipeline_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(RecipeError, match=r"^base_model: .*weights is not a diffusers pipeline folder"):
        check_base(str(tmp_path / "weights"))
    with pytest.raises(RecipeError, match=r"^base_model: \./missing is not a diffusers pipeline folder"):
        check_base("./missing")
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(RecipeError, match=r"is a FluxPipeline; supported: Stable Diffusion 1.x/2.x "
                                          r"\(StableDiffusionPipeline\), Stable Diffusion XL \(StableDiffusionXLPipeline\)$"):
        check_base(str(tmp_path / "flux"))


def test_the_prediction_type_is_checked_at_validation(tmp_path):
    """v-prediction (SD-2.x 768) passes; a UNet that predicts x_0 is refused before any trial, naming the file."""
    assert tiny_main([str(tmp_path / "m")]) == 0
    scheduler = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    assert check_base(str(tmp_path / "m")) == "Stable Diffusion 1.x/2.x"
    scheduler.write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(RecipeError, match=r"^base_model: .*/m predicts 'sample' \(scheduler/scheduler_config.json\); "
                                          r"supported: epsilon, v_prediction$"):
        check_base(str(tmp_path / "m"))


def test_a_cached_hub_model_passes_offline(hub):
    cache_model(hub, "stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline")
    assert check_base("stable-diffusion-v1-5/stable-diffusion-v1-5") == "Stable Diffusion 1.x/2.x"
    cache_model(hub, "org/an-xl", "StableDiffusionXLPipeline")
    assert check_base("org/an-xl") == "Stable Diffusion XL"
    cache_model(hub, "org/a-flux", "FluxPipeline")
    with pytest.raises(RecipeError, match="org/a-flux is a FluxPipeline; supported"):
        check_base("org/a-flux")


def test_an_uncached_id_says_so_and_that_the_hub_is_unreachable(hub, monkeypatch):
    # the id the SD recipes named until 2026: deleted from the hub in 2024
    with pytest.raises(RecipeError, match=r"^base_model: runwayml/stable-diffusion-v1-5 is not in the Hugging Face "
                                          r"cache \(.*hf\), and the hub is unreachable \(.*Connection refused"):
        check_base("runwayml/stable-diffusion-v1-5")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecipeError, match=r"not in the Hugging Face cache .*, and HF_HUB_OFFLINE is set$"):
        check_base("runwayml/stable-diffusion-v1-5")


def test_the_headline_recipe_offline_is_one_line_and_exit_2_before_ray(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", str(root / "recipes/art_inspired.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"palp-sweep: error: base_model: stable-diffusion-v1-5/stable-diffusion-v1-5 is not in the Hugging Face "
        f"cache ({tmp_path / 'hf'}), and HF_HUB_OFFLINE is set"]
    assert "Ray" not in proc.stdout + proc.stderr  # refused before any cluster started
