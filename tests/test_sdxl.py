"""SDXL through the trainer: a tiny SDXL folder trains (from_pretrained), its adapter loads into a stock
StableDiffusionXLPipeline and reproduces our samples, and the three inference methods run on it."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from palp_trainer.config import METHODS
from palp_trainer.export.adapter import load_adapter, load_into_pipeline, read_manifest
from palp_trainer.families.tiny_xl import save_tiny_xl
from palp_trainer.loops.solo import train_loop
from palp_trainer.sampling.guidance import alignit_prompts_for, sample
from palp_trainer.sampling.pipeline import pipeline_from
from tests.conftest import tiny_config

PROMPT = "A sketch of [V1] and [V2]"


def draw(pipe, prompt, seed=3):
    return pipe(prompt, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, two_subjects_module):
    root = tmp_path_factory.mktemp("sdxl")
    base_dir = save_tiny_xl(root / "base")
    config = tiny_config((), root / "run", subjects=two_subjects_module, base_model=str(base_dir), steps=3,
                         lr=3e-2, embedding_lr=3e-1, target_prompt=PROMPT, clean_prompt="A sketch of cat and mug")
    train_loop(config)
    return base_dir, root / "run" / "adapter"


@pytest.fixture(scope="module")
def two_subjects_module(tmp_path_factory):
    from palp_trainer.config import SubjectSpec
    from tests.conftest import write_images
    d = tmp_path_factory.mktemp("subjects")
    return (SubjectSpec("cat", "[V1]", "cat", write_images(d / "cat", 2, seed=0), "A photo of [V1]"),
            SubjectSpec("mug", "[V2]", "mug", write_images(d / "mug", 2, seed=1), "An oil painting of [V2]"))


def test_stock_sdxl_pipeline_reproduces_our_generation(trained):
    base_dir, adapter = trained
    manifest = read_manifest(adapter)
    assert manifest["family"] == "sdxl"
    tensors = load_file(adapter / manifest["embeddings"]["[V1]"])
    assert {k: list(v.shape) for k, v in tensors.items()} == {"clip_l": [1, 32], "clip_g": [1, 32]}

    ours_base, _ = load_adapter(adapter)  # the trainer's modules, the SDXL base through from_pretrained
    assert ours_base.family.name == "sdxl"
    ours = pipeline_from(ours_base)
    assert isinstance(ours, StableDiffusionXLPipeline)
    stock = StableDiffusionXLPipeline.from_pretrained(base_dir)
    stock.set_progress_bar_config(disable=True)
    ours.scheduler = type(stock.scheduler).from_config(stock.scheduler.config)  # the folder's own sampler
    plain = draw(stock, "A sketch of cat and mug")
    load_into_pipeline(stock, adapter)  # load_lora_weights, then load_textual_inversion per encoder
    got, want = draw(stock, PROMPT), draw(ours, PROMPT)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - plain).max() > 1e-3  # the adapter really changes the image


def test_alignit_context_is_the_pipelines_prompt_encoding(trained):
    """AlignIT's p′ states for SDXL: both encoders' penultimate states, as the stock pipeline encodes a prompt."""
    base, manifest = load_adapter(trained[1])
    pipe = pipeline_from(base)
    prompts = alignit_prompts_for(pipe, PROMPT, manifest["placeholders"])
    assert prompts.personal_ids.shape == (1, 2, 77)
    text = pipe.tokenizer.decode(prompts.personal_ids[0, 0], skip_special_tokens=True)
    with torch.no_grad():
        ours = base.family.context(base.encoders, prompts.personal_ids)
        want = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(ours, want)


def test_three_methods_sample_on_sdxl(trained):
    base, manifest = load_adapter(trained[1])
    pipe = pipeline_from(base)
    images = {m: np.stack([np.asarray(im, dtype=np.float32) for im in sample(
        pipe, PROMPT, m, seeds=(0, 1), steps=3, guidance_scale=5.0, batch_size=2, resolution=32,
        placeholders=manifest["placeholders"])]) for m in METHODS}
    for m, x in images.items():
        assert x.shape == (2, 32, 32, 3) and np.isfinite(x).all(), m
    for a in METHODS:
        for b in METHODS:
            if a < b:
                assert np.abs(images[a] - images[b]).max() > 0, f"{a} and {b} sample the same images"
