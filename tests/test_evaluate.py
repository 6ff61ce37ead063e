"""Milestone sampling is comparable across trials: an image depends only on its seed and the weights."""

import numpy as np
import torch

from palp_trainer.config import EvalConfig
from palp_trainer.evaluate import evaluate_adapter, generate, pipeline_from
from palp_trainer.loop import build
from tests.conftest import tiny_config


def trained_like(config, seed):
    """A freshly built trainer whose LoRA and placeholder rows are set from `seed` (not its own init)."""
    base, embedding, lora = build(config, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        embedding.rows.add_(0.1 * torch.randn(embedding.rows.shape, generator=g))
    return base


def test_equal_weights_and_seeds_give_identical_images_across_trials(subject_images, tmp_path):
    config = tiny_config(subject_images, tmp_path)
    torch.manual_seed(123)  # a different global RNG state in each "trial" must not matter
    a = generate(pipeline_from(trained_like(config, 0)), config.target_prompt, (0, 1, 2), 3, 7.5, 3, 32)
    torch.manual_seed(999)
    b = generate(pipeline_from(trained_like(config, 0)), config.target_prompt, (0, 1, 2), 3, 7.5, 1, 32)
    c = generate(pipeline_from(trained_like(config, 1)), config.target_prompt, (0, 1, 2), 3, 7.5, 3, 32)
    for x, y in zip(a, b):  # same weights, same seeds, different batch split: the same pixels
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # seeds matter
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))  # and weights matter


def test_evaluate_adapter_reports_scores_grid_and_cost(subject_images, tmp_path):
    config = tiny_config(subject_images, tmp_path, eval=EvalConfig(clip_model="tiny", num_images=3, steps=2,
                                                                     batch_size=2))
    metrics = evaluate_adapter(config, trained_like(config, 0), 7, tmp_path / "samples")
    assert {"clip_t", "clip_i", "composite", "eval_seconds", "samples"} <= set(metrics)
    assert metrics["samples"].endswith("step-000007.png") and metrics["eval_seconds"] > 0
    assert (tmp_path / "samples" / "step-000007.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
