"""The PALP objective as pure tensor functions. Equation numbers refer to Arar et al. 2024 (palp.md).

Shapes: latents and noise predictions are [B, C, h, w]; per-sample scalars (ᾱ_t) are [B].
"""

import torch
import torch.nn.functional as F


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 1, 1)


def denoise(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Personalization loss ‖G_θ(x_t, y_P) − ε‖², Eq. 1 (mean over elements)."""
    return F.mse_loss(eps_pred.float(), eps.float())


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε (Sec. 3)."""
    a = _per_sample(alpha_bar)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def predict_x0(x_t: torch.Tensor, eps_pred: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t)·G_θ(x_t, y)) / √ᾱ_t, Eq. 2."""
    a = _per_sample(alpha_bar)
    return (x_t - (1 - a).sqrt() * eps_pred) / a.sqrt()


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0, a v-prediction model's target (Salimans & Ho 2022); Eq. 1 then reads ‖G − v‖²."""
    a = _per_sample(alpha_bar)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The ε a v-prediction stands for: ε = √(1−ᾱ_t)·x_t + √ᾱ_t·v. PALP's scores (Eq. 4, 6) and guidance read ε."""
    a = _per_sample(alpha_bar)
    return (1 - a).sqrt() * x_t + a.sqrt() * v


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """G^α(x, y) = (1−α)·G(x, ∅) + α·G(x, y), Eq. 5."""
    return (1 - scale) * uncond + scale * cond


def timestep_weight(alpha_bar: torch.Tensor, rescale: bool) -> torch.Tensor:
    """w̃(t): √ᾱ_t/√(1−ᾱ_t) undoes the ∂x̂_0/∂θ scale of Eq. 7 so updates are uniform in t; else 1."""
    if not rescale:
        return torch.ones_like(alpha_bar)
    return alpha_bar.sqrt() / (1 - alpha_bar).sqrt()


def palp_score(pretrained_cfg: torch.Tensor, personalized_cfg: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w̃(t)·(G^α_θ(x̂_t, y^c) − G^β_θLoRA(x̂_t, y_P)), the score of Eq. 6."""
    return _per_sample(weight) * (pretrained_cfg - personalized_cfg)


def sds_score(pretrained_cfg: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w̃(t)·(G^α(x̂_t, y^c) − ε), the SDS score of Eq. 4 (ablation baseline)."""
    return _per_sample(weight) * (pretrained_cfg - eps)


def nfsd_score(uncond: torch.Tensor, cond: torch.Tensor, negative: torch.Tensor, t: torch.Tensor,
               scale: float, weight: torch.Tensor) -> torch.Tensor:
    """Noise-free score distillation (Katzir et al. 2023, Eq. 8-9): δ_C + δ_D without the ε term.

    δ_C = s·(G(y^c) − G(∅)); δ_D = G(∅) for t < 200, else G(∅) − G(y_neg).
    """
    delta_d = torch.where(_per_sample(t) < 200, uncond, uncond - negative)
    return _per_sample(weight) * (scale * (cond - uncond) + delta_d)


def score_distillation(x0_hat: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient w.r.t. θ is score·∂x̂_0/∂θ (Eq. 6 via Eq. 7): (stopgrad(g)·x̂_0), summed.

    Divided by x̂_0.numel() so its per-element scale matches the mean-reduced Eq. 1 loss.
    """
    return (score.detach().float() * x0_hat.float()).sum() / x0_hat.numel()
