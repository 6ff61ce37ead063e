"""Milestone evaluation: sample the target prompt on fixed seeds from the live weights, then score (Sec. 5)."""

import functools
import time
from pathlib import Path

from PIL import Image

from ..config import EvalConfig, TrainConfig, method_of
from ..data import crop_image
from ..families.base import Base
from ..sampling.guidance import sample
from ..sampling.pipeline import generate, pipeline_from, save_grid
from .scorers import scorer_kind

NOT_SCORES = ("eval_seconds", "eval_sample_seconds", "samples")  # evaluate_adapter's cost and grid path


def scorer_for(ev: EvalConfig, device: str):
    """The eval's scorer model (scorers.py: CLIP (+ DINO) or the world's oracle judge)."""
    return _load_scorer(ev.scorer, ev.clip_model, ev.dino_model, device)


@functools.lru_cache(maxsize=2)
def _load_scorer(scorer: str | None, clip_model: str, dino_model: str | None, device: str):
    """Loaded once per process (keyed on the checkpoints, not the whole eval config) and reused at every milestone."""
    return scorer_kind(scorer).load(clip_model, dino_model, device)


def score_images(ev: EvalConfig, scorer, config: TrainConfig, images: list[Image.Image],
                 references: list[list[Image.Image]]) -> dict:
    return scorer_kind(ev.scorer).score(scorer, ev, config, images, references)


def reference_images(config: TrainConfig) -> list[list[Image.Image]]:
    """Each subject's inputs at training resolution, for CLIP-I / DINO against its own references
    (the images an exported adapter carries in its references/ folder)."""
    return [[crop_image(f, config.resolution, config.allow_upscale) for f in s.images] for s in config.subjects]


def evaluate_adapter(config: TrainConfig, base: Base, step: int, out_dir: Path,
                     eval_config: EvalConfig | None = None) -> dict:
    """Sample the target prompt with the current weights and score it; returns flat metrics."""
    ev = eval_config or config.eval
    started = time.perf_counter()
    pipe = pipeline_from(base, ev.sampler)
    images = generate(pipe, config.target_prompt, ev.image_seeds, ev.steps, ev.guidance_scale,
                      ev.batch_size, config.resolution, cuda_graphs=ev.cuda_graphs)
    sampled = time.perf_counter() - started  # the images are on the host: the device work is done
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = save_grid(images, out_dir / f"step-{step:06d}.png")
    scores = score_images(ev, scorer_for(ev, str(pipe.device)), config, images, reference_images(config))
    return {**scores, "eval_seconds": time.perf_counter() - started, "eval_sample_seconds": sampled,
            "samples": str(grid)}


def evaluate_methods(config: TrainConfig, base: Base, step: int, out_dir: Path, cfg_scores: dict) -> dict:
    """Score the finished trial under every configured sampling method on the same seeds (AlignIT,
    personalization guidance vs CFG); returns `method/<label>/<score>`, each method's grid as
    `method/<label>/samples` (CFG's is `cfg_scores`' "samples") and the winning `best_method`.

    `cfg_scores` is this step's `evaluate_adapter` result: plain CFG on the same seeds, not sampled twice."""
    ev = config.eval
    pipe = pipeline_from(base, ev.sampler)
    scorer = scorer_for(ev, str(pipe.device))
    references = reference_images(config)
    placeholders = {s.token: s.class_word for s in config.subjects}
    out, composites = {}, {}
    for label in ev.methods:
        method, kwargs = method_of(label)
        if method == "cfg":
            scores = {k: v for k, v in cfg_scores.items() if k not in NOT_SCORES}
            out.update({f"method/{label}/{k}": v for k, v in scores.items()})
            composites[label] = scores["composite"]
            continue
        images = sample(pipe, config.target_prompt, method, seeds=ev.image_seeds, steps=ev.steps,
                        guidance_scale=ev.guidance_scale, batch_size=ev.batch_size, resolution=config.resolution,
                        placeholders=placeholders, **kwargs)
        grid = save_grid(images, out_dir / f"step-{step:06d}-{label}.png")
        scores = score_images(ev, scorer, config, images, references)
        out.update({f"method/{label}/{k}": v for k, v in scores.items()}, **{f"method/{label}/samples": str(grid)})
        composites[label] = scores["composite"]
    out["best_method"] = max(composites, key=composites.get)
    return out
