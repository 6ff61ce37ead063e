"""The built-in tiny base model: real diffusers/transformers classes at toy size, seeded.

Write it as a standard diffusers directory (loadable by `StableDiffusionPipeline.from_pretrained`):

    python -m palp_trainer.families.tiny DIR
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..config import TINY_RESOLUTION


# Whole-word merges for these words, so prompts tokenize into a handful of ids like real CLIP BPE.
_WORDS = (
    "a an the of and in on by at with photo photograph picture painting oil sketch drawing portrait "
    "watercolor style cat dog toy person man woman rock sitting inspired 19th century night paris "
    "city street beach snow forest vintage pencil anime cartoon standing wearing hat red blue "
    "coffee mug astronaut rocket art artwork van gogh starry sky studio close up"
).split()

# SD-1.x noise schedule (the one SD-1.4/1.5 were trained with)
SD1_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon",
)


def _bytes_to_unicode() -> dict[int, str]:
    # the byte -> printable-char table of GPT-2/CLIP byte-level BPE
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(words: tuple[str, ...] | list[str] = _WORDS, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built offline: all 256 byte symbols plus whole-word merges for `words`."""
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in sorted(words, key=len, reverse=True):  # longest first: prefixes merge before short words
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for sym in symbols[1:]:
            if f"{merged} {sym}" not in merges:
                merges.append(f"{merged} {sym}")
                vocab.append(merged + sym)
            merged += sym
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)}, merges=[tuple(m.split(" ")) for m in merges],
        pad_token="<|endoftext|>", model_max_length=max_length,
    )


def build_tiny() -> dict:
    """The tiny SD-1.x-shaped components, deterministic (seed 0)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_RESOLUTION,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=DDIMScheduler(**SD1_SCHEDULER, set_alpha_to_one=False))


def save_tiny(directory: str | Path) -> Path:
    """Write the tiny base as a diffusers StableDiffusionPipeline directory."""
    pipe = StableDiffusionPipeline(**build_tiny(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return Path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the built-in tiny base model as a diffusers directory.")
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    print(save_tiny(args.directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
