"""Trial groups: K trials of one (subject, prompt) pair that share the base model, the data and the LoRA rank,
trained in one worker group and one step. Each batch row block belongs to one member: its own LoRA and
placeholder rows, its own α, β, λ, lr and embedding lr.

Members differ only in GROUP_KNOBS. Everything else (seed, steps, rank, batch, precision, ...) is the same, so
they start from the same LoRA initialisation and draw the same batches from one generator: member m's rows are
exactly the batch its trial would draw alone. Rows never mix (the frozen weights are shared, the trainables
are per member), so the gradient of Σ_m loss_m on member m's parameters is the gradient of loss_m alone, and
AdamW updates each member's parameters from their own gradients: a member trains as its trial would alone
(tests/test_group.py checks losses, gradients and weights against single trials).
"""

import contextlib
import functools

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..config import GROUP_KNOBS, TrainConfig, group_key, group_refusal
from ..families.base import Base
from . import losses
from .task import aligns_at, alignment_score, as_eps, constant_encodings, draw_batch, pretrained_prompts


class MemberWeights(nn.Module):
    """Each member's LoRA (A, B per LoRA layer) and placeholder rows, fp32 masters, started from the peft
    adapter's initial weights and the embedding's initial rows (what each trial would start from alone)."""

    def __init__(self, layers: list[LoraLayer], rows: torch.Tensor, k: int):
        super().__init__()
        a = [layer.lora_A["default"].weight for layer in layers]  # [r, d_in] each
        b = [layer.lora_B["default"].weight for layer in layers]  # [d_out, r]
        self.A = nn.ModuleList(nn.ParameterList(nn.Parameter(w.detach().float().clone()) for w in a) for _ in range(k))
        self.B = nn.ModuleList(nn.ParameterList(nn.Parameter(w.detach().float().clone()) for w in b) for _ in range(k))
        self.rows = nn.ParameterList(nn.Parameter(rows.detach().float().clone()) for _ in range(k))

    def params_of(self, m: int) -> tuple[list[nn.Parameter], nn.Parameter]:
        """Member m's LoRA (A, B of each layer in turn: peft's parameter order) and rows."""
        return [p for ab in zip(self.A[m], self.B[m]) for p in ab], self.rows[m]


class GroupModel(nn.Module):
    """The path with grad for all members at once: row block i of the batch is member `route[i]`."""

    def __init__(self, base: Base, embedding, k: int):
        super().__init__()
        self.denoiser = base.denoiser
        self.encoders = nn.ModuleList(base.encoders)
        self.family = base.family
        self.embedding = embedding
        self.layers = [m for m in base.denoiser.modules() if isinstance(m, LoraLayer)]
        self.scaling = self.layers[0].scaling["default"]  # lora_alpha / rank, the same in every layer
        self.members = MemberWeights(self.layers, embedding.rows, k)
        self.route: list[int | None] | None = None  # per row block: member index, or None for LoRA off
        self.hooks = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, j: int):
        def hook(layer, args, out):
            if self.route is None:
                return out
            on = [i for i, m in enumerate(self.route) if m is not None]
            if not on:
                return out
            n = len(self.route)
            x = args[0].reshape(n, -1, args[0].shape[-1])  # [blocks, rows·tokens, d_in]
            a = torch.stack([self.members.A[self.route[i]][j] for i in on]).to(x.dtype)  # [k, r, d_in]
            b = torch.stack([self.members.B[self.route[i]][j] for i in on]).to(x.dtype)  # [k, d_out, r]
            delta = torch.bmm(torch.bmm(x[on], a.transpose(1, 2)), b.transpose(1, 2)) * self.scaling
            if len(on) < n:  # LoRA-off blocks add nothing
                delta = torch.zeros(n, *delta.shape[1:], dtype=delta.dtype, device=delta.device).index_put(
                    (torch.tensor(on, device=delta.device),), delta)
            return out + delta.reshape(out.shape).to(out.dtype)
        return hook

    @contextlib.contextmanager
    def routed(self, route: list[int | None] | None, rows: list[int] | None = None):
        """Inside, the UNet's LoRA is member route[i]'s on row block i (peft's own adapter off), and placeholder
        ids offset by j·n_tokens read member rows[j]'s rows."""
        self.route = route
        if rows is not None:
            self.embedding.override = torch.cat([self.members.rows[m] for m in rows])
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.route, self.embedding.override = None, None
            self.denoiser.enable_adapters()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, time_ids: torch.Tensor,
                route: list[int]):
        with self.routed(route, route):
            enc = self.family.encode(self.encoders, ids, time_ids)  # [K·B, 77(+1), d]
            return self.family.denoise(self.denoiser, x_t, t, enc), enc

    @torch.no_grad()
    def load_member(self, m: int) -> None:
        """Member m's weights into peft's adapter and the embedding's rows: evaluation and export see member
        m as its trial alone."""
        for j, layer in enumerate(self.layers):
            layer.lora_A["default"].weight.copy_(self.members.A[m][j])
            layer.lora_B["default"].weight.copy_(self.members.B[m][j])
        self.embedding.rows.copy_(self.members.rows[m])


class GroupTask:
    """`loss_terms` returns each loss term per member ([K] tensors) of one step; their total is the group's loss."""

    def __init__(self, configs: list[TrainConfig], base: Base, model: nn.Module, first_placeholder_id: int,
                 device: torch.device, dtype: torch.dtype):
        self.configs = configs
        self.config = configs[0]  # everything but GROUP_KNOBS is the same in every member
        self.model = self.group = model  # GroupModel (one worker: no DDP, see Resources.trials_per_group)
        self.denoiser = base.denoiser
        self.device, self.dtype = device, dtype
        self.active = list(range(len(configs)))  # members still training
        self.first_id = first_placeholder_id
        self.n_tokens = len(self.config.tokens)
        self.alphas_cumprod = base.noise_scheduler.alphas_cumprod.to(device)
        self.v_prediction = base.noise_scheduler.config.prediction_type == "v_prediction"
        self.family = base.family
        if len({e.get_input_embeddings().first_id for e in base.encoders}) > 1:
            raise ValueError("trial group: the placeholders' ids differ between the base's tokenizers")
        self.prompt_ids = self.family.tokenize(base, [s.prompt for s in self.config.subjects], device)
        self.sample_time_ids = self.family.default_time_ids(self.config.resolution).to(device)
        self.empty_enc, self.clean_enc, self.negative_enc = constant_encodings(base, self.config, device,
                                                                               self.autocast())

    def make_batch(self, generator, latents, global_batch, rank=0, world_size=1) -> dict[str, torch.Tensor]:
        """The batch every member's trial would draw alone (task.draw_batch: the same generator and draws)."""
        return draw_batch(self.config, self.device, generator, latents, global_batch, rank, world_size)

    def aligns_at(self, step: int) -> bool:
        return aligns_at(self.config, step)

    def as_eps(self, x_t, pred, t):
        return as_eps(x_t, pred, self.alphas_cumprod[t], self.v_prediction)

    def denoise(self, x, t, cond):
        return self.family.denoise(self.denoiser, x, t, cond).float()

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _per_row(self, knob: str, b: int) -> torch.Tensor:
        """[K·B] values of a member knob, one per row of the active members' blocks."""
        return torch.tensor([getattr(self.configs[m], knob) for m in self.active],
                            device=self.device).repeat_interleave(b)

    def loss_terms(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, eps_align: torch.Tensor,
                   subject: torch.Tensor, time_ids: torch.Tensor, align: bool = True) -> dict[str, torch.Tensor]:
        """One batch (B rows, drawn once) for every active member: {"denoise_loss": [K], ["align_loss": [K]]}."""
        cfg, k, b = self.config, len(self.active), len(x0)
        x0, eps, t, eps_align, subject, time_ids = (v.repeat(k, *[1] * (v.dim() - 1))
                                                    for v in (x0, eps, t, eps_align, subject, time_ids))
        blocks = torch.arange(k, device=self.device).repeat_interleave(b)  # [K·B]: row -> block
        ids = self.prompt_ids[subject]  # [K·B, (2,) 77]
        offset = (blocks * self.n_tokens).view(-1, *[1] * (ids.dim() - 1))
        ids = torch.where(ids >= self.first_id, ids + offset, ids)
        alpha_bar = self.alphas_cumprod[t]
        x_t = losses.add_noise(x0, eps, alpha_bar)
        with self.autocast():
            eps_pred, prompt_enc = self.model(x_t.to(self.dtype), t, ids, time_ids, self.active)
        target = losses.v_target(x0, eps, alpha_bar) if self.v_prediction else eps
        terms = {"denoise_loss": torch.stack([losses.denoise(eps_pred[i * b:(i + 1) * b], target[i * b:(i + 1) * b])
                                              for i in range(k)])}
        if not (align and cfg.alignment != "none"):
            return terms
        x0_hat = losses.predict_x0(x_t, self.as_eps(x_t, eps_pred.float(), t), alpha_bar)  # Eq. 2, with grad
        prompt_enc = self.family.retime(prompt_enc.detach(), self.sample_time_ids)  # as PalpTask.loss_terms
        score = self.score(x0_hat, t, eps_align, prompt_enc, b)
        terms["align_loss"] = torch.stack([  # each member at its own λ, times k on every k-th step
            self.configs[m].align_weight * cfg.align_every
            * losses.score_distillation(x0_hat[i * b:(i + 1) * b], score[i * b:(i + 1) * b])
            for i, m in enumerate(self.active)])
        return terms

    @torch.no_grad()
    def score(self, x0_hat, t, eps_align, prompt_enc, b: int) -> torch.Tensor:
        """The alignment term's score g per row (Eq. 4 / 6 / NFSD), each member with its own α, β."""
        cfg = self.config
        alpha_bar = self.alphas_cumprod[t]
        x_hat_t = losses.add_noise(x0_hat.detach(), eps_align, alpha_bar)
        weight = losses.timestep_weight(alpha_bar, cfg.rescale)
        weight = weight * ((t >= cfg.align_t_range[0]) & (t < cfg.align_t_range[1]))
        alpha = self._per_row("alpha", b).view(-1, 1, 1, 1)
        pre = self.pretrained(x_hat_t, t, pretrained_prompts(self, cfg.alignment))
        personalized = functools.partial(self.personalized, x_hat_t, t, prompt_enc, b)  # called for PALP only
        return alignment_score(cfg.alignment, pre, personalized, eps_align, t, alpha, weight)["score"]

    def personalized(self, x_hat_t, t, prompt_enc, b: int) -> torch.Tensor:
        """G^β_θLoRA(x̂_t, y_P) per row, each member with its own LoRA and β."""
        if all(self.configs[m].beta == 1.0 for m in self.active):  # G^1 is the conditional call alone
            with self.autocast(), self.group.routed(self.active):
                return self.as_eps(x_hat_t, self.denoise(x_hat_t.to(self.dtype), t, prompt_enc), t)
        beta = self._per_row("beta", b).view(-1, 1, 1, 1)
        with self.autocast(), self.group.routed(self.active + self.active):  # [∅ | y_P] blocks, LoRA on
            n = len(x_hat_t)
            enc = torch.cat([self.empty_enc.expand(n, -1, -1).to(prompt_enc.dtype), prompt_enc])
            x2 = x_hat_t.repeat(2, 1, 1, 1).to(self.dtype)
            uncond, cond = self.denoise(x2, t.repeat(2), enc).chunk(2)
        return losses.cfg(self.as_eps(x_hat_t, uncond, t), self.as_eps(x_hat_t, cond, t), beta)

    def pretrained(self, x, t, encodings) -> tuple[torch.Tensor, ...]:
        """The pre-trained UNet (LoRA off) on each constant prompt, in one call."""
        n, rows = len(encodings), len(x)
        with self.autocast(), self.group.routed(None):
            enc = torch.cat([e.expand(rows, -1, -1) for e in encodings])
            out = self.denoise(x.repeat(n, 1, 1, 1).to(self.dtype), t.repeat(n), enc).chunk(n)
        return tuple(self.as_eps(x, o, t) for o in out)


def make_group_optimizer(configs: list[TrainConfig], weights: MemberWeights) -> torch.optim.Optimizer:
    """One AdamW, two param groups per member (its lr; its embedding lr, no weight decay): AdamW's update of a
    parameter reads only that parameter's gradient and state, so each member updates as its trial alone."""
    groups = []
    for m, config in enumerate(configs):
        lora, rows = weights.params_of(m)
        groups += [{"params": lora, "lr": config.lr},
                   {"params": [rows], "lr": config.embedding_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, weight_decay=configs[0].weight_decay, fused=weights.rows[0].is_cuda)


def member_configs(configs: list[TrainConfig]) -> list[TrainConfig]:
    """Refuse members that cannot share a group; returns them as they are."""
    keys = {group_key(c) for c in configs}
    if len(keys) > 1:
        raise ValueError(f"trial group: members may differ only in {', '.join(GROUP_KNOBS)}")
    if group_refusal(configs[0].precision):
        raise ValueError(f"trial group: {group_refusal(configs[0].precision)}")
    return configs


def group_step(task: GroupTask, data, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               global_batch: int, *, step: int) -> dict[int, dict[str, float]]:
    """Optimizer step `step` for every active member (loop.train_step for a group); returns member -> its loss
    terms averaged over grad_accum. A member whose loss is not finite is left out of the backward and returned
    with its non-finite values; the caller drops it."""
    config = task.config
    logs: dict[int, dict[str, float]] = {m: {} for m in task.active}
    for micro in range(config.grad_accum):
        batch = task.make_batch(generator, data, global_batch)
        terms = task.loss_terms(batch["latents"], batch["eps"], batch["t"], batch["eps_align"], batch["subject"],
                                batch["time_ids"], align=task.aligns_at(step))
        values = torch.stack(list(terms.values())).detach().float()  # [terms, K]; one host sync
        finite = torch.isfinite(values).all(0)
        for i, m in enumerate(task.active):
            for name, v in zip(terms, values[:, i].tolist()):
                logs[m][name] = logs[m].get(name, 0.0) + v / config.grad_accum
        total = sum(v[finite].sum() for v in terms.values())
        (total / config.grad_accum).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logs
