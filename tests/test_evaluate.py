"""Milestone sampling is comparable across trials: an image depends only on its seed and the weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from palp_trainer.config import EvalConfig
from palp_trainer.evaluation.milestone import evaluate_adapter
from palp_trainer.families.base import build
from palp_trainer.sampling.pipeline import generate, pipeline_from, save_grid
from tests.conftest import tiny_config


# LoRA entries this large move the tiny model's 32 px images by ~5.5 of 255 on average (0.05: by 0.4, under the
# bf16 test's 2.0 tolerance, so sampling with the LoRA off passed it)
LORA_SCALE = 0.2


def trained_like(config, seed):
    """A freshly built trainer whose LoRA and placeholder rows are set from `seed` (not its own init)."""
    base, embedding, lora = build(config, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora:
            p.copy_(LORA_SCALE * torch.randn(p.shape, generator=g))
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
    base = trained_like(config, 0)
    metrics = evaluate_adapter(config, base, 7, tmp_path / "samples")
    assert {"clip_t", "clip_i", "composite", "eval_seconds", "samples"} <= set(metrics)
    assert metrics["samples"].endswith("step-000007.png")
    assert 0 < metrics["eval_sample_seconds"] < metrics["eval_seconds"]
    with Image.open(tmp_path / "samples" / "step-000007.png") as img:
        grid = np.asarray(img.convert("RGB"))
    # the grid holds the live weights' samples: the LoRA and [V] rows on, the eval config's seeds and steps
    args = (config.target_prompt, (0, 1, 2), 2, 7.5, 2, 32)
    want = save_grid(generate(pipeline_from(base), *args), tmp_path / "want.png")
    base.denoiser.disable_adapters()
    lora_off = save_grid(generate(pipeline_from(base), *args), tmp_path / "lora_off.png")
    with Image.open(want) as a, Image.open(lora_off) as b:
        assert np.array_equal(grid, np.asarray(a.convert("RGB")))
        assert np.abs(grid.astype(float) - np.asarray(b.convert("RGB"))).mean() > 2.0


def test_sampling_uses_the_lora_and_the_placeholder_rows(subject_images, tmp_path):
    """The sampled images move with the LoRA and the [V] rows well beyond the precision tests' tolerances."""
    config = tiny_config(subject_images, tmp_path)
    base = trained_like(config, 0)
    args = (config.target_prompt, (0, 1), 4, 7.5, 2, 32)
    on = _pixels(generate(pipeline_from(base), *args))
    base.denoiser.disable_adapters()
    off = _pixels(generate(pipeline_from(base), *args))
    base.denoiser.enable_adapters()
    embedding = base.text_encoder.get_input_embeddings()
    with torch.no_grad():  # not a constant shift: CLIP's LayerNorms would remove it exactly
        embedding.rows.add_(torch.randn(embedding.rows.shape, generator=torch.Generator().manual_seed(1)))
    moved = _pixels(generate(pipeline_from(base), *args))
    assert np.abs(on - off).mean() > 2.0  # the bf16 test's tolerance, of 255
    assert np.abs(on - moved).mean() > 2.0


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float64) for i in images])


def test_half_precision_sampling_runs_natively_and_stays_as_close_to_fp32_as_autocast(subject_images, tmp_path):
    """bf16 sampling without autocast (LoRA masters cast once per batch) against the autocast way: both
    approximate the fp32 images; native's pixel error stays of autocast's size, and the masters come back."""
    config = tiny_config(subject_images, tmp_path, precision="bf16")
    base = trained_like(config, 0)
    pipe = pipeline_from(base)
    lora = [p for n, p in base.denoiser.named_parameters() if "lora_" in n]
    args = (config.target_prompt, (0, 1), 4, 7.5, 2, 32)
    seen = []  # the weight dtypes a LoRA layer and the placeholder table compute with
    lora_a = next(m for n, m in base.denoiser.named_modules() if n.endswith("lora_A.default"))
    hooks = [lora_a.register_forward_pre_hook(lambda m, a: seen.append(("lora", m.weight.dtype, a[0].dtype))),
             base.text_encoder.get_input_embeddings().register_forward_pre_hook(
                 lambda m, a: seen.append(("rows", m.rows.dtype)))]
    native = _pixels(generate(pipe, *args))
    for h in hooks:
        h.remove()
    assert set(seen) == {("lora", torch.bfloat16, torch.bfloat16), ("rows", torch.bfloat16)}
    assert all(p.dtype == torch.float32 and isinstance(p, torch.nn.Parameter) for p in lora)
    assert [p for n, p in base.denoiser.named_parameters() if "lora_" in n] == lora  # the same masters, registered
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _pixels(generate(pipe, *args))
    for module in (base.denoiser, base.text_encoder, base.vae):
        module.float()
    fp32 = _pixels(generate(pipe, *args))
    err_native, err_autocast = np.abs(native - fp32).mean(), np.abs(autocast - fp32).mean()
    assert err_native > 0 and err_native <= max(3 * err_autocast, 2.0), (err_native, err_autocast)  # of 255
    base.denoiser.disable_adapters()
    lora_off = _pixels(generate(pipe, *args))  # what a sampler that dropped the LoRA would give: far outside
    assert np.abs(lora_off - fp32).mean() > 2 * max(3 * err_autocast, 2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_denoiser_replays_the_eager_samples(subject_images, tmp_path):
    config = tiny_config(subject_images, tmp_path, precision="bf16")
    base, embedding, lora = build(config, torch.device("cuda"))
    pipe = pipeline_from(base)
    args = (config.target_prompt, (0, 1, 2), 6, 7.5, 2, 32)  # batches of 2 and 1: two graphs
    calls = []  # a submodule's hook fires in eager calls and the capture, not in replays
    handle = base.denoiser.conv_in.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    eager = _pixels(generate(pipe, *args))
    n_eager = list(calls)
    calls.clear()
    graphed = _pixels(generate(pipe, *args, cuda_graphs=True))
    handle.remove()
    assert n_eager == [4] * 6 + [2] * 6 and calls == [4] * 3 + [2] * 3  # 2 warm-ups + the capture per batch
    assert np.abs(graphed - eager).max() <= 1.0
    assert "forward" not in vars(base.denoiser)  # the class's forward is back
