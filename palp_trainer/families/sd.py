"""Model families: what differs between SD-1.x/2.x and SDXL, in one object per family (docs/families.md).

The trainer, the trial groups, evaluation and export call these few methods and nothing family-specific:

- `load(ref)`: the parts of a diffusers folder or hub id (the tokenizers and text encoders, VAE, UNet, schedule);
- `tokenize(base, prompts, device)`: prompt ids, one row per prompt (SDXL: [N, 2, 77], one per tokenizer);
- `encode(encoders, ids, time_ids)`: the conditioning of those prompts as ONE tensor, [N, L, D];
- `denoise(denoiser, x, t, cond)`: the denoiser's (a UNet's) output on that conditioning;
- `unconditional(base, device, resolution)`: the conditioning of ∅, as the family's pipeline builds it for CFG;
- `retime(cond, time_ids)`: the conditioning at other sizes (a sample's instead of a photo's);
- `context(encoders, ids)`: the cross-attention tokens alone (AlignIT);
- `pipeline(base, scheduler)`: the stock diffusers pipeline that samples and loads the exported files.

One tensor per conditioning keeps every batch operation of the step (expand, cat, repeat, detach, DDP, CUDA
graphs) family-blind. SDXL's extra conditioning (the pooled text embedding of its second encoder and the six
`add_time_ids`) rides in one extra row after the 77 token rows: [pooled | 0 | time ids]; `denoise` splits it off
before the UNet sees the context. Predictions are converted to ε (v-prediction) by the task, for every family.

Another text-to-image UNet family is a new class here and an entry in FAMILIES; a flow-matching base also needs
its own noising and prediction type (docs/families.md).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

TIME_IDS = 6  # SDXL's add_time_ids: original (h, w), crop top-left (y, x), target (h, w)


@dataclass(frozen=True)
class SD1:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden states as the context."""

    name: str = "sd"
    pipeline_class: str = "StableDiffusionPipeline"
    label: str = "Stable Diffusion 1.x/2.x"

    def load(self, ref: str) -> dict:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        return dict(
            tokenizer=CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(ref, subfolder="text_encoder"),
            vae=AutoencoderKL.from_pretrained(ref, subfolder="vae"),
            denoiser=UNet2DConditionModel.from_pretrained(ref, subfolder="unet"),
            noise_scheduler=DDPMScheduler.from_pretrained(ref, subfolder="scheduler"),
        )

    def tokenize(self, base, prompts: list[str], device) -> torch.Tensor:
        return _ids(base.tokenizer, prompts).to(device)  # [N, 77]

    def encode(self, encoders, ids: torch.Tensor, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        return encoders[0](ids)[0]  # [N, 77, d]

    def denoise(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t, cond).sample

    def unconditional(self, base, device, resolution: int) -> torch.Tensor:
        return self.encode(base.encoders, self.tokenize(base, [""], device))

    def default_time_ids(self, resolution: int, n: int = 1) -> torch.Tensor:
        """What a sample of `resolution` px is conditioned on: original size = target size, no crop (what
        StableDiffusionXLPipeline passes when a call gives no sizes)."""
        return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32).repeat(n, 1)

    def retime(self, cond: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """`cond` with its size conditioning replaced (SDXL); SD-1.x has none."""
        return cond

    def context(self, encoders, ids: torch.Tensor) -> torch.Tensor:
        """The cross-attention tokens alone, [N, 77, D] (what AlignIT's K/V swap reads)."""
        return self.encode(encoders, ids)

    def pipeline(self, base, scheduler):
        """The stock diffusers pipeline around `base`'s in-memory modules (no reload)."""
        from diffusers import StableDiffusionPipeline
        return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.denoiser, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


@dataclass(frozen=True)
class SDXL(SD1):
    """SDXL: two CLIP text encoders (clip_l, clip_g), both penultimate hidden states concatenated as the
    context, the second's projected pooled output and add_time_ids as added conditioning ("text_time")."""

    name: str = "sdxl"
    pipeline_class: str = "StableDiffusionXLPipeline"
    label: str = "Stable Diffusion XL"

    def load(self, ref: str) -> dict:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer
        parts = super().load(ref)
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(ref, subfolder="text_encoder_2")
        return parts

    def tokenize(self, base, prompts: list[str], device) -> torch.Tensor:
        return torch.stack([_ids(base.tokenizer, prompts), _ids(base.tokenizer_2, prompts)], 1).to(device)

    def encode(self, encoders, ids: torch.Tensor, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        # StableDiffusionXLPipeline.encode_prompt: penultimate states of both, the pooled output of the second
        first = encoders[0](ids[:, 0], output_hidden_states=True).hidden_states[-2]
        second = encoders[1](ids[:, 1], output_hidden_states=True)
        context = torch.cat([first, second.hidden_states[-2]], -1)  # [N, 77, d_l + d_g]
        return self.pack(context, second.text_embeds, time_ids)

    def pack(self, context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """[N, 77, D] + pooled [N, P] + time ids [N, 6] -> [N, 78, D]; the last row is [pooled | 0 | time ids]."""
        n, _, width = context.shape
        if pooled.shape[-1] + TIME_IDS > width:
            raise ValueError(f"SDXL: pooled width {pooled.shape[-1]} + {TIME_IDS} time ids exceed the context "
                             f"width {width}")
        gap = context.new_zeros(n, width - pooled.shape[-1] - TIME_IDS)
        time_ids = time_ids.to(context.device, context.dtype).expand(n, -1)
        return torch.cat([context, torch.cat([pooled.to(context.dtype), gap, time_ids], -1)[:, None]], 1)

    def denoise(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        config = denoiser.config
        pooled = config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim
        row = cond[:, -1]
        added = {"text_embeds": row[:, :pooled], "time_ids": row[:, -TIME_IDS:]}
        return denoiser(x, t, cond[:, :-1], added_cond_kwargs=added).sample

    def unconditional(self, base, device, resolution: int) -> torch.Tensor:
        # force_zeros_for_empty_prompt (the SDXL default): ∅ is zeros, text and pooled alike, with the sample's sizes
        width = base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
        dtype = base.text_encoder_2.dtype  # as the encoders' outputs: the compute dtype without autocast
        context = torch.zeros(1, base.tokenizer.model_max_length, width, device=device, dtype=dtype)
        pooled = torch.zeros(1, base.text_encoder_2.config.projection_dim, device=device, dtype=dtype)
        return self.pack(context, pooled, self.default_time_ids(resolution))

    def retime(self, cond: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        time_ids = time_ids.to(cond.device, cond.dtype).expand(len(cond), -1)
        return torch.cat([cond[:, :-1], torch.cat([cond[:, -1, :-TIME_IDS], time_ids], -1)[:, None]], 1)

    def context(self, encoders, ids: torch.Tensor) -> torch.Tensor:
        return self.encode(encoders, ids, torch.zeros(1, TIME_IDS))[:, :-1]

    def pipeline(self, base, scheduler):
        from diffusers import StableDiffusionXLPipeline
        return StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                         text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
                                         tokenizer_2=base.tokenizer_2, unet=base.denoiser, scheduler=scheduler,
                                         add_watermarker=False)


def _ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


FAMILIES = {f.pipeline_class: f for f in (SD1(), SDXL())}
BUILT_IN = {"tiny": "StableDiffusionPipeline", "world": "StableDiffusionPipeline",
            "tiny_xl": "StableDiffusionXLPipeline"}


def family_named(class_name: str | None):
    """The family of a diffusers pipeline class; ValueError for one the trainer does not support."""
    if class_name not in FAMILIES:
        supported = ", ".join(f"{f.label} ({c})" for c, f in FAMILIES.items())
        raise ValueError(f"is a {class_name}; supported: {supported}")
    return FAMILIES[class_name]


def family_of(ref: str):
    """The family of a built-in name, a diffusers folder or a hub id (its model_index.json, from the cache)."""
    if ref in BUILT_IN:
        return FAMILIES[BUILT_IN[ref]]
    index = Path(ref) / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name")
    else:
        from diffusers import DiffusionPipeline
        name = DiffusionPipeline.load_config(ref).get("_class_name")
    try:
        return family_named(name)
    except ValueError as e:
        raise ValueError(f"base_model: {ref} {e}") from None
