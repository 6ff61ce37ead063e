"""The world's oracle judge: a small CNN that reads shape, colour, background and style off a 32 px image.

It is trained on rendered ground truth only (every attribute, the novel ones included), with generic
degradations (blur, noise, down-up sampling, tone jitter); it never sees the diffusion model or its VAE.
Its validation (per attribute, on clean renders, on renders passed through the base's VAE and back, and on
degraded ones) is in benchmarks/QUALITY.md. Train it (about 10 minutes on 2 cores):

    python -m palp_trainer.world.judge palp_trainer/world/assets/judge.safetensors

Scores of a set of samples for a target prompt (`score`), all in [0, 1]:
- judge_text: the mean probability of each attribute the prompt names (style, colour, background; a
  placeholder whose class word is a style or a scene names its subject's style or scene);
- judge_subject: the subject's defining features: its shape (identity), and its colour unless the prompt
  names one (a colour in the prompt legitimately recolours it); style and scene subjects: their style/scene;
- judge_success: the fraction of samples with every named attribute and every subject's shape right (argmax).
"""

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from . import render as world

HEADS = {"shape": world.ALL_SHAPES, "colour": tuple(world.COLOURS), "background": world.ALL_BACKGROUNDS,
         "style": world.ALL_STYLES}
DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "judge.safetensors"
_PHRASE_BG = {phrase.split()[-1]: bg for bg, phrase in world.BG_PHRASE.items()}  # "sky" -> "sky"


class JudgeNet(nn.Module):
    """[B, 3, 32, 32] in [0, 1] -> logits per head. ~0.3M parameters."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                                      *block(64, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(96, len(classes)) for name, classes in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random generic degradations of [B, 3, H, W] in [0, 1]: blur, down-up sampling, noise, tone."""
    b = len(x)
    u = torch.rand(b, 5, generator=g)
    blurred = _blur(x, 0.3 + 0.9 * u[:, 0])
    x = torch.where((u[:, 1] < 0.5)[:, None, None, None], blurred, x)
    small = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), size=x.shape[-2:],
                          mode="bilinear")
    x = torch.where((u[:, 2] < 0.3)[:, None, None, None], small, x)
    x = x * (0.92 + 0.16 * u[:, 3])[:, None, None, None] + (u[:, 4] - 0.5)[:, None, None, None] * 0.08
    noise = torch.randn(x.shape, generator=g) * 0.08 * torch.rand(b, 1, 1, 1, generator=g)
    return (x + noise).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur, 5-tap separable; sigma [B] in px."""
    taps = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, 5]
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    kk = k.repeat_interleave(c, 0)
    y = F.conv2d(y, kk[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kk[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def labels(attrs: list[world.Attrs]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([classes.index(getattr(a, name)) for a in attrs]) for name, classes in HEADS.items()}


def train(out: Path, n: int = 24000, steps: int = 2000, batch: int = 64, seed: int = 7) -> JudgeNet:
    """Fit on `n` renders drawn uniformly over every attribute (novel ones too), degraded at random."""
    from .pretrain import render_pool
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    images, attrs = render_pool(n, seed, pool=None)
    x_all, y_all = _as_tensor(images), labels(attrs)
    print(f"judge: {n} renders in {time.perf_counter() - t0:.0f}s", flush=True)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(n, (batch,), generator=g)
        logits = net(degrade(x_all[idx], g))
        loss = sum(F.cross_entropy(logits[k], y_all[k][idx]) for k in HEADS)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"judge {step:5d}/{steps} loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    net.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out), metadata={"heads": json.dumps(HEADS)})
    return net


def load(path: str | Path = DEFAULT_WEIGHTS) -> JudgeNet:
    net = JudgeNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def _as_tensor(images) -> torch.Tensor:
    """PIL images or uint8 [N, H, W, 3] -> [N, 3, 32, 32] in [0, 1]."""
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB").resize((world.RESOLUTION,) * 2, Image.BILINEAR))
                        for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


class WorldJudge:
    """Scores samples of the world by attribute; `clip_t`/`clip_i`'s counterpart for the world base."""

    def __init__(self, weights: str | Path = DEFAULT_WEIGHTS):
        self.net = load(weights)

    @torch.inference_mode()
    def probs(self, images) -> dict[str, torch.Tensor]:
        """Per head, [N, K] class probabilities."""
        return {k: v.softmax(-1) for k, v in self.net(_as_tensor(images)).items()}

    def read(self, images) -> list[world.Attrs]:
        """The judge's reading of each image (argmax per head)."""
        p = self.probs(images)
        idx = {k: v.argmax(-1).tolist() for k, v in p.items()}
        return [world.Attrs(*(HEADS[k][idx[k][i]] for k in ("shape", "colour", "background", "style")))
                for i in range(len(next(iter(idx.values()))))]

    def subject_of(self, references) -> world.Attrs:
        """A subject's features: the majority reading of its reference images."""
        readings = self.read(references)
        return world.Attrs(*(max(set(v), key=v.count) for v in zip(*(
            (r.shape, r.colour, r.background, r.style) for r in readings))))

    def score(self, images, prompt: str, subjects: list[tuple[str, str]], references: list[list],
              weight_text: float = 1.0, weight_image: float = 1.0) -> dict:
        """`prompt` may hold placeholders; `subjects[k]` = (token, class word) with reference images `references[k]`."""
        from ..evaluation.clip import composite
        if len(images) == 0:
            raise ValueError("score: no images to score")
        p = self.probs(images)
        named, identity = parse_prompt(prompt, subjects, [self.subject_of(r) for r in references])
        out, right = {}, torch.ones(len(images), dtype=torch.bool)
        for slot, value in named.items():
            k = HEADS[slot].index(value)
            out[f"judge_text/{slot}"] = p[slot][:, k].mean().item()
            right &= p[slot].argmax(-1) == k
        subject_terms = []
        for slot, value in identity:
            k = HEADS[slot].index(value)
            out[f"judge_subject/{slot}"] = p[slot][:, k].mean().item()
            subject_terms.append(out[f"judge_subject/{slot}"])
            if slot == "shape":
                right &= p[slot].argmax(-1) == k
        text = [v for key, v in out.items() if key.startswith("judge_text/")]
        out["judge_text"] = sum(text) / len(text) if text else float("nan")
        out["judge_subject"] = sum(subject_terms) / len(subject_terms) if subject_terms else float("nan")
        out["judge_success"] = right.float().mean().item()
        out["composite"] = composite(out["judge_text"], out["judge_subject"], weight_text, weight_image)
        return out


def parse_prompt(prompt: str, subjects: list[tuple[str, str]], features: list[world.Attrs]):
    """-> ({slot: value} the prompt names, [(slot, value)] the subjects' defining features).

    "a sketch of a [V1] on grass" with [V1] a yellow moon -> ({style: sketch, background: grass},
    [(shape, moon), (colour, yellow)]); a style subject ("a [V2] of a [V1]", [V2]'s class word "painting")
    names its style; a scene subject names its background."""
    from ..evaluation.clip import placeholder_pattern  # one rule for finding placeholders (longest first, word edges)
    named: dict[str, str] = {}
    tokens = {token: (cls, f) for (token, cls), f in zip(subjects, features)}
    pattern = f"{placeholder_pattern(tokens).pattern}|" if tokens else ""
    words = re.findall(rf"{pattern}[A-Za-z]+", prompt)
    identity, seen = [], []
    for word in words:
        if word in tokens:
            cls, f = tokens[word]
            if cls in world.STYLES:
                named["style"] = f.style
                identity.append(("style", f.style))
            elif cls in world.BACKGROUNDS:
                named["background"] = f.background
                identity.append(("background", f.background))
            else:
                seen.append(f)
            continue
        word = word.lower()
        if word in world.COLOURS:
            named["colour"] = word
        elif word in world.ALL_STYLES:
            named["style"] = word
        elif word in _PHRASE_BG:
            named["background"] = _PHRASE_BG[word]
        elif word in world.ALL_SHAPES:
            named["shape"] = word
    for f in seen:  # object subjects: identity, and their own colour unless the prompt recolours them
        identity.append(("shape", f.shape))
        if "colour" not in named:
            identity.append(("colour", f.colour))
    return named, identity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the world's oracle judge on rendered ground truth.")
    parser.add_argument("out", type=Path, nargs="?", default=DEFAULT_WEIGHTS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--renders", type=int, default=24000)
    args = parser.parse_args(argv)
    train(args.out, args.renders, args.steps)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
