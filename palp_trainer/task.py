"""PalpTask: the model calls and loss terms of one PALP training step (Sec. 4)."""

import contextlib

import torch
from torch import nn

from . import losses
from .config import TrainConfig
from .models import Base

# NFSD's negative prompt (Katzir et al. 2023, Sec. 4)
NFSD_NEGATIVE = "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"


class PalpModel(nn.Module):
    """The only path with grad: y_P through the text encoder (placeholder rows), then the LoRA UNet.

    DDP wraps this module, so the LoRA and the placeholder rows sync together in one backward.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor):
        enc = self.text_encoder(ids)[0]  # [B, 77, d]
        return self.unet(x_t, t, enc).sample, enc


def tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


class PalpTask:
    """`training_step(batch)` returns the named loss terms; their sum is the training loss."""

    def __init__(self, config: TrainConfig, base: Base, model: nn.Module, first_placeholder_id: int,
                 device: torch.device, dtype: torch.dtype):
        self.config = config
        self.model = model  # PalpModel, possibly DDP-wrapped
        self.unet = base.unet  # the same module, unwrapped, for the no-grad branch
        self.device = device
        self.dtype = dtype
        self.first_placeholder_id = first_placeholder_id
        self.alphas_cumprod = base.noise_scheduler.alphas_cumprod.to(device)  # [1000], fp32
        self.prompt_ids = tokenize(base.tokenizer, [s.prompt for s in config.subjects], device)  # [S, 77]
        # The pre-trained branch's prompts never contain a placeholder, so their encodings are constant.
        self.clean_ids = tokenize(base.tokenizer, [config.clean_prompt], device)
        self.empty_ids = tokenize(base.tokenizer, [""], device)
        self.negative_ids = tokenize(base.tokenizer, [NFSD_NEGATIVE], device)
        with torch.no_grad(), self.autocast():
            self.clean_enc, self.empty_enc, self.negative_enc = (
                base.text_encoder(ids)[0] for ids in (self.clean_ids, self.empty_ids, self.negative_ids))

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def make_batch(self, generator: torch.Generator, latents, global_batch: int,
                   rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """Draw the global batch from one CPU generator and keep this rank's slice.

        Every rank draws the same numbers, so n workers at batch b see exactly what one worker
        at batch n·b sees (the DDP-equivalence test relies on it).
        """
        cfg = self.config
        idx = latents.draw(generator, global_batch, cfg.subject_sampling == "uniform")
        shape = (global_batch, *latents.latents.shape[1:])
        t = torch.randint(cfg.t_range[0], cfg.t_range[1], (global_batch,), generator=generator)
        eps = torch.randn(shape, generator=generator)
        # fresh noise for the alignment branch is drawn either way, so toggling same_noise keeps data order
        fresh = torch.randn(shape, generator=generator)
        mine = slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)
        eps = eps[mine].to(self.device)
        return {
            "latents": latents.latents[idx[mine].to(latents.latents.device)].float(),
            "subject": latents.subject[idx[mine].to(latents.subject.device)],
            "t": t[mine].to(self.device),
            "eps": eps,
            "eps_align": eps if cfg.same_noise else fresh[mine].to(self.device),
        }

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.config
        x0, eps, t = batch["latents"], batch["eps"], batch["t"]
        alpha_bar = self.alphas_cumprod[t]  # [B]
        x_t = losses.add_noise(x0, eps, alpha_bar)
        with self.autocast():
            eps_pred, prompt_enc = self.model(x_t.to(self.dtype), t, self.prompt_ids[batch["subject"]])
        terms = {"denoise_loss": losses.denoise(eps_pred, eps)}
        if cfg.alignment != "none":
            x0_hat = losses.predict_x0(x_t, eps_pred.float(), alpha_bar)  # Eq. 2, with grad
            branch = self.alignment_branch(x0_hat, batch, prompt_enc)
            terms["align_loss"] = cfg.align_weight * losses.score_distillation(x0_hat, branch["score"])
        return terms

    @torch.no_grad()  # the alignment branch needs no backward of its own (Eq. 7)
    def alignment_branch(self, x0_hat: torch.Tensor, batch: dict[str, torch.Tensor],
                         prompt_enc: torch.Tensor) -> dict[str, torch.Tensor]:
        """UNet calls of the alignment term and its score g (Eq. 4 / 6 / NFSD), all without grad."""
        cfg = self.config
        t, eps_align = batch["t"], batch["eps_align"]
        alpha_bar = self.alphas_cumprod[t]
        x_hat_t = losses.add_noise(x0_hat.detach(), eps_align, alpha_bar)  # re-noise x̂_0, same t
        weight = losses.timestep_weight(alpha_bar, cfg.rescale)
        weight = weight * ((t >= cfg.align_t_range[0]) & (t < cfg.align_t_range[1]))
        out = {}
        if cfg.alignment == "nfsd":
            uncond, cond, negative = self.pretrained(x_hat_t, t, self.empty_enc, self.clean_enc, self.negative_enc)
            out["score"] = losses.nfsd_score(uncond, cond, negative, t, cfg.alpha, weight)
            return out
        uncond, cond = self.pretrained(x_hat_t, t, self.empty_enc, self.clean_enc)
        out["pretrained"] = losses.cfg(uncond, cond, cfg.alpha)  # G^α_θ(x̂_t, y^c), LoRA off
        if cfg.alignment == "sds":
            out["score"] = losses.sds_score(out["pretrained"], eps_align, weight)
            return out
        out["personalized"] = self.personalized(x_hat_t, t, prompt_enc.detach())  # G^β_θLoRA(x̂_t, y_P)
        out["score"] = losses.palp_score(out["pretrained"], out["personalized"], weight)
        return out

    def pretrained(self, x: torch.Tensor, t: torch.Tensor, *encodings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pre-trained UNet (LoRA off) on each constant prompt encoding; one batched call."""
        n, b = len(encodings), len(x)
        enc = torch.cat([e.expand(b, -1, -1) for e in encodings])
        self.unet.disable_adapters()
        try:
            with self.autocast():
                pred = self.unet(x.repeat(n, 1, 1, 1).to(self.dtype), t.repeat(n), enc).sample
        finally:
            self.unet.enable_adapters()
        return pred.float().chunk(n)

    def personalized(self, x: torch.Tensor, t: torch.Tensor, prompt_enc: torch.Tensor) -> torch.Tensor:
        """G^β with LoRA on; β = 1 is the conditional call alone."""
        beta = self.config.beta
        with self.autocast():
            if beta == 1.0:
                return self.unet(x.to(self.dtype), t, prompt_enc).sample.float()
            enc = torch.cat([self.empty_enc.expand(len(x), -1, -1).to(prompt_enc.dtype), prompt_enc])
            uncond, cond = self.unet(x.repeat(2, 1, 1, 1).to(self.dtype), t.repeat(2), enc).sample.float().chunk(2)
        return losses.cfg(uncond, cond, beta)
