"""Pretrain the world base: an SD-1.x-shaped model (AutoencoderKL, CLIPTextModel, UNet2DConditionModel,
ε-prediction on the SD-1 schedule) that knows the procedural world of `render.py`.

One command, fixed seeds, resumable (rerun it: each stage continues from its files in WORK):

    python -m palp_trainer.world.pretrain palp_trainer/world/assets/base --work runs/world-pretrain

Stages: render a pool of seen-attribute images -> train the VAE (on renders of every attribute: it is the
image codec) -> cache latents -> train the text encoder and UNet together (caption dropout for CFG, EMA weights) -> write a diffusers directory.
About 50 minutes on 2 CPU cores (47 measured); minutes on a GPU.
"""

import argparse
import math
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from transformers import CLIPTextConfig, CLIPTextModel

from ..families.tiny import SD1_SCHEDULER, build_tokenizer
from . import render as world

MAX_LENGTH = 20  # tokens; the longest world caption is 11 with BOS/EOS
SEED = 0


def build_components() -> dict:
    """The untrained world base, deterministic (seed 0). UNet 1.7M parameters: cross-attention at 8 and 4 px
    of the 16 px latent only (at 16 px it costs 6x the step)."""
    tokenizer = build_tokenizer(world.VOCABULARY, MAX_LENGTH)
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=world.RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=8, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=world.RESOLUTION, mid_block_add_attention=False,
    )
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def _render_chunk(args):
    torch.set_num_threads(1)
    attrs, seed = args
    return world.render_many(attrs, seed)


def render_pool(n: int, seed: int, pool: tuple, workers: int = 2) -> tuple[np.ndarray, list]:
    """`n` images drawn uniformly from `pool` (attribute combinations); [n, 32, 32, 3] uint8 and their attrs."""
    rng = np.random.default_rng(seed)
    attrs = [world.random_attrs(rng, pool) for _ in range(n)]
    chunks = [(attrs[i:i + 1000], seed * 1000 + i // 1000) for i in range(0, n, 1000)]
    with Pool(workers) as p:
        images = np.concatenate(p.map(_render_chunk, chunks))
    return images, attrs


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def vae_roundtrip(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> encoded (posterior mean) and decoded: what the base's samples can look like at best."""
    x = to_pixels(images)
    out = torch.cat([vae.decode(vae.encode(x[i:i + 256]).latent_dist.mean).sample for i in range(0, len(x), 256)])
    return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _lr(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, steps: int, batch: int = 32, seed: int = SEED) -> None:
    """L1 + MSE reconstruction with a small KL (SD's VAE is also KL-light): latents stay informative."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    started = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 2e-3, 100)
        x = pixels[torch.randint(len(pixels), (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"vae {step:5d}/{steps} loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s", flush=True)
    vae.eval()


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Posterior means, unscaled: [N, 4, 16, 16]."""
    return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


def train_denoiser(parts: dict, latents: torch.Tensor, attrs: list, steps: int, ckpt: Path,
                   batch: int = 32, lr: float = 1e-3, seed: int = SEED, checkpoint_every: int = 250) -> None:
    """Text encoder + UNet from scratch on (latent, caption) pairs; ε-prediction, min-SNR-5 weighting,
    10 % empty captions (CFG), each attribute left out of a caption with p = 0.2. EMA copies are written."""
    unet, text_encoder, tokenizer = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    scheduler = DDPMScheduler(**SD1_SCHEDULER)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        start = state["step"]
        print(f"denoiser: resuming at step {start}", flush=True)
    unet.train()
    text_encoder.train()
    started = time.perf_counter()
    for step in range(start, steps):
        rng = np.random.default_rng([seed, step])  # the batch is a function of the step: exact resume
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        idx = rng.integers(len(latents), size=batch)
        captions = ["" if rng.random() < 0.1 else world.caption(attrs[i], rng, drop=0.2) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        x_t = scheduler.add_noise(x0, noise, t)
        pred = unet(x_t, t, text_encoder(ids)[0]).sample
        snr = compute_snr(scheduler, t)
        weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for ε-prediction
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        done = step + 1
        if step % 50 == 0 or done == steps:
            print(f"denoiser {step:5d}/{steps} loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s",
                  flush=True)
        if done % checkpoint_every == 0 or done == steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                        "opt": opt.state_dict(), "ema": ema, "step": done}, tmp)
            tmp.replace(ckpt)  # atomic: a kill mid-write leaves the previous checkpoint
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()


def pretrain(out_dir: Path, work: Path, pool_size: int, vae_steps: int, steps: int) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    parts = build_components()
    pool_file = work / f"pool-{pool_size}.npz"
    if not pool_file.exists():
        t0 = time.perf_counter()
        images, attrs = render_pool(pool_size, SEED + 1, world.SEEN)
        np.savez(pool_file, images=images, attrs=np.array([[a.shape, a.colour, a.background, a.style] for a in attrs]))
        print(f"pool: {pool_size} images in {time.perf_counter() - t0:.0f}s", flush=True)
    data = np.load(pool_file)
    images, attrs = data["images"], [world.Attrs(*row) for row in data["attrs"]]
    pixels = to_pixels(images)
    vae_dir = work / "vae"
    if (vae_dir / "config.json").exists():
        parts["vae"] = AutoencoderKL.from_pretrained(vae_dir)
    else:
        # the VAE is the world's image codec, like SD's (trained on far more than any concept the UNet knows):
        # it sees every attribute, novel ones included, so it can draw what a personalized model asks for
        codec_images, _ = render_pool(pool_size, SEED + 2, pool=None)
        train_vae(parts["vae"], to_pixels(codec_images), vae_steps)
        parts["vae"].save_pretrained(vae_dir)
    vae = parts["vae"].eval().requires_grad_(False)
    latent_file = work / "latents.pt"
    if not latent_file.exists():
        torch.save(encode(vae, pixels), latent_file)
    latents = torch.load(latent_file, weights_only=True)
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    print(f"latents: {tuple(latents.shape)}, scaling_factor {scale:.4f}", flush=True)
    train_denoiser(parts, latents * scale, attrs, steps, work / "denoiser.pt")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=DDIMScheduler(**SD1_SCHEDULER, set_alpha_to_one=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the world base model (resumable: rerun to continue).")
    parser.add_argument("out_dir", type=Path, help="where the diffusers directory is written")
    parser.add_argument("--work", type=Path, default=Path("runs/world-pretrain"),
                        help="pool, VAE, latents and checkpoints; rerunning continues from here")
    parser.add_argument("--pool", type=int, default=16000, help="rendered training images")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=7000, help="text encoder + UNet steps at batch 32")
    args = parser.parse_args(argv)
    print(pretrain(args.out_dir, args.work, args.pool, args.vae_steps, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
