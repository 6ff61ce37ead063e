"""Sampling: a stock diffusers pipeline around the in-memory modules, seeded images, their grid.

Used by milestone evaluation (evaluate.py), the inference methods (guidance.py), `palp-sweep generate`, the
MLflow pyfunc model and the benchmarks; it imports none of them.
"""

import contextlib
import math
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.utils import make_image_grid
from PIL import Image
from torch import nn

from ..families.base import Base, masters_as

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


def pipeline_from(base: Base, sampler: str = "ddim") -> StableDiffusionPipeline:
    """A stock pipeline around the in-memory (LoRA-wrapped, placeholder-aware) modules; no reload."""
    pipe = base.family.pipeline(base, SAMPLERS[sampler].from_config(base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: StableDiffusionPipeline, prompt: str, seeds: tuple[int, ...], steps: int,
             guidance_scale: float, batch_size: int, resolution: int, cuda_graphs: bool = False,
             **call_kwargs) -> list[Image.Image]:
    """One image per seed, in batches. Each image has its own CPU generator, so an image depends
    only on its seed and the weights: identical across trials, devices' batch splits and reruns.

    Half-precision weights compute as stored, without autocast, as diffusers' own fp16/bf16 inference
    does; the trainer's fp32 masters (LoRA, placeholder rows) are cast to that dtype once per call
    (`masters_as`), so no layer casts activations to fp32 and back. `cuda_graphs`: the denoiser replays
    a CUDA graph (`graphed_unet`)."""
    images = []
    dtype = pipe.unet.dtype
    if cuda_graphs and pipe.device.type != "cuda":
        raise ValueError(f"eval.cuda_graphs: needs a CUDA device, the pipeline is on {pipe.device}")
    # no grad: the casts need no backward here; one cast and one capture per shape for all chunks
    with torch.no_grad(), \
            (masters_as(dtype, pipe.unet, pipe.text_encoder) if dtype != torch.float32 else contextlib.nullcontext()), \
            (graphed_unet(pipe.unet) if cuda_graphs else contextlib.nullcontext()):
        for i in range(0, len(seeds), batch_size):
            chunk = seeds[i:i + batch_size]
            out = pipe(prompt=[prompt] * len(chunk), num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=[torch.Generator("cpu").manual_seed(s) for s in chunk],
                       height=resolution, width=resolution, **call_kwargs)
            images += out.images
    return images


@contextlib.contextmanager
def graphed_unet(unet: nn.Module, warmup: int = 2):
    """Inside, `unet(sample, t, encoder_hidden_states)` calls run eagerly `warmup` times per input shape (on a
    side stream, as capture requires), then the next call is captured as a CUDA graph and every later one
    replays it: a sampler's fixed-shape steps cost one graph launch each instead of thousands of kernels.

    The inputs are copied into the graph's static buffers and the output is copied out, so callers see plain
    tensors. A graph reads the weights in place: they must not be replaced inside (they are not: the
    caller's `masters_as` is entered outside). Calls with other arguments (attention kwargs, extra
    conditions) run eagerly."""
    eager = unet.forward
    graphs: dict[tuple, dict] = {}

    def forward(sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        if args or any(v is not None for v in kwargs.values()) or not torch.is_tensor(timestep) \
                or not timestep.is_cuda:
            return eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        inputs = (sample, timestep, encoder_hidden_states)
        entry = graphs.setdefault(tuple((x.shape, x.dtype) for x in inputs), {"calls": 0})
        if "graph" not in entry and entry["calls"] < warmup:
            entry["calls"] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = eager(*inputs, return_dict=False)[0]
            torch.cuda.current_stream().wait_stream(side)
        else:
            if "graph" not in entry:
                entry["inputs"] = [x.clone() for x in inputs]
                entry["graph"] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(entry["graph"]):
                    entry["out"] = eager(*entry["inputs"], return_dict=False)[0]
            for static, x in zip(entry["inputs"], inputs):
                static.copy_(x)
            entry["graph"].replay()
            out = entry["out"].clone()
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    unet.forward = forward  # the instance attribute shadows the class's forward; nn.Module.__call__ calls it
    try:
        yield
    finally:
        del unet.forward


def save_grid(images: list[Image.Image], path: Path) -> Path:
    """rows x cols = len(images), the factors nearest a square, wide (8: 2 x 4, 6: 2 x 3), unless that is over twice
    as wide as the square grid (7: 1 x 7), which then holds black cells (7: 3 x 3)."""
    n, square = len(images), math.ceil(math.sqrt(len(images)))
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    cols = n // rows
    if cols > 2 * square:
        cols, rows = square, math.ceil(n / square)
    blank = Image.new("RGB", images[0].size)
    make_image_grid(images + [blank] * (rows * cols - len(images)), rows, cols).save(path)
    return path
