"""PalpTask: the model calls and loss terms of one PALP training step (Sec. 4)."""

import contextlib
import functools
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..config import TrainConfig
from ..families.base import Base, masters_as
from . import losses

# NFSD's negative prompt (Katzir et al. 2023, Sec. 4)
NFSD_NEGATIVE = "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"


class PalpModel(nn.Module):
    """The only path with grad: y_P through the text encoder (placeholder rows), then the LoRA UNet.

    DDP wraps this module, so the LoRA and the placeholder rows sync together in one backward.
    """

    def __init__(self, base: Base):
        super().__init__()
        self.denoiser = base.denoiser
        self.encoders = nn.ModuleList(base.encoders)  # the first holds the placeholder rows
        self.family = base.family

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, time_ids: torch.Tensor):
        enc = self.family.encode(self.encoders, ids, time_ids)  # [B, 77(+1), d]
        return self.family.denoise(self.denoiser, x_t, t, enc), enc


@dataclass(frozen=True)
class FastPaths:
    """Speed-ups of the step that keep its math; each is checked against the plain path in
    tests/test_fast_paths.py. All off is the plain eager step; `auto` picks what the device supports.
    Measurements and the reasons for each default: benchmarks/RESULTS.md."""

    # The step runs without autocast: the frozen weights compute in bf16 as stored, and each fp32 LoRA master
    # is cast to bf16 once per step (its grad flows back through the cast). Autocast instead upcasts every
    # norm's input to fp32 and casts back: ~2,500 cast kernels per PALP step; -16% step time at batch 16.
    native_dtype: bool = False
    # Under autocast, LoRA matmuls take the bf16 activations as they are: peft would copy each LoRA layer's
    # input to fp32 (the masters' dtype) and autocast would copy it straight back; the matmul is bf16 either way
    lora_compute_dtype: bool = False
    # PALP's no-grad calls in one UNet batch: pre-trained rows (LoRA off) and personalized rows (LoRA on)
    fold_alignment: bool = False
    # the pre-trained branch's prompts (∅, y^c[, NFSD's negative]) in one UNet call of 2B (3B) rows instead of
    # one call per prompt: fewer launches, but its activations peak while the grad branch's are alive
    batch_pretrained: bool = False
    channels_last: bool = False  # NHWC convolutions: cuDNN needs no layout transposes around each conv
    cuda_graphs: bool = False  # the step's forward and backward replayed as two CUDA graphs (no launch overhead)

    @classmethod
    def auto(cls, device: torch.device, dtype: torch.dtype, distributed: bool, batch_size: int = 1) -> "FastPaths":
        cuda = device.type == "cuda"
        return cls(
            native_dtype=cuda and dtype == torch.bfloat16 and not distributed,  # fp16 keeps autocast's fp32 norms
            lora_compute_dtype=dtype != torch.float32,
            # one no-grad call instead of two pays at small batches; at 16 it saved 2% of the time but its
            # 3B-row activations cost 0.9 GiB more than the 2B-row pre-trained call
            fold_alignment=cuda and batch_size <= 4,
            # at 16 rows one call fills the GPU already; the split calls keep PALP's extra peak at B rows
            batch_pretrained=batch_size <= 4,
            # NHWC pays while the step is latency-bound; at larger batches GroupNorm's NCHW round trips
            # (torch's CUDA GroupNorm makes its input contiguous) cost more than cuDNN's own transposes
            channels_last=cuda and batch_size <= 4,
            cuda_graphs=cuda and not distributed,  # DDP's forward and gradient hooks cannot be captured
        )


def draw_batch(config: TrainConfig, device: torch.device, generator: torch.Generator, latents, global_batch: int,
               rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Draw the global batch from one CPU generator and keep this rank's slice.

    Every rank draws the same numbers, so n workers at batch b see exactly what one worker
    at batch n·b sees (the DDP-equivalence test relies on it). A trial group's members draw it once: each
    member's rows are the batch its trial would draw alone.
    """
    cfg = config
    idx = latents.draw(generator, global_batch, cfg.subject_sampling == "uniform")
    shape = (global_batch, *latents.latents.shape[1:])
    t = torch.randint(cfg.t_range[0], cfg.t_range[1], (global_batch,), generator=generator)
    eps = torch.randn(shape, generator=generator)
    # fresh noise for the alignment branch is drawn either way, so toggling same_noise keeps data order
    fresh = torch.randn(shape, generator=generator)
    mine = slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)
    eps = eps[mine].to(device)
    return {
        "latents": latents.latents[idx[mine].to(latents.latents.device)].float(),
        "subject": latents.subject[idx[mine].to(latents.subject.device)],
        "time_ids": latents.time_ids[idx[mine].to(latents.time_ids.device)],
        "t": t[mine].to(device),
        "eps": eps,
        "eps_align": eps if cfg.same_noise else fresh[mine].to(device),
    }


def aligns_at(config: TrainConfig, step: int) -> bool:
    """Whether optimizer step `step` (0-based) has the alignment term: every `align_every`-th, from the first."""
    return config.alignment != "none" and step % config.align_every == 0


def as_eps(x_t: torch.Tensor, pred: torch.Tensor, alpha_bar: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """The ε a UNet output at (x_t, t) stands for: itself, or converted from v (losses.eps_from_v)."""
    return losses.eps_from_v(x_t, pred, alpha_bar) if v_prediction else pred


def pretrained_prompts(task, alignment: str) -> tuple[torch.Tensor, ...]:
    """The pre-trained branch's constant encodings: ∅ and y^c, and NFSD's negative prompt."""
    return (task.empty_enc, task.clean_enc) + ((task.negative_enc,) if alignment == "nfsd" else ())


def alignment_score(alignment: str, pre: tuple[torch.Tensor, ...], personalized, eps_align: torch.Tensor,
                    t: torch.Tensor, alpha, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The one place the alignment term is chosen: its score g (Eq. 4 sds, Eq. 6 palp, NFSD) from the pre-trained
    outputs `pre` (G(∅), G(y^c)[, G(y_neg)]) and, for PALP only, `personalized()` (G^β_θLoRA(x̂_t, y_P), called
    here). `alpha` is a float, or [B, 1, 1, 1] per row (a trial group's members). {"score"[, "pretrained",
    "personalized"]}."""
    if alignment == "nfsd":
        return {"score": losses.nfsd_score(pre[0], pre[1], pre[2], t, alpha, weight)}
    out = {"pretrained": losses.cfg(pre[0], pre[1], alpha)}  # G^α_θ(x̂_t, y^c), LoRA off
    if alignment == "sds":
        return {**out, "score": losses.sds_score(out["pretrained"], eps_align, weight)}
    out["personalized"] = personalized()
    return {**out, "score": losses.palp_score(out["pretrained"], out["personalized"], weight)}


class PalpTask:
    """`training_step(batch)` returns the named loss terms; their sum is the training loss."""

    def __init__(self, config: TrainConfig, base: Base, model: nn.Module, first_placeholder_id: int,
                 device: torch.device, dtype: torch.dtype, fast: FastPaths | None = None):
        self.config = config
        distributed = isinstance(model, nn.parallel.DistributedDataParallel)
        self.fast = fast if fast is not None else FastPaths.auto(device, dtype, distributed, config.batch_size)
        if self.fast.cuda_graphs and (device.type != "cuda" or distributed):
            raise ValueError("cuda_graphs needs a CUDA device and a model without DDP (world size 1)")
        if self.fast.native_dtype and dtype == torch.float32:
            raise ValueError("native_dtype is for bf16/fp16 precision; fp32 has no autocast to leave out")
        self.model = model  # PalpModel, possibly DDP-wrapped
        self.denoiser = base.denoiser  # the same module, unwrapped, for the no-grad branch
        self.device = device
        self.dtype = dtype
        self.first_placeholder_id = first_placeholder_id
        self.alphas_cumprod = base.noise_scheduler.alphas_cumprod.to(device)  # [1000], fp32
        # SD-2.x 768 predicts v: Eq. 1 on v's target, and every output read as the ε it stands for (x̂_0, Eq. 4-7)
        self.v_prediction = base.noise_scheduler.config.prediction_type == "v_prediction"
        self.family = base.family
        self.prompt_ids = self.family.tokenize(base, [s.prompt for s in config.subjects], device)  # [S, (2,) 77]
        # The pre-trained branch's prompts never contain a placeholder, so their encodings are constant. Its
        # x̂_t is a sample, not a photo: SDXL's size conditioning is a sample's (no crop), in both branches.
        self.sample_time_ids = self.family.default_time_ids(config.resolution).to(device)
        self.empty_enc, self.clean_enc, self.negative_enc = constant_encodings(
            base, config, device, self.autocast())
        self.lora_layers = [m for m in self.denoiser.modules() if isinstance(m, LoraLayer)]
        if self.fast.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)  # conv weights; activations follow
        self.graphed = {}  # align -> the step captured on its first use, when the batch shapes are known
        self.graph_pool = None  # one memory pool for both step kinds (align_every > 1): they never overlap

    def autocast(self):
        if self.dtype == torch.float32 or self.fast.native_dtype:
            return contextlib.nullcontext()
        # a graph replays the casts it captured; autocast's weight-cast cache would outlive the capture
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not self.fast.cuda_graphs)

    @contextlib.contextmanager
    def lora_in_compute_dtype(self):
        """Inside, peft's LoRA layers skip their input cast to the fp32 masters' dtype (see FastPaths)."""
        if not self.fast.lora_compute_dtype:
            yield
            return
        for layer in self.lora_layers:
            layer.cast_input_dtype_enabled = False
        try:
            yield
        finally:
            for layer in self.lora_layers:
                layer.cast_input_dtype_enabled = True

    @contextlib.contextmanager
    def lora_from_row(self, start: int):
        """Inside (no grad only: the output is updated in place), the UNet runs with LoRA off on batch rows
        [:start] and on for rows [start:]: each LoRA layer adds scaling·B(A(x)) to those rows alone, as peft does."""
        def hook(layer, args, out):
            x = args[0][start:]  # [N - start, L, d_in], a view
            for a in layer.active_adapters:
                out[start:] += layer.lora_B[a](layer.lora_A[a](layer.lora_dropout[a](x))) * layer.scaling[a]
            return out

        self.denoiser.disable_adapters()  # rows [:start]: no LoRA term at all, the pre-trained layers
        handles = [layer.register_forward_hook(hook) for layer in self.lora_layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.denoiser.enable_adapters()

    def make_batch(self, generator: torch.Generator, latents, global_batch: int,
                   rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        return draw_batch(self.config, self.device, generator, latents, global_batch, rank, world_size)

    def aligns_at(self, step: int) -> bool:
        return aligns_at(self.config, step)

    def training_step(self, batch: dict[str, torch.Tensor], align: bool = True) -> dict[str, torch.Tensor]:
        """The loss terms of one batch; `align=False` leaves the alignment term out (a plain LoRA+TI step)."""
        align = align and self.config.alignment != "none"
        args = (batch["latents"], batch["eps"], batch["t"], batch["eps_align"], batch["subject"], batch["time_ids"])
        names = ("denoise_loss", "align_loss") if align else ("denoise_loss",)
        if not self.fast.cuda_graphs:
            return dict(zip(names, self.loss_terms(*args, align=align)))
        if align not in self.graphed:
            self.graphed[align] = self.capture(args, align)
        return dict(zip(names, self.graphed[align](*args)))

    def loss_terms(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, eps_align: torch.Tensor,
                   subject: torch.Tensor, time_ids: torch.Tensor, align: bool = True) -> tuple[torch.Tensor, ...]:
        """The step's differentiable part: (denoise_loss[, align_loss]); the same code eager or captured.

        With `align_every` = k > 1 the alignment term runs on every k-th step at weight k·λ, so its expected
        gradient per step is unchanged (lazy regularization, as StyleGAN2 does for R1; Karras et al. 2020).
        AdamW's update is not: its second moment sees rarer, k-times larger alignment gradients, so k is a
        knob that interacts with λ and lr, not a free speed-up."""
        cfg = self.config
        alpha_bar = self.alphas_cumprod[t]  # [B]
        x_t = losses.add_noise(x0, eps, alpha_bar)
        lora_weights = masters_as(self.dtype, self.denoiser) if self.fast.native_dtype else contextlib.nullcontext()
        with self.lora_in_compute_dtype(), lora_weights:
            with self.autocast():
                eps_pred, prompt_enc = self.model(x_t.to(self.dtype), t, self.prompt_ids[subject], time_ids)
            target = losses.v_target(x0, eps, alpha_bar) if self.v_prediction else eps
            terms = (losses.denoise(eps_pred, target),)
            if align and cfg.alignment != "none":
                eps_hat = self.as_eps(x_t, eps_pred.float(), t)
                x0_hat = losses.predict_x0(x_t, eps_hat, alpha_bar)  # Eq. 2, with grad
                prompt_enc = self.family.retime(prompt_enc, self.sample_time_ids)
                branch = self.alignment_branch(x0_hat, {"t": t, "eps_align": eps_align}, prompt_enc)
                weight = cfg.align_weight * cfg.align_every
                terms += (weight * losses.score_distillation(x0_hat, branch["score"]),)
        return terms

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's output (as it predicts: ε or v) on conditioning `cond`, in fp32."""
        return self.family.denoise(self.denoiser, x, t, cond).float()

    def as_eps(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return as_eps(x_t, pred, self.alphas_cumprod[t], self.v_prediction)

    def capture(self, args: tuple[torch.Tensor, ...], align: bool) -> nn.Module:
        """`loss_terms` as one CUDA graph for the forward and one for the backward.

        make_graphed_callables runs 3 eager warm-up steps (no update), then captures; the backward graph
        yields the trainables' grads, which autograd accumulates into `.grad` as usual, so the loop's
        backward, optimizer step and zero_grad stay as they are. Replays read the parameters in place:
        the optimizer's in-place updates (and a resumed checkpoint's copy_) are seen.
        """
        step = _CapturedStep(self, align)
        # a second step kind (align_every > 1) captures into the first one's pool, so its activations reuse
        # the same memory: each graph's forward and backward replay back to back, never interleaved
        self.graph_pool = self.graph_pool or torch.cuda.graph_pool_handle()
        return torch.cuda.make_graphed_callables(step, tuple(a.clone() for a in args), allow_unused_input=True,
                                                 pool=self.graph_pool)

    def alignment_branch(self, x0_hat: torch.Tensor, batch: dict[str, torch.Tensor],
                         prompt_enc: torch.Tensor) -> dict[str, torch.Tensor]:
        """UNet calls of the alignment term and its score g (Eq. 4 / 6 / NFSD), all without grad."""
        # no grad: the alignment branch needs no backward of its own (Eq. 7). A `with`, not a decorator, so
        # mutation testing (mutmut skips decorated functions) reaches this body: docs/mutation.md
        with torch.no_grad():
            cfg = self.config
            t, eps_align = batch["t"], batch["eps_align"]
            alpha_bar = self.alphas_cumprod[t]
            x_hat_t = losses.add_noise(x0_hat.detach(), eps_align, alpha_bar)  # re-noise x̂_0, same t
            weight = losses.timestep_weight(alpha_bar, cfg.rescale)
            weight = weight * ((t >= cfg.align_t_range[0]) & (t < cfg.align_t_range[1]))
            if cfg.alignment == "palp" and self.fast.fold_alignment:
                uncond, cond, personalized = self.folded(x_hat_t, t, prompt_enc.detach())
                return alignment_score("palp", (uncond, cond), lambda: personalized, eps_align, t, cfg.alpha, weight)
            pre = self.pretrained(x_hat_t, t, *pretrained_prompts(self, cfg.alignment))  # LoRA off
            personalized = functools.partial(self.personalized, x_hat_t, t, prompt_enc.detach())  # PALP only
            return alignment_score(cfg.alignment, pre, personalized, eps_align, t, cfg.alpha, weight)

    def pretrained(self, x: torch.Tensor, t: torch.Tensor, *encodings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pre-trained UNet (LoRA off) on each constant prompt encoding: one call per encoding, or one
        batched call (FastPaths.batch_pretrained)."""
        n, b = len(encodings), len(x)
        xc = x.to(self.dtype)
        self.denoiser.disable_adapters()
        try:
            with self.autocast():
                if self.fast.batch_pretrained:
                    enc = torch.cat([e.expand(b, -1, -1) for e in encodings])
                    out = self.denoise(xc.repeat(n, 1, 1, 1), t.repeat(n), enc).chunk(n)
                else:
                    out = [self.denoise(xc, t, e.expand(b, -1, -1)) for e in encodings]
                return tuple(self.as_eps(x, o, t) for o in out)
        finally:
            self.denoiser.enable_adapters()

    def folded(self, x: torch.Tensor, t: torch.Tensor, prompt_enc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """PALP's no-grad calls as one: rows [∅, y^c] with LoRA off, then y_P (β = 1) or
        [∅, y_P] (β ≠ 1) with LoRA on. Returns (G(∅), G(y^c)) pre-trained and G^β_θLoRA(y_P)."""
        beta, b = self.config.beta, len(x)
        encodings = [self.empty_enc, self.clean_enc] + ([] if beta == 1.0 else [self.empty_enc]) + [prompt_enc]
        n = len(encodings)
        enc = torch.cat([e.expand(b, -1, -1).to(prompt_enc.dtype) for e in encodings])  # [n·B, 77, d]
        with self.autocast(), self.lora_from_row(2 * b):  # rows [:2B] pre-trained, the rest personalized
            pred = self.denoise(x.repeat(n, 1, 1, 1).to(self.dtype), t.repeat(n), enc).chunk(n)
        pred = [self.as_eps(x, p, t) for p in pred]
        personalized = pred[2] if beta == 1.0 else losses.cfg(pred[2], pred[3], beta)
        return pred[0], pred[1], personalized

    def personalized(self, x: torch.Tensor, t: torch.Tensor, prompt_enc: torch.Tensor) -> torch.Tensor:
        """G^β with LoRA on; β = 1 is the conditional call alone."""
        beta = self.config.beta
        with self.autocast():
            if beta == 1.0:
                return self.as_eps(x, self.denoise(x.to(self.dtype), t, prompt_enc), t)
            enc = torch.cat([self.empty_enc.expand(len(x), -1, -1).to(prompt_enc.dtype), prompt_enc])
            uncond, cond = self.denoise(x.repeat(2, 1, 1, 1).to(self.dtype), t.repeat(2), enc).chunk(2)
        return losses.cfg(self.as_eps(x, uncond, t), self.as_eps(x, cond, t), beta)


def constant_encodings(base: Base, config, device, autocast) -> tuple[torch.Tensor, ...]:
    """The pre-trained branch's conditionings, [1, L, D] each: ∅ (as the family's pipeline builds it for CFG),
    y^c, and NFSD's negative prompt, at a sample's size conditioning."""
    family = base.family
    time_ids = family.default_time_ids(config.resolution).to(device)
    with torch.no_grad(), autocast:
        empty = family.unconditional(base, device, config.resolution)
        clean, negative = (family.encode(base.encoders, family.tokenize(base, [p], device), time_ids)
                           for p in (config.clean_prompt, NFSD_NEGATIVE))
    return empty, clean, negative


class _CapturedStep(nn.Module):
    """`task.loss_terms` as a module whose parameters are the trainables alone (LoRA + placeholder rows):
    make_graphed_callables differentiates its parameters; the frozen weights are read in place."""

    def __init__(self, task: PalpTask, align: bool):
        super().__init__()
        self.trainables = nn.ParameterList([p for p in task.model.parameters() if p.requires_grad])
        self.loss_terms = task.loss_terms  # a bound method: the model is not registered twice
        self.align = align

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.loss_terms(*args, align=self.align)
