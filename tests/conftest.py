"""Shared fixtures: small subject images made in code, and trainer configs on the tiny model."""

import numpy as np
import pytest
import torch
from PIL import Image

from palp_trainer.config import SubjectSpec, TrainConfig


def write_images(directory, n, seed, size=(40, 48)):
    """n smooth random RGB images (>= the tiny resolution of 32)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.random((4, 4, 3))
        img = Image.fromarray((coarse * 255).astype("uint8")).resize(size, Image.BILINEAR)
        paths.append(str(directory / f"{i}.png"))
        img.save(paths[-1])
    return tuple(paths)


@pytest.fixture
def subject_images(tmp_path):
    return write_images(tmp_path / "cat", 3, seed=0)


@pytest.fixture
def two_subjects(tmp_path):
    return (SubjectSpec("cat", "[V1]", "cat", write_images(tmp_path / "cat", 2, seed=0), "A photo of [V1]"),
            SubjectSpec("mug", "[V2]", "mug", write_images(tmp_path / "mug", 2, seed=1), "An oil painting of [V2]"))


def tiny_config(images, output_dir, **overrides) -> TrainConfig:
    fields = dict(
        subjects=(SubjectSpec("cat", "[V1]", "cat", tuple(images), "A photo of [V1]"),),
        target_prompt="A sketch of [V1]", clean_prompt="A sketch of cat", output_dir=str(output_dir),
        resolution=32, batch_size=2, rank=4, steps=2, progress=False,
    )
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
