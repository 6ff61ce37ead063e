"""Inference-time methods on a trained adapter: plain CFG, personalization guidance, AlignIT.

All three sample through `sampling.generate` (same seeds, same scheduler, one batched UNet call per step):

- `cfg`:     ε̃ = ε_ft(x_t, ∅) + w·(ε_ft(x_t, y) − ε_ft(x_t, ∅)).
- `pg`:      ε̃ = ε_ω(x_t, ∅) + w·(ε_ft(x_t, y) − ε_ω(x_t, ∅)), θ_ω = θ_pre + ω·(θ_ft − θ_pre), i.e. the LoRA
             at scale ω (personalization guidance). The scale is per row of the CFG batch: ω on the
             unconditional half, 1 on the conditional half (`lora_row_scale`).
- `alignit`: the base model (LoRA at scale 0) samples p = prompt with class words; in every cross-attention
             layer the K, V of the class-word tokens are overwritten with the personalized model's K, V of
             p′ (placeholders kept, every other token "*") (AlignIT, Algorithm 1).
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from PIL import Image

from ..config import DEFAULT_OMEGA, METHODS, check_omega
from ..families.sd import family_named
from .pipeline import generate


def sample(pipe, prompt: str, method: str, *, omega: float = DEFAULT_OMEGA, seeds, steps: int,
           guidance_scale: float, batch_size: int, resolution: int,
           placeholders: dict[str, str] | None = None) -> list[Image.Image]:
    """One image per seed with `method` ("cfg" | "pg" | "alignit"); an image depends only on its seed,
    so the methods are compared on identical starting noise. `placeholders`: token -> class word."""

    def run(text: str) -> list[Image.Image]:
        return generate(pipe, text, tuple(seeds), steps, guidance_scale, batch_size, resolution)

    if method == "cfg":
        return run(prompt)
    cfg = _does_cfg(pipe, guidance_scale)
    if method == "pg":
        omega = check_omega(omega)
        if not cfg:
            raise ValueError(f"pg: personalization guidance changes the unconditional branch of CFG; "
                             f"guidance_scale must be > 1, got {guidance_scale}")
        with lora_row_scale(pipe.unet, uncond=omega, cond=1.0):
            return run(prompt)
    if method == "alignit":
        prompts = alignit_prompts_for(pipe, prompt, placeholders or {})
        with alignit(pipe, prompts, cfg):
            return run(prompts.base_prompt)
    raise ValueError(f"method: unknown {method!r}; choose from {', '.join(METHODS)}")


def _does_cfg(pipe, guidance_scale: float) -> bool:
    # StableDiffusionPipeline.do_classifier_free_guidance, before the call sets it
    return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


# --- personalization guidance: LoRA scale per row of the UNet batch --------------------------------------

@contextmanager
def lora_row_scale(unet, uncond: float, cond: float):
    """Inside, every peft LoRA layer of `unet` adds `s·scaling·B(A(x))` with s = `uncond` on the first half of
    the batch (CFG's unconditional rows, the pipeline's `cat([negative, positive])`) and s = `cond` on the rest.

    A forward hook on each `lora_B` multiplies its output [N, L, d_out] by a [N, 1, 1] factor before peft's
    `* scaling`, so one batched UNet call serves both branches; `uncond = cond = 1` is bit-identical to no hook.
    """
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("the UNet has no LoRA layers: personalization guidance interpolates a LoRA")
    for layer in layers:
        if layer.merged or any(a in layer.lora_variant for a in layer.active_adapters):
            raise ValueError("lora_row_scale needs unmerged, plain LoRA layers (no fuse_lora, no DoRA)")

    def scale_rows(module, args, out):
        n = out.shape[0]
        factor = torch.full((n,) + (1,) * (out.ndim - 1), cond, dtype=out.dtype, device=out.device)
        factor[: n // 2] = uncond
        return out * factor

    handles = [layer.lora_B[a].register_forward_hook(scale_rows)
               for layer in layers for a in layer.active_adapters if a in layer.lora_B]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- AlignIT ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlignITPrompts:
    """p, p′ and the token positions i where K_p[i], V_p[i] are replaced by K_p′[i], V_p′[i].

    Positions are the same in p and p′: every token of p outside a class word becomes one "*" in p′, and each
    class word's span of n tokens becomes, in p′, n − m "*" followed by the placeholder's m tokens (m = 1 for
    our adapters). So the placeholder sits at its class word's last token, and all n class-word positions
    carry the personalized model's K, V (the filler "*" ones too: no base class-word K, V is left behind)."""

    base_prompt: str  # p, as the pipeline tokenizes it
    personal_ids: torch.Tensor  # p′, [1, model_max_length] token ids (padded)
    positions: tuple[int, ...]  # indices into the 77 tokens (0 = BOS)


def alignit_prompts(tokenizer, prompt: str, placeholders: dict[str, str]) -> AlignITPrompts:
    """Build p and p′ by tokenizing each piece of `prompt` (text between placeholders, class word, placeholder)."""
    if not placeholders:
        raise ValueError("alignit: no placeholders given (token -> class word)")
    pattern = "(" + "|".join(re.escape(t) for t in sorted(placeholders, key=len, reverse=True)) + ")"
    pieces = re.split(pattern, prompt)  # [text, token, text, token, ..., text]
    if len(pieces) == 1:
        raise ValueError(f"alignit: the prompt {prompt!r} holds none of the placeholders {', '.join(placeholders)}")
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    star = encode("*")
    if len(star) != 1:
        raise ValueError(f"alignit: '*' is {len(star)} tokens for this tokenizer; p′ needs a single-token filler")
    p_ids, personal, positions = [], [], []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:  # plain text: kept in p, one "*" per token in p′
            ids = encode(piece) if piece.strip() else []
            p_ids += ids
            personal += star * len(ids)
            continue
        word, token = encode(placeholders[piece]), encode(piece)
        if len(token) > len(word):
            raise ValueError(f"alignit: {piece} is {len(token)} tokens but its class word "
                             f"{placeholders[piece]!r} only {len(word)}; the spans cannot be aligned")
        start = 1 + len(p_ids)  # +1: BOS
        positions += range(start, start + len(word))
        p_ids += word
        personal += star * (len(word) - len(token)) + token
    base_prompt = "".join(placeholders.get(piece, piece) if k % 2 else piece for k, piece in enumerate(pieces))
    whole = encode(base_prompt)
    if whole != p_ids:  # tokenizing piecewise must agree with what the pipeline will tokenize
        raise ValueError(f"alignit: {base_prompt!r} tokenizes differently as a whole than piece by piece; "
                         "put spaces around the placeholders")
    length = tokenizer.model_max_length
    if len(personal) + 2 > length:
        raise ValueError(f"alignit: the prompt is {len(personal)} tokens; at most {length - 2} fit")
    ids = [tokenizer.bos_token_id, *personal, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (length - len(ids))
    return AlignITPrompts(base_prompt, torch.tensor([ids]), tuple(positions))


def alignit_prompts_for(pipe, prompt: str, placeholders: dict[str, str]) -> AlignITPrompts:
    """`alignit_prompts` for each of the pipeline's tokenizers (SDXL: two), the placeholders at the same positions
    in each; personal_ids [1, 77] or, with two, [1, 2, 77] (family.SDXL.tokenize's layout)."""
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) is not None else [])
    each = [alignit_prompts(tokenizer, prompt, placeholders) for tokenizer in tokenizers]
    if any(p.positions != each[0].positions for p in each):
        raise ValueError("alignit: the placeholders sit at different token positions for the two tokenizers")
    if len(each) == 1:
        return each[0]
    return AlignITPrompts(each[0].base_prompt, torch.stack([p.personal_ids[0] for p in each])[None], each[0].positions)


def _key_value_input(attn, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    return attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states


class AlignITProcessor:
    """Cross-attention (attn2) processor: AttnProcessor2_0 with the K, V of the conditional rows overwritten
    at `positions` by the personalized `key`, `value` [len(positions), inner_dim] of p′.

    CFG's unconditional rows (the first half when `cfg`) stay the base model's: AlignIT changes the concept's
    conditioning only, and the guidance direction is then measured against the unchanged base ∅ prediction."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, positions: tuple[int, ...], cfg: bool):
        self.key, self.value, self.positions, self.cfg = key, value, list(positions), cfg

    def key_value(self, attn, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 77, inner] each; base K, V except the infused conditional rows/positions."""
        states = _key_value_input(attn, encoder_hidden_states)
        key, value = attn.to_k(states), attn.to_v(states)
        first = key.shape[0] // 2 if self.cfg else 0
        key[first:, self.positions] = self.key.to(key.dtype)
        value[first:, self.positions] = self.value.to(value.dtype)
        return key, value

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attn.spatial_norm is not None \
                or attn.group_norm is not None:
            raise ValueError("AlignITProcessor handles SD-1.x/2.x cross-attention ([B, L, C] tokens, text K/V)")
        residual = hidden_states
        batch, length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        key, value = self.key_value(attn, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)  # [N, heads, L_img, head_dim]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def alignit(pipe, prompts: AlignITPrompts, cfg: bool):
    """Inside, `pipe` is the base model (LoRA at scale 0) whose cross-attention layers infuse the personalized
    K, V of p′. Those are computed once on entry, with the adapter as it is (LoRA and learned embeddings on)."""
    unet = pipe.unet
    originals = unet.attn_processors
    processors = dict(originals)
    with torch.no_grad():
        # [1, 77, d]; the learned placeholder rows live in the text encoders' embeddings (SDXL: both, concatenated)
        family = family_named(type(pipe).__name__)
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
        states = family.context(encoders, prompts.personal_ids.to(pipe.text_encoder.device)).to(unet.dtype)
        for name in originals:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            if attn.is_cross_attention:
                personal = _key_value_input(attn, states)[0, list(prompts.positions)]  # [P, d]
                processors[name] = AlignITProcessor(attn.to_k(personal), attn.to_v(personal), prompts.positions, cfg)
    has_lora = any(isinstance(m, LoraLayer) for m in unet.modules())
    unet.set_attn_processor(processors)
    try:
        if has_lora:
            with lora_row_scale(unet, uncond=0.0, cond=0.0):  # the base model, exactly (x + 0·Δ = x)
                yield
        else:  # textual inversion alone: the UNet is already the base model
            yield
    finally:
        unet.set_attn_processor(dict(originals))
