"""Subject images -> cached VAE latents, and the per-step draw of (image, subject) pairs."""

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(path: str | Path) -> list[Path]:
    """A folder's images (sorted), or the file itself."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file or directory: {path}")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path} is neither a file nor a folder")
    try:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as e:
        raise DataError(f"cannot list {path}: {e.strerror or e}") from None
    if not files:
        raise DataError(f"no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in {path}")
    return files


def read_image(path: str | Path) -> Image.Image:
    """Decode every pixel of an image file into 8-bit RGB, upright as its EXIF orientation says.

    The one place subject and reference images are read: a file that opens but cannot be decoded
    (truncated, a header that lies), a decompression bomb or an unsupported mode is a DataError naming it.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # over Image.MAX_IMAGE_PIXELS PIL only warns, then allocates it all; over twice that it raises
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decodes the pixels: open() and verify() read headers only
                file_format, im = im.format, ImageOps.exif_transpose(im)  # a copy, without a format
    except FileNotFoundError:
        raise DataError(f"no such image: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path} is too large to decode: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # PIL's decoders raise all three
        raise DataError(f"unreadable image {path}: {e}") from None
    return _to_rgb(im, file_format, path)


def _to_rgb(im: Image.Image, file_format: str | None, path: Path) -> Image.Image:
    # convert("RGB") clips 16-bit grey at 255 (a solid white image); scale 0..65535 -> 0..255 instead
    if im.mode.startswith("I;16") or (im.mode == "I" and file_format == "PNG"):  # "I": 16-bit grey, older PIL
        grey = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("I", "F"):  # 32-bit int / float: no bit range to scale by
        raise DataError(f"image {path}: mode {im.mode} images are not supported; save it as 8-bit or 16-bit PNG")
    return im.convert("RGB")


def crop_image(path: str | Path, resolution: int, allow_upscale: bool = False) -> Image.Image:
    """Resize the short side to `resolution`, center-crop: what training and CLIP-I / DINO see of an image."""
    return _crop(path, resolution, allow_upscale)[0]


def _crop(path: str | Path, resolution: int, allow_upscale: bool) -> tuple[Image.Image, list[int], list[int]]:
    """`crop_image`, and its size conditioning as SDXL reads it, for the crop and for its mirror: original (h, w),
    crop top-left (y, x) in the resized image, target (h, w) (diffusers' SDXL training scripts)."""
    path = Path(path)
    im = read_image(path)
    w, h = original = im.size
    if min(w, h) < resolution and not allow_upscale:
        raise DataError(f"image {path} is {w}x{h}, smaller than resolution {resolution}; "
                        "set allow_upscale: true (train.allow_upscale in a recipe) to upscale it")
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    sizes = [original[1], original[0], top, left, resolution, resolution]
    mirror = [original[1], original[0], top, w - resolution - left, resolution, resolution]
    return im.crop((left, top, left + resolution, top + resolution)), sizes, mirror


def _pixels(im: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).contiguous()


def load_image(path: str | Path, resolution: int, allow_upscale: bool = False) -> torch.Tensor:
    """`crop_image` as [3, H, W] in [-1, 1]."""
    return _pixels(crop_image(path, resolution, allow_upscale))


class SubjectLatents:
    """Every subject image encoded once by the VAE (and its mirror when `flip`), kept on device.

    There are only a few images, so the VAE never runs during training.
    """

    def __init__(self, vae, image_sets: list[tuple[str, ...]], resolution: int, flip: bool,
                 allow_upscale: bool, device: torch.device, dtype: torch.dtype):
        pixels, subject, sizes, mirrors = [], [], [], []
        for s, files in enumerate(image_sets):
            for f in files:
                im, size, mirror = _crop(f, resolution, allow_upscale)
                pixels.append(_pixels(im))
                subject.append(s)
                sizes.append(size)
                mirrors.append(mirror)
        x = torch.stack(pixels)  # [N, 3, H, W]
        if flip:
            x = torch.cat([x, x.flip(-1)])
            subject = subject + subject
            sizes = sizes + mirrors
        vae_dtype = next(vae.parameters()).dtype
        # a VAE that overflows in fp16 (config.force_upcast: SDXL's) encodes in fp32, as its pipeline decodes
        upcast = vae_dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        with torch.no_grad():
            if upcast:
                vae.to(torch.float32)
            latents = [vae.encode(chunk.to(device, torch.float32 if upcast else vae_dtype)).latent_dist.mean
                       for chunk in x.split(8)]
            if upcast:
                vae.to(vae_dtype)
        # [N(*2), 4, H/8, W/8], scaled to unit variance as the UNet expects
        self.latents = (torch.cat(latents) * vae.config.scaling_factor).to(dtype)
        self.subject = torch.tensor(subject, device=device)  # [N(*2)] subject index per latent
        self.time_ids = torch.tensor(sizes, dtype=torch.float32, device=device)  # [N(*2), 6] (SDXL's add_time_ids)
        self.num_subjects = len(image_sets)

    def draw(self, generator: torch.Generator, n: int, uniform_subjects: bool) -> torch.Tensor:
        """Indices of n latents. `uniform_subjects`: subject first (uniform), then one of its images."""
        if not uniform_subjects:
            return torch.randint(len(self.latents), (n,), generator=generator)
        subjects = torch.randint(self.num_subjects, (n,), generator=generator)
        counts = torch.bincount(self.subject.cpu(), minlength=self.num_subjects)
        offsets = torch.cumsum(counts, 0) - counts
        order = torch.argsort(self.subject.cpu(), stable=True)  # latents grouped by subject
        pick = (torch.rand(n, generator=generator) * counts[subjects]).long()
        return order[offsets[subjects] + pick]
