"""Subject images -> cached VAE latents, and the per-step draw of (image, subject) pairs."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class DataError(ValueError):
    """Bad subject data; the message names the file."""


def list_images(path: str | Path) -> list[Path]:
    """A folder's images (sorted), or the file itself."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file or directory: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in {path}")
    return files


def load_image(path: str | Path, resolution: int, allow_upscale: bool = False) -> torch.Tensor:
    """Resize the short side to `resolution`, center-crop; returns [3, H, W] in [-1, 1]."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"no such image: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"unreadable image {path}: {e}") from None
    w, h = im.size
    if min(w, h) < resolution and not allow_upscale:
        raise DataError(f"image {path} is {w}x{h}, smaller than resolution {resolution}; "
                        "set allow_upscale: true to upscale it")
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).contiguous()


class SubjectLatents:
    """Every subject image encoded once by the VAE (and its mirror when `flip`), kept on device.

    There are only a few images, so the VAE never runs during training.
    """

    def __init__(self, vae, image_sets: list[tuple[str, ...]], resolution: int, flip: bool,
                 allow_upscale: bool, device: torch.device, dtype: torch.dtype):
        pixels, subject = [], []
        for s, files in enumerate(image_sets):
            for f in files:
                pixels.append(load_image(f, resolution, allow_upscale))
                subject.append(s)
        x = torch.stack(pixels)  # [N, 3, H, W]
        if flip:
            x = torch.cat([x, x.flip(-1)])
            subject = subject + subject
        with torch.no_grad():
            vae_dtype = next(vae.parameters()).dtype
            latents = [vae.encode(chunk.to(device, vae_dtype)).latent_dist.mean
                       for chunk in x.split(8)]
        # [N(*2), 4, H/8, W/8], scaled to unit variance as the UNet expects
        self.latents = (torch.cat(latents) * vae.config.scaling_factor).to(dtype)
        self.subject = torch.tensor(subject, device=device)  # [N(*2)] subject index per latent
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
