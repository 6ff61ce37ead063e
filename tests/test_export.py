"""The exported adapter loads into a stock StableDiffusionPipeline and reproduces our own samples; it carries
its reference images and names no path outside its folder."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from palp_trainer.evaluation.milestone import reference_images
from palp_trainer.export.adapter import AdapterError, export_adapter, load_adapter, load_into_pipeline, read_manifest
from palp_trainer.export.adapter import manifest
from palp_trainer.families.base import build
from palp_trainer.families.tiny import save_tiny
from palp_trainer.loops.solo import train_loop
from palp_trainer.sampling.pipeline import pipeline_from
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


# --- portable adapters: the folder carries the reference images its CLIP-I / DINO need, never a path ---------

def exported_adapter(root, images):
    config = tiny_config(images, root / "run")
    torch.manual_seed(0)
    base, embedding, _ = build(config, torch.device("cpu"))
    return config, export_adapter(root / "adapter", base.denoiser, embedding, manifest(config, 2))


def strings(value):
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_adapter_carries_its_references_and_names_no_path(subject_images, tmp_path):
    config, adapter = exported_adapter(tmp_path, subject_images)
    text = (adapter / "manifest.json").read_text()
    m = read_manifest(adapter)
    assert str(tmp_path) not in text and not any(s.startswith("/") for s in strings(m))
    assert m["triggers"] == {"[V1]": "palp_cat_v1"}
    [subject] = m["subjects"]
    assert [r["file"] for r in subject["images"]] == [f"references/palp_cat_v1/{n}.png" for n in range(3)]
    assert [r["source_sha256"] for r in subject["images"]] == [
        hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in subject_images]
    # what the sweep's CLIP-I scored against, pixel for pixel (PNG is lossless)
    for ref, want in zip(subject["images"], reference_images(config)[0]):
        got = Image.open(adapter / ref["file"])
        assert got.size == (32, 32) and np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


@pytest.mark.parametrize("file", ["/home/me/cat/0.png", "../cat/0.png", "references/../../0.png", "C:/cat/0.png",
                                  "references\\0.png", "references//0.png", ""])
def test_manifest_refuses_reference_paths_outside_the_folder(subject_images, tmp_path, file):
    _, adapter = exported_adapter(tmp_path, subject_images)
    m = json.loads((adapter / "manifest.json").read_text())
    m["subjects"][0]["images"][0]["file"] = file
    (adapter / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AdapterError, match=re.escape(f"subjects[0].images[0].file: {file!r} is not a path inside "
                                                     "the adapter folder")):
        read_manifest(adapter)


@pytest.mark.parametrize("key, value, expected", [
    ("subjects", [{"token": "[V1]", "class_word": "cat", "images": ["/home/me/cat/0.png"]}],  # the old layout
     "subjects: expected a list of {token, class_word, images: [{file, source_sha256}]}"),
    ("kohya_lora", "/tmp/palp_cat.safetensors", "kohya_lora: expected a path inside the adapter folder"),
    ("a1111_embeddings", {"[V1]": "../palp_cat_v1.safetensors"},
     "a1111_embeddings: expected a mapping of each token to a path inside the adapter folder"),
    ("triggers", {"[V1]": "[V1]"}, "triggers: expected a mapping of each token to a lowercase trigger word"),
])
def test_manifest_names_the_bad_key(subject_images, tmp_path, key, value, expected):
    _, adapter = exported_adapter(tmp_path, subject_images)
    m = json.loads((adapter / "manifest.json").read_text())
    (adapter / "manifest.json").write_text(json.dumps({**m, key: value}))
    with pytest.raises(AdapterError, match=re.escape(f"{adapter / 'manifest.json'}: {expected}")):
        read_manifest(adapter)
