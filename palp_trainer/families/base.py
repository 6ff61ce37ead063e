"""Base model loading (tiny | hub id | diffusers directory), placeholder tokens, and the UNet LoRA."""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from ..config import PREDICTIONS, TrainConfig
from .sd import SD1, SDXL, family_of
from .tiny import SD1_SCHEDULER, build_tiny
from .tiny_xl import build_tiny_xl

WORLD_DIR = Path(__file__).parent.parent / "world" / "assets" / "base"  # the world base (world/pretrain.py), diffusers layout
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention projections (App. C)


@dataclass
class Base:
    """The frozen Stable Diffusion parts. `noise_scheduler` is the training (DDPM) schedule."""

    ref: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    denoiser: UNet2DConditionModel  # the denoising network: a UNet here; a transformer in SD3 / FLUX
    noise_scheduler: DDPMScheduler
    family: SD1 = SD1()  # what differs between model families (family.py)
    tokenizer_2: CLIPTokenizer | None = None  # SDXL's second tokenizer and encoder (clip_g)
    text_encoder_2: nn.Module | None = None

    @property
    def encoders(self) -> list[nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def frozen(self) -> list[nn.Module]:
        """Every module of the base: all frozen but the LoRA and placeholder rows added to them."""
        return [self.denoiser, *self.encoders, self.vae]


def resolve_base(ref: str) -> str:
    """"world" -> the packaged world base's directory; a storage URI (a base the sweep staged there) -> this
    node's cached copy; any other ref (hub id: the node's Hugging Face cache) as given."""
    from ..storage import cached, is_remote
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
    elif ref == "tiny_xl":
        parts = build_tiny_xl()
        base = Base(ref, parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                    DDPMScheduler(**SD1_SCHEDULER), SDXL(), parts["tokenizer_2"], parts["text_encoder_2"])
    else:
        family = family_of(ref)
        base = Base(name, family=family, **family.load(ref))
    prediction = base.noise_scheduler.config.prediction_type
    if prediction not in PREDICTIONS:
        # Eq. 1-7 are written for ε; a v-model's outputs are converted (PalpTask.as_eps), an x_0-model's are not
        raise ValueError(f"base_model: {ref} uses prediction_type={prediction!r}; supported: "
                         f"{', '.join(PREDICTIONS)} (SD-1.x, SD-2.x base 512 and 768)")
    for module in base.frozen:
        module.requires_grad_(False)
        module.eval()
    return base


class PlaceholderEmbedding(nn.Module):
    """The text encoder's token embedding with trainable rows for the placeholder ids.

    The base table stays frozen and bit-identical; ids >= `first_id` read from `rows` instead. With two text
    encoders (SDXL) `rows` is [n, d_l + d_g]: this table reads `columns` of it and the second encoder's
    `LinkedPlaceholderEmbedding` the rest, so one parameter (one optimizer entry, one checkpoint tensor, one
    trial-group override) holds the placeholder in both, as diffusers' SDXL scripts train clip_l and clip_g.
    """

    def __init__(self, base: nn.Embedding, first_id: int, init: torch.Tensor, tokens: tuple[str, ...],
                 columns: slice | None = None):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.tokens = tokens  # row i is tokens[i]
        self.columns = columns  # None: all of them (one text encoder), so the step has no slice to backpropagate
        self.rows = nn.Parameter(init.clone().float())  # [n_placeholders, d], fp32 master
        # a trial group's member rows, [K·n_placeholders, d], stand in for `rows` while set (group.GroupModel)
        self.override: torch.Tensor | None = None

    def current(self) -> torch.Tensor:
        """This table's placeholder rows: its columns of `rows`, or of a trial group's override."""
        rows = self.rows if self.override is None else self.override
        return rows if self.columns is None else rows[:, self.columns]

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads `.weight` (resize, dtype checks); expose the merged table, detached
        w = self.base.weight.detach().clone()
        rows = self.current().detach()
        w[self.first_id:self.first_id + len(rows)] = rows.to(w.dtype)
        return w

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_placeholder = input_ids >= self.first_id
        out = self.base(input_ids.clamp(max=self.first_id - 1))
        picked = self.current().to(out.dtype)[(input_ids - self.first_id).clamp(min=0)]
        return torch.where(is_placeholder[..., None], picked, out)


class LinkedPlaceholderEmbedding(PlaceholderEmbedding):
    """A second text encoder's table whose placeholder rows are `columns` of another table's `rows`."""

    def __init__(self, base: nn.Embedding, first_id: int, owner: PlaceholderEmbedding, columns: slice):
        nn.Module.__init__(self)
        self.base = base
        self.first_id = first_id
        self.tokens = owner.tokens
        self.columns = columns
        self.owner = (owner,)  # a tuple: not a submodule, so the rows are registered (and synced) once

    def current(self) -> torch.Tensor:
        owner = self.owner[0]
        return (owner.rows if owner.override is None else owner.override)[:, self.columns]


def add_placeholders(base: Base, tokens: tuple[str, ...], class_words: tuple[str, ...]) -> PlaceholderEmbedding:
    """Add [V1]..[Vn] as new tokens to every tokenizer of `base`; their trainable rows start at their class word's
    embedding in each encoder. Returns the table that owns the rows (the first encoder's)."""
    tables, firsts, inits = [], [], []
    for tokenizer, encoder in zip((base.tokenizer, base.tokenizer_2), base.encoders):
        existing = [t for t in tokens if t in tokenizer.get_vocab()]
        if existing:
            raise ValueError(f"placeholder {existing[0]!r} is already a token of the base tokenizer; pick another")
        table = encoder.get_input_embeddings()
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
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = encoder.get_input_embeddings()
        table.weight.requires_grad_(False)
        tables.append(table)
        firsts.append(first_id)
        inits.append(torch.stack(init))
    widths = [t.embedding_dim for t in tables]
    embedding = PlaceholderEmbedding(tables[0], firsts[0], torch.cat(inits, -1), tuple(tokens),
                                     slice(0, widths[0]) if len(tables) > 1 else None)
    base.text_encoder.set_input_embeddings(embedding)
    if base.text_encoder_2 is not None:
        base.text_encoder_2.set_input_embeddings(
            LinkedPlaceholderEmbedding(tables[1], firsts[1], embedding, slice(widths[0], sum(widths))))
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(config: TrainConfig, device: torch.device, base: Base | None = None):
    """Base model (`base`, or loaded from config.base_model) + placeholders + LoRA on `device`;
    frozen weights in the compute dtype."""
    dtype = DTYPES[config.precision]
    base = base or load_base(config.base_model)
    embedding = add_placeholders(base, config.tokens, tuple(s.class_word for s in config.subjects))
    lora_params = add_lora(base.denoiser, config.rank, config.lora_alpha)
    for module in base.frozen:
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)  # trainables stay fp32 masters
        module.to(device)
    return base, embedding, lora_params
