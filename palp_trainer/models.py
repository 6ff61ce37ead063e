"""Base model loading (tiny | hub id | diffusers directory), placeholder tokens, and the UNet LoRA."""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from .config import PREDICTIONS
from .tiny import SD1_SCHEDULER, build_tiny

WORLD_DIR = Path(__file__).parent / "assets" / "world"  # the pretrained world base (world_base.py), diffusers layout
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention projections (App. C)


@dataclass
class Base:
    """The frozen Stable Diffusion parts. `noise_scheduler` is the training (DDPM) schedule."""

    ref: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def resolve_base(ref: str) -> str:
    """"world" -> the packaged world base's directory; a storage URI (a base the sweep staged there) -> this
    node's cached copy; any other ref (hub id: the node's Hugging Face cache) as given."""
    from .storage import cached, is_remote
    if is_remote(ref):
        return str(cached(ref))
    return str(WORLD_DIR) if ref == "world" else ref


def load_base(ref: str = "tiny") -> Base:
    """`tiny` builds the toy model in code; anything else goes to `from_pretrained` (hub id or directory;
    "world" is the packaged pretrained world base, loaded from its directory like any diffusers model)."""
    name, ref = ref, resolve_base(ref)
    if ref == "tiny":
        parts = build_tiny()
        base = Base(ref, parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                    DDPMScheduler(**SD1_SCHEDULER))
    else:
        base = Base(
            name,
            CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(ref, subfolder="text_encoder"),
            AutoencoderKL.from_pretrained(ref, subfolder="vae"),
            UNet2DConditionModel.from_pretrained(ref, subfolder="unet"),
            DDPMScheduler.from_pretrained(ref, subfolder="scheduler"),
        )
    prediction = base.noise_scheduler.config.prediction_type
    if prediction not in PREDICTIONS:
        # Eq. 1-7 are written for ε; a v-model's outputs are converted (PalpTask.as_eps), an x_0-model's are not
        raise ValueError(f"base_model: {ref} uses prediction_type={prediction!r}; supported: "
                         f"{', '.join(PREDICTIONS)} (SD-1.x, SD-2.x base 512 and 768)")
    for module in (base.text_encoder, base.vae, base.unet):
        module.requires_grad_(False)
        module.eval()
    return base


class PlaceholderEmbedding(nn.Module):
    """The text encoder's token embedding with trainable rows for the placeholder ids.

    The base table stays frozen and bit-identical; ids >= `first_id` read from `rows` instead.
    """

    def __init__(self, base: nn.Embedding, first_id: int, init: torch.Tensor, tokens: tuple[str, ...]):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.tokens = tokens  # row i is tokens[i]
        self.rows = nn.Parameter(init.clone().float())  # [n_placeholders, d], fp32 master
        # a trial group's member rows, [K·n_placeholders, d], stand in for `rows` while set (group.GroupModel)
        self.override: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads `.weight` (resize, dtype checks); expose the merged table, detached
        w = self.base.weight.detach().clone()
        w[self.first_id:self.first_id + len(self.rows)] = self.rows.detach().to(w.dtype)
        return w

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_placeholder = input_ids >= self.first_id
        out = self.base(input_ids.clamp(max=self.first_id - 1))
        rows = self.rows if self.override is None else self.override
        picked = rows.to(out.dtype)[(input_ids - self.first_id).clamp(min=0)]
        return torch.where(is_placeholder[..., None], picked, out)


def add_placeholders(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                     tokens: tuple[str, ...], class_words: tuple[str, ...]) -> PlaceholderEmbedding:
    """Add [V1]..[Vn] as new tokens whose trainable rows start at their class word's embedding."""
    existing = [t for t in tokens if t in tokenizer.get_vocab()]
    if existing:
        raise ValueError(f"placeholder {existing[0]!r} is already a token of the base tokenizer; pick another")
    table = text_encoder.get_input_embeddings()
    init = []
    for token, word in zip(tokens, class_words):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"class word {word!r} of {token} tokenizes to nothing")
        init.append(table.weight[ids].mean(0))  # multi-token class word: mean of its pieces
    first_id = len(tokenizer)
    tokenizer.add_tokens(list(tokens))
    if tokenizer.convert_tokens_to_ids(list(tokens)) != list(range(first_id, first_id + len(tokens))):
        raise RuntimeError("placeholder ids are not contiguous after add_tokens")
    # grow the table so the ids are valid everywhere (pipelines, export); the new rows live in `rows`
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings()
    table.weight.requires_grad_(False)
    embedding = PlaceholderEmbedding(table, first_id, torch.stack(init), tuple(tokens))
    text_encoder.set_input_embeddings(embedding)
    return embedding


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None = None) -> list[nn.Parameter]:
    """peft LoRA on the attention projections; returns the trainable parameters (fp32)."""
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def masters_as(dtype: torch.dtype, *modules: nn.Module):
    """Inside, every parameter of `modules` not stored in `dtype` (the trainer's fp32 masters: LoRA weights,
    placeholder rows) computes as its cast to `dtype`, so the whole model runs in one dtype without autocast.

    The cast is differentiable: grads land on the fp32 masters, which the optimizer keeps updating (in place).
    One cast kernel per master per entry. The masters are registered again, in their order, on exit; the
    optimizer (and a CUDA graph) hold them throughout. For bf16 runs: peft then sees bf16 weights and bf16
    inputs (no per-layer input casts), and `.dtype` of a module reports the compute dtype.
    """
    owners = {}
    for module in modules:
        for m in module.modules():
            names = [n for n, p in m._parameters.items() if p is not None and p.is_floating_point() and p.dtype != dtype]
            if names and m not in owners:
                owners[m] = (dict(m._parameters), names)
    swapped = []
    try:
        for m, (params, names) in owners.items():
            swapped.append(m)
            for name in names:
                delattr(m, name)  # unregistered for the duration
                setattr(m, name, params[name].to(dtype))  # a plain tensor attribute
        yield
    finally:
        for m in swapped:  # those reached, if a cast failed (out of memory) halfway
            params, names = owners[m]
            for name in names:
                if name not in m._parameters:
                    m.__dict__.pop(name, None)
            m._parameters.clear()
            m._parameters.update(params)
