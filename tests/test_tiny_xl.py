"""The tiny SDXL base: a stock StableDiffusionXLPipeline saves, loads and samples it."""

import json

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline

from orchestrator.base_model import check_base
from palp_trainer.config import base_defaults
from palp_trainer.families.tiny_xl import main as tiny_xl_main


def test_tiny_sdxl_round_trips_through_the_stock_pipeline(tmp_path):
    assert tiny_xl_main([str(tmp_path / "xl")]) == 0
    assert json.loads((tmp_path / "xl" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("A photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0
    assert check_base(str(tmp_path / "xl")) == "Stable Diffusion XL"
    assert base_defaults(str(tmp_path / "xl")).resolution == 1024  # SDXL's size when a recipe leaves it out
