"""Adapter files that stock diffusers loads: LoRA weights, one learned_embeds file per placeholder, manifest.

    pipe = StableDiffusionPipeline.from_pretrained(manifest["base_model"])
    pipe.load_lora_weights(adapter_dir)
    pipe.load_textual_inversion(adapter_dir / "learned_embeds-V1.safetensors", token="[V1]")
"""

import json
import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .models import Base, add_lora, add_placeholders, load_base

LORA_FILE = "pytorch_lora_weights.safetensors"
MANIFEST_FILE = "manifest.json"


def embeds_file(token: str) -> str:
    return f"learned_embeds-{re.sub(r'[^A-Za-z0-9]+', '', token) or 'token'}.safetensors"


def export_adapter(directory: str | Path, unet, embedding, manifest: dict) -> Path:
    """Write `pytorch_lora_weights.safetensors`, `learned_embeds-*.safetensors` and `manifest.json`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(lora), weight_name=LORA_FILE,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),  # keeps lora_alpha: scale survives
    )
    files = {}
    for token, row in zip(embedding.tokens, embedding.rows):
        files[token] = embeds_file(token)
        # {token: [d]}: the layout of diffusers' textual_inversion example, read by load_textual_inversion
        save_file({token: row.detach().float().cpu().contiguous()}, directory / files[token])
    manifest = {**manifest, "lora_file": LORA_FILE, "embeddings": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter at {directory}: {MANIFEST_FILE} is missing")
    return json.loads(path.read_text())


def load_weights(directory: str | Path, unet, embedding) -> dict:
    """Load an exported adapter into the trainer's own modules (LoRA-wrapped UNet, PlaceholderEmbedding)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    lora = load_file(directory / manifest["lora_file"])
    lora = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in lora.items()})
    result = set_peft_model_state_dict(unet, lora)
    if result.unexpected_keys:
        raise ValueError(f"{directory}: LoRA keys do not match this model: {result.unexpected_keys[:3]}")
    with torch.no_grad():
        for i, token in enumerate(embedding.tokens):
            embedding.rows[i] = load_file(directory / manifest["embeddings"][token])[token]
    return manifest


def load_adapter(directory: str | Path, device: torch.device | str = "cpu") -> tuple[Base, dict]:
    """Base model named by the manifest + the adapter, as the trainer's own modules (for sampling)."""
    manifest = read_manifest(directory)
    base = load_base(manifest["base_model"])
    tokens = tuple(manifest["tokens"])
    embedding = add_placeholders(base.tokenizer, base.text_encoder, tokens,
                                 tuple(manifest["placeholders"][t] for t in tokens))
    add_lora(base.unet, manifest["rank"], manifest["lora_alpha"])
    load_weights(directory, base.unet, embedding)
    for module in (base.unet, base.text_encoder, base.vae):
        module.to(device)
    return base, manifest


def load_into_pipeline(pipe: StableDiffusionPipeline, directory: str | Path) -> dict:
    """Load an exported adapter into a stock pipeline with diffusers' own loaders; returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    pipe.load_lora_weights(directory, weight_name=manifest["lora_file"])
    for token, file in manifest["embeddings"].items():
        pipe.load_textual_inversion(directory / file, token=token)
    return manifest
