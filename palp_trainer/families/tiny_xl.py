"""The built-in tiny SDXL base: real diffusers/transformers classes at toy size, seeded (groundwork for SDXL).

SDXL's parts as `StableDiffusionXLPipeline` expects them: two CLIP text encoders (the second with a projection:
its pooled output conditions the UNet), their penultimate hidden states concatenated as the cross-attention
context ([B, 77, 32 + 32]), and the "text_time" added conditioning (pooled text [32] + 6 time ids x 8).

    python -m palp_trainer.families.tiny_xl DIR
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..config import TINY_RESOLUTION
from .tiny import SD1_SCHEDULER, build_tokenizer

TEXT_WIDTH = 32  # each encoder's hidden size; the UNet's context is both, concatenated
TIME_EMBED = 8  # per add_time_id (original size, crop top-left, target size: 6 ids)


def _text_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_xl() -> dict:
    """The tiny SDXL-shaped components, deterministic (seed 0)."""
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * TIME_EMBED, transformer_layers_per_block=(1, 1),
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_RESOLUTION, force_upcast=True,  # SDXL's VAE decodes in fp32 (fp16 NaNs otherwise)
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=EulerDiscreteScheduler(**{
                    k: v for k, v in SD1_SCHEDULER.items() if k != "clip_sample"}, timestep_spacing="leading"))


def save_tiny_xl(directory: str | Path) -> Path:
    """Write the tiny SDXL base as a diffusers StableDiffusionXLPipeline directory."""
    StableDiffusionXLPipeline(**build_tiny_xl()).save_pretrained(directory)
    return Path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the built-in tiny SDXL base as a diffusers directory.")
    parser.add_argument("directory")
    print(save_tiny_xl(parser.parse_args(argv).directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
