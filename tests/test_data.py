"""Subject images: cropping, the latent cache, the draw, and one-line errors naming the file."""

import pytest
import torch
from PIL import Image

from palp_trainer.data import DataError, SubjectLatents, list_images, load_image
from palp_trainer.models import load_base
from tests.conftest import write_images


def test_resize_and_center_crop(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (96, 48), (255, 0, 0)).save(path)
    x = load_image(path, 32)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0], torch.ones(32, 32))


@pytest.mark.parametrize("case", ["missing", "empty_dir", "corrupt", "too_small"])
def test_bad_images_name_the_file(tmp_path, case):
    if case == "missing":
        path, match = tmp_path / "nope", "no such file or directory: .*nope"
        with pytest.raises(DataError, match=match):
            list_images(path)
        return
    if case == "empty_dir":
        (tmp_path / "empty").mkdir()
        with pytest.raises(DataError, match="no jpg/jpeg/png/webp images in .*empty"):
            list_images(tmp_path / "empty")
        return
    if case == "corrupt":
        path = tmp_path / "bad.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        with pytest.raises(DataError, match="unreadable image .*bad.png"):
            load_image(path, 32)
        return
    path = tmp_path / "small.png"
    Image.new("RGB", (16, 16)).save(path)
    with pytest.raises(DataError, match="small.png is 16x16, smaller than resolution 32"):
        load_image(path, 32)
    assert load_image(path, 32, allow_upscale=True).shape == (3, 32, 32)


def test_latent_cache_and_uniform_subject_draw(tmp_path):
    base = load_base("tiny")
    sets = [write_images(tmp_path / "a", 3, 0), write_images(tmp_path / "b", 1, 1)]
    data = SubjectLatents(base.vae, sets, 32, flip=True, allow_upscale=False, device=torch.device("cpu"),
                          dtype=torch.float32)
    assert data.latents.shape == (8, 4, 16, 16)  # 4 images and their mirrors
    assert data.subject.tolist() == [0, 0, 0, 1, 0, 0, 0, 1]
    idx = data.draw(torch.Generator().manual_seed(0), 4000, uniform_subjects=True)
    share_b = (data.subject[idx] == 1).float().mean().item()
    assert abs(share_b - 0.5) < 0.05  # uniform over subjects, though b has 1 image of 4
    idx = data.draw(torch.Generator().manual_seed(0), 4000, uniform_subjects=False)
    assert abs((data.subject[idx] == 1).float().mean().item() - 0.25) < 0.05  # union of images
