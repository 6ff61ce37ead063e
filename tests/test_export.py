"""The exported adapter loads into a stock StableDiffusionPipeline and reproduces our own samples."""

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from palp_trainer.evaluate import pipeline_from
from palp_trainer.export import load_adapter, load_into_pipeline
from palp_trainer.loop import train_loop
from palp_trainer.tiny import save_tiny
from tests.conftest import tiny_config

PROMPT = "A sketch of [V1] and [V2]"


def sample(pipe, prompt, seed=3):
    return pipe(prompt, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def test_stock_pipeline_reproduces_our_generation(two_subjects, tmp_path):
    base_dir = save_tiny(tmp_path / "base")
    config = tiny_config((), tmp_path / "run", subjects=two_subjects, base_model=str(base_dir), steps=3,
                         lr=3e-2, embedding_lr=3e-1, target_prompt=PROMPT, clean_prompt="A sketch of cat and mug")
    train_loop(config)
    adapter = tmp_path / "run" / "adapter"

    # our path: the trainer's own modules (PlaceholderEmbedding, peft LoRA) with the exported weights
    ours_base, _ = load_adapter(adapter)
    ours = pipeline_from(ours_base)
    ours.scheduler = ours.scheduler.__class__.from_pretrained(base_dir, subfolder="scheduler")

    stock = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    plain = sample(stock, "A sketch of cat and mug")
    manifest = load_into_pipeline(stock, adapter)
    assert manifest["placeholders"] == {"[V1]": "cat", "[V2]": "mug"}

    got, want = sample(stock, PROMPT), sample(ours, PROMPT)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - plain).max() > 1e-3  # the adapter really changes the image
