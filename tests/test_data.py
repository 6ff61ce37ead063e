"""Subject images: cropping, the latent cache, the draw, and one-line errors naming the file."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from palp_trainer.data import DataError, SubjectLatents, list_images, load_image, read_image
from palp_trainer.evaluation.milestone import reference_images
from palp_trainer.families.base import load_base
from tests.conftest import tiny_config, write_bad_image, write_images


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


@pytest.mark.filterwarnings("error")  # no DecompressionBombWarning gets out: it is the error
@pytest.mark.parametrize("kind, match", [
    ("truncated_jpeg", "unreadable image .*bad.jpg: image file is truncated"),
    ("truncated_png", "unreadable image .*bad.png: image file is truncated"),
    ("lying_png", "unreadable image .*bad.png"),
    ("bomb_png", "image .*bad.png is too large to decode: .*400000000 pixels"),
    ("big_png", "image .*bad.png is too large to decode: .*100000000 pixels"),  # PIL only warns here
])
def test_images_that_open_but_do_not_decode_name_the_file(tmp_path, kind, match):
    path = write_bad_image(tmp_path / "bad", kind)
    if kind not in ("bomb_png", "big_png"):
        with Image.open(path):  # the header reads: only decoding the pixels finds these
            pass
    with pytest.raises(DataError, match=match):
        load_image(path, 32)


def test_16_bit_grey_png_keeps_its_values(tmp_path):
    grey = (np.arange(40 * 48, dtype=np.uint32).reshape(48, 40) * 34).astype(np.uint16)  # 0 .. 65246
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"  # convert("RGB") would clip every value above 255: a white image
    rgb = np.asarray(read_image(path))
    assert rgb.shape == (48, 40, 3) and (rgb == rgb[..., :1]).all()
    assert np.abs(rgb[..., 0].astype(int) - np.round(grey / 257)).max() == 0
    assert rgb.min() == 0 and rgb.max() == 254
    x = load_image(path, 40)  # the trainer's path: the short side is 40, so no resampling
    assert torch.allclose(x[0], torch.from_numpy(np.round(grey / 257)[4:44] / 127.5 - 1).float(), atol=1e-6)
    # evaluation's reference images are read the same way
    [[ref]] = reference_images(tiny_config([path], tmp_path, resolution=40))
    assert np.array_equal(np.asarray(ref), rgb[4:44])


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.new("RGB", (48, 40), (200, 10, 10)).save(path, exif=exif)
    assert read_image(path).size == (40, 48)


def test_a_path_that_is_neither_file_nor_folder(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="pipe.png is neither a file nor a folder"):
        list_images(fifo)


def test_size_conditioning_per_photo_and_mirror(tmp_path):
    """SDXL's add_time_ids per latent: the photo's original (h, w), the crop's top-left (y, x) in the resized image,
    the target size; the mirror's crop starts as far from the right edge as the crop from the left."""
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    Image.fromarray(np.zeros((64, 102, 3), np.uint8)).save(wide)  # h 64, w 102 -> resized 51 x 32: left 9
    Image.fromarray(np.zeros((80, 40, 3), np.uint8)).save(tall)  # h 80, w 40 -> resized 32 x 64: top 16
    data = SubjectLatents(load_base("tiny").vae, [(str(wide), str(tall))], 32, True, False, "cpu", torch.float32)
    assert data.time_ids.tolist() == [[64, 102, 0, 9, 32, 32], [80, 40, 16, 0, 32, 32],
                                      [64, 102, 0, 10, 32, 32], [80, 40, 16, 0, 32, 32]]
