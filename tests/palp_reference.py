"""An independent reference of the PALP training objective, written from the paper for the tests.

Equation numbers are Arar et al. 2024 (shared/papers/palp.md; summary in shared/papers/README.md). Nothing here
imports palp_trainer.objective.losses or palp_trainer.objective.task: the schedule, the noising, x̂_0, guidance, the scores, the
timestep weight and the gradients are all written out again. Only the networks are shared: the personalized
branch runs the trainer's own UNet (LoRA on) and text encoder ([V] rows), and the pre-trained branch runs a
separately built base model that has no adapter and no placeholder at all.

The gradient of the alignment term is taken from Eq. 6 with Eq. 7, not by differentiating a surrogate:
x_t does not depend on θ, so ∂x̂_0/∂θ = −√(1−ᾱ_t)/√ᾱ_t · ∂G_θ(x_t, y_P)/∂θ exactly, and
∇L_align = λ·k · Σ g · ∂x̂_0/∂θ / N is one vector-Jacobian product through G_θ(x_t, y_P).
"""

from dataclasses import dataclass

import torch

# NFSD's negative prompt (Katzir et al. 2023, Sec. 4), copied rather than imported
NFSD_NEGATIVE = "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = Π_{s<=t} (1 − β_s) (DDPM, Ho et al. 2020, Eq. 4), in float64."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def _b(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, 1, 1)


def noise(x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (Sec. 3), float64."""
    return _b(abar.sqrt()) * x0.double() + _b((1 - abar).sqrt()) * eps.double()


def x0_estimate(x_t: torch.Tensor, eps_hat: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t)·G(x_t, y)) / √ᾱ_t (Eq. 2), float64."""
    return (x_t.double() - _b((1 - abar).sqrt()) * eps_hat.double()) / _b(abar.sqrt())


def v_target(x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (Salimans & Ho 2022, Sec. 4; what a v-prediction model predicts), float64."""
    return _b(abar.sqrt()) * eps.double() - _b((1 - abar).sqrt()) * x0.double()


def eps_of(x_t: torch.Tensor, out: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The ε a network output stands for: itself for ε-prediction; for v, x_t = √ᾱ·x_0 + √(1−ᾱ)·ε and
    v = √ᾱ·ε − √(1−ᾱ)·x_0 give ε = √(1−ᾱ)·x_t + √ᾱ·v, float64."""
    if prediction == "epsilon":
        return out.double()
    return _b((1 - abar).sqrt()) * x_t.double() + _b(abar.sqrt()) * out.double()


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """G^s(x, y) = (1−s)·G(x, ∅) + s·G(x, y) (Eq. 5)."""
    return (1 - scale) * uncond.double() + scale * cond.double()


def ids_of(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@dataclass
class Nets:
    """The personalized networks (the trainer's: LoRA on, [V] rows) and a pre-trained base (no adapter)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    pre_unet: torch.nn.Module
    pre_text_encoder: torch.nn.Module
    pre_tokenizer: object
    betas: torch.Tensor
    prediction: str = "epsilon"  # what both UNets predict: "epsilon" or "v_prediction"
    # SDXL: stock StableDiffusionXLPipelines around the same networks (personalized, pre-trained); their own
    # encode_prompt and _get_add_time_ids build the conditioning, not palp_trainer.families.sd
    xl: object = None
    pre_xl: object = None
    resolution: int = 32


def condition(nets: Nets, prompts: list[str], pre: bool, time_ids: torch.Tensor | None = None) -> dict:
    """The UNet's conditioning keyword arguments for `prompts` (pre: the pre-trained base's encoders)."""
    if nets.xl is None:
        encoder, tokenizer = (nets.pre_text_encoder, nets.pre_tokenizer) if pre else (nets.text_encoder, nets.tokenizer)
        return {"encoder_hidden_states": encoder(ids_of(tokenizer, prompts))[0]}
    pipe = nets.pre_xl if pre else nets.xl
    context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    if time_ids is None:  # a sample's: original = target = resolution, no crop (the pipeline's defaults)
        size = (nets.resolution, nets.resolution)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=context.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return {"encoder_hidden_states": context,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}}


def unconditional(nets: Nets, b: int, pre: bool) -> dict:
    """∅ as each family's pipeline conditions CFG on it: SD-1.x encodes "", SDXL zeros its text and pooled
    embeddings (force_zeros_for_empty_prompt)."""
    kwargs = condition(nets, [""] * b, pre)
    if nets.xl is not None:
        kwargs["encoder_hidden_states"] = torch.zeros_like(kwargs["encoder_hidden_states"])
        kwargs["added_cond_kwargs"]["text_embeds"] = torch.zeros_like(kwargs["added_cond_kwargs"]["text_embeds"])
    return kwargs


def reference_step(config, nets: Nets, batch: dict, params: list[torch.Tensor], align: bool = True) -> dict:
    """Each loss term's value and its gradient w.r.t. `params`, from the paper: {name: (value, grads)}.

    `config` is read for its objective fields only (alignment, alpha, beta, align_weight, align_every, rescale,
    align_t_range, subjects' prompts, clean_prompt); `align` False is a step without the alignment term."""
    x0, eps, t, eps_align, subject = (batch[k] for k in ("latents", "eps", "t", "eps_align", "subject"))
    abar = alphas_cumprod(nets.betas)[t]  # [B], float64
    n = x0.numel()

    # personalization branch, with grad (Eq. 1): y_P of each sample's subject, LoRA on
    prompts = [config.subjects[int(i)].prompt for i in subject]
    x_t = noise(x0, eps, abar)
    # [B, 77, d], [V] rows live; SDXL: the photo's size conditioning (original size, crop, target)
    enc = condition(nets, prompts, pre=False, time_ids=batch.get("time_ids"))
    pred = nets.unet(x_t.float(), t, **enc).sample  # G_θ(x_t, y_P): ε̂, or v̂ for a v-prediction model
    v_model = nets.prediction == "v_prediction"
    residual = pred.double() - (v_target(x0, eps, abar) if v_model else eps.double())
    denoise = (residual ** 2).sum() / n  # mean over elements, against the model's own target
    # ∂/∂G of the mean squared error: 2(G − target)/N
    out = {"denoise_loss": (denoise, _vjp(pred, params, 2 * residual / n))}
    if not align or config.alignment == "none":
        return out

    with torch.no_grad():
        eps_hat = eps_of(x_t, pred, abar, nets.prediction)
        x0_hat = x0_estimate(x_t, eps_hat, abar)  # Eq. 2 on the ε the output stands for
        x_hat_t = noise(x0_hat, eps_align, abar).float()  # re-noised at the same t (same ε: eps_align is eps)
        b = len(t)

        def pretrained(prompt: str | None) -> torch.Tensor:  # LoRA off, no placeholder: the base model; as ε
            e = unconditional(nets, b, pre=True) if prompt is None else condition(nets, [prompt] * b, pre=True)
            return eps_of(x_hat_t, nets.pre_unet(x_hat_t, t, **e).sample, abar, nets.prediction)

        def personalized(e: dict) -> torch.Tensor:  # LoRA on; as ε
            return eps_of(x_hat_t, nets.unet(x_hat_t, t, **e).sample, abar, nets.prediction)

        uncond, cond = pretrained(None), pretrained(config.clean_prompt)
        if config.alignment == "palp":  # Eq. 6: G^α_pre(x̂_t, y^c) − G^β_LoRA(x̂_t, y_P)
            # y_P at a sample's size conditioning: x̂_t is no photo
            prompt = condition(nets, prompts, pre=False)
            diff = guided(uncond, cond, config.alpha) - guided(personalized(unconditional(nets, b, pre=False)),
                                                               personalized(prompt), config.beta)
        elif config.alignment == "sds":  # Eq. 4: G^α_pre(x̂_t, y^c) − ε
            diff = guided(uncond, cond, config.alpha) - eps_align.double()
        elif config.alignment == "nfsd":  # Katzir et al. Eq. 8-9: α·δ_C + δ_D, no ε
            negative = pretrained(NFSD_NEGATIVE)
            delta_d = torch.stack([u if int(s) < 200 else u - v for u, v, s in zip(uncond, negative, t)])
            diff = config.alpha * (cond.double() - uncond.double()) + delta_d.double()
        else:
            raise ValueError(config.alignment)

        lo, hi = config.align_t_range
        w = (abar.sqrt() / (1 - abar).sqrt()) if config.rescale else torch.ones_like(abar)  # w̃(t), Eq. 7
        w = w * torch.tensor([float(lo <= int(s) < hi) for s in t], dtype=w.dtype)
        g = _b(w) * diff  # the score of Eq. 4 / 6
        scale = config.align_weight * config.align_every  # λ, times k on every k-th step
        value = scale * (g * x0_hat).sum() / n
        # Eq. 7: ∂x̂_0/∂θ = −√(1−ᾱ)/√ᾱ · ∂ε̂/∂θ, and for v (ε̂ = √(1−ᾱ)·x_t + √ᾱ·v̂): −√(1−ᾱ) · ∂v̂/∂θ
        dx0 = (1 - abar).sqrt() if v_model else (1 - abar).sqrt() / abar.sqrt()
        cotangent = -scale * g * _b(dx0) / n
    out["align_loss"] = (value, _vjp(pred, params, cotangent))
    return out


def _vjp(y: torch.Tensor, params: list[torch.Tensor], v: torch.Tensor) -> list[torch.Tensor]:
    """Σ v·∂y/∂θ for each θ in params, in float64."""
    grads = torch.autograd.grad(y, params, grad_outputs=v.to(y.dtype), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p, dtype=torch.float64) if g is None else g.double() for g, p in zip(grads, params)]
