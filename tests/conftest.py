"""Shared fixtures: small subject images made in code, and trainer configs on the tiny model."""

from pathlib import Path

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


def untrained_adapter(root) -> Path:
    """The tiny base's adapter of one subject (cat, [V1], 2 photos) exported as at step 2, untrained (lora_B = 0),
    in root/adapter."""
    from palp_trainer.export.adapter import export_adapter
    from palp_trainer.export.adapter import manifest
    from palp_trainer.families.base import build

    config = tiny_config(write_images(root / "cat", 2, seed=0), root / "run")
    torch.manual_seed(0)
    base, embedding, _ = build(config, torch.device("cpu"))
    return export_adapter(root / "adapter", base.denoiser, embedding, manifest(config, 2))


def trained_looking(config: TrainConfig):
    """The trainer's modules for `config` (models.build) with large random LoRA and placeholder rows: an adapter
    that changes the samples, in no time (gaussian init leaves lora_B = 0). Returns (base, embedding)."""
    from palp_trainer.families.base import build

    torch.manual_seed(0)
    base, embedding, lora = build(config, torch.device("cpu"))
    with torch.no_grad():
        for p in lora:
            p.normal_(std=0.3)
        embedding.rows.normal_(std=1.0)
    return base, embedding


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _png_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a PNG) with its IHDR claiming width x height, CRC fixed: the header lies, the file still opens."""
    import struct
    import zlib
    body = b"IHDR" + struct.pack(">II", width, height) + data[24:29]  # bit depth, colour type, ... unchanged
    return data[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


def write_bad_image(path, kind: str):
    """An image file that opens (its header reads) but cannot be used: built from a real 40x48 image.

    kind: "truncated_jpeg" / "truncated_png" (cut at 60%), "lying_png" (IHDR says 64x64, data is 40x48),
    "bomb_png" (IHDR says 20000x20000: over twice PIL's pixel limit), "big_png" (10000x10000: over the limit
    itself, where PIL only warns).
    """
    import io
    suffix = ".jpg" if kind.endswith("jpeg") else ".png"
    path = path.with_suffix(suffix)
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 40, 3)) * 255).astype("uint8")).save(buffer, "JPEG" if suffix == ".jpg" else "PNG")
    data = buffer.getvalue()
    if kind.startswith("truncated"):
        data = data[:int(len(data) * 0.6)]
    else:
        data = _png_with_size(data, *{"lying_png": (64, 64), "bomb_png": (20000, 20000), "big_png": (10000, 10000)}[kind])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
