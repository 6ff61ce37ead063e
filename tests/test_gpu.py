"""Opt-in GPU checks (`pytest -m gpu`): the trainer on CUDA in bf16, and inside Ray Train with NCCL."""

import json

import pytest
import torch

from palp_trainer.config import EvalConfig
from palp_trainer.loops.solo import train_loop
from tests.conftest import tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_train_loop_on_cuda_bf16(subject_images, tmp_path):
    config = tiny_config(subject_images, tmp_path / "run", precision="bf16", steps=6, milestones=(3,),
                         eval=EvalConfig(clip_model="tiny", num_images=2, steps=3))
    metrics = train_loop(config)
    assert metrics["step"] == 6 and all(metrics[k] == metrics[k] for k in ("denoise_loss", "align_loss"))
    assert 0 < metrics["composite"] <= 1
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_ray_train_nccl_worker(subject_images, tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address="local", include_dashboard=False)
    try:
        config = tiny_config(subject_images, tmp_path / "ray", precision="bf16", steps=4, milestones=(2,))
        result = TorchTrainer(train_loop, train_loop_config=config.to_dict(),
                              torch_config=TorchConfig(backend="nccl"),
                              scaling_config=ScalingConfig(num_workers=1, use_gpu=True),
                              run_config=RunConfig(name="nccl", storage_path=str(tmp_path / "storage"))).fit()
    finally:
        ray.shutdown()
    assert result.error is None and result.metrics["step"] == 4
    history = [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert result.checkpoint is not None
