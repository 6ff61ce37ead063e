"""The export for ComfyUI / AUTOMATIC1111 / kohya tools: every LoRA key is one those loaders map, and diffusers'
own kohya and A1111 loaders reproduce the diffusers-format samples.

The key rules below are re-stated from the loaders' source (read at the commits named), not imported:
- kohya-ss/sd-scripts, networks/lora.py, LoRANetwork.create_modules (48d368fa): for each module whose class is in
  UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"], each child Linear / Conv2d gets a LoRA named
  "lora_unet" + "." + module name + "." + child name, with "." -> "_". create_network_from_weights builds only the
  modules whose names are in the file and loads the file non-strictly: a key outside these names is dropped silently.
- comfyanonymous/ComfyUI, comfy/lora.py model_lora_keys_unet + comfy/utils.py unet_to_diffusers (00728eb2): every
  diffusers UNet weight of the model's layout k (for transformer blocks: down/mid/up attentions' TRANSFORMER_BLOCKS,
  attn1/attn2 to_q/to_k/to_v/to_out.0) maps as "lora_unet_" + k[:-len(".weight")] with "." -> "_"; load_lora reads
  "<name>.lora_up.weight", "<name>.lora_down.weight" and "<name>.alpha" and warns of keys it did not load.
- AUTOMATIC1111/stable-diffusion-webui, extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis
  (873edba4): SD-1.x "lora_unet_down_blocks_{b}_attentions_{i}_{rest}" -> "diffusion_model_input_blocks_{1+3b+i}_1_
  {rest}", mid -> "diffusion_model_middle_block_1_{rest}", up -> "diffusion_model_output_blocks_{3b+i}_1_{rest}",
  then looked up among the LDM model's module names ("." -> "_"); network.py reads ss_output_name, ss_v2 and
  ss_base_model_version from the metadata.
"""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from palp_trainer.config import SubjectSpec
from palp_trainer.export.adapter import export_adapter, load_into_pipeline, read_manifest
from palp_trainer.export.adapter import manifest
from palp_trainer.export.kohya import kohya_state_dict, lora_name, trigger_words
from palp_trainer.families.base import add_lora
from palp_trainer.families.tiny import build_tiny, save_tiny
from palp_trainer.families.tiny_xl import save_tiny_xl
from tests.conftest import tiny_config, trained_looking, write_images

RANK, LORA_ALPHA = 4, 8.0  # scale 2: a loader that ignored .alpha (scale 1) would draw other images
TOLERANCE = 1e-5  # max abs difference of float images in [0, 1]


def kohya_network_names(unet) -> set[str]:
    """The LoRA module names kohya's LoRANetwork creates for this UNet (sd-scripts networks/lora.py create_modules)."""
    names = set()
    for name, module in unet.named_modules():
        if module.__class__.__name__ in ["Transformer2DModel"]:
            for child_name, child in module.named_modules():
                if child.__class__.__name__ in ("Linear", "Conv2d"):
                    names.add(("lora_unet" + "." + name + "." + child_name).replace(".", "_"))
    return names


# ComfyUI's unet_config for SD-1.x, as comfy/model_detection.py detects it from an SD-1.5 checkpoint
SD1_UNET_CONFIG = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                       transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)
ATTENTION_WEIGHTS = [f"attn{a}.to_{p}.weight" for a in (1, 2) for p in ("q", "k", "v", "out.0")]


def comfy_attention_map(config: dict) -> dict[str, str]:
    """diffusers key -> LDM key of the transformer blocks' attention weights (comfy/utils.py unet_to_diffusers)."""
    out = {}
    depth, depth_output = list(config["transformer_depth"]), list(config["transformer_depth_output"])
    for x, blocks in enumerate(config["num_res_blocks"]):
        n = 1 + (blocks + 1) * x
        for i in range(blocks):
            for t in range(depth.pop(0)):
                for b in ATTENTION_WEIGHTS:
                    out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                        f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
            n += 1
    for t in range(config["transformer_depth_middle"]):
        for b in ATTENTION_WEIGHTS:
            out[f"mid_block.attentions.0.transformer_blocks.{t}.{b}"] = f"middle_block.1.transformer_blocks.{t}.{b}"
    for x, blocks in enumerate(reversed(config["num_res_blocks"])):
        n = (blocks + 1) * x
        for i in range(blocks + 1):
            for t in range(depth_output.pop()):
                for b in ATTENTION_WEIGHTS:
                    out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                        f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
            n += 1
    return out


def comfy_lora_keys(config: dict) -> dict[str, str]:
    """kohya name -> LDM weight, as comfy/lora.py model_lora_keys_unet builds it from unet_to_diffusers."""
    return {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): "diffusion_model." + v
            for k, v in comfy_attention_map(config).items()}


def a1111_compvis_name(name: str) -> str:
    """extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis, the SD-1.x attention cases."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", name):
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    if m := re.match(r"lora_unet_mid_block_attentions_(\d+)_(.+)", name):
        return f"diffusion_model_middle_block_1_{m[2]}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", name):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    return name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny adapter of two subjects with large random LoRA and placeholder rows, exported (base saved as a folder)."""
    root = tmp_path_factory.mktemp("kohya")
    base_dir = save_tiny(root / "base")
    subjects = (SubjectSpec("cat", "[V1]", "cat", write_images(root / "cat", 2, seed=0), "A photo of [V1]"),
                SubjectSpec("mug", "[V2]", "mug", write_images(root / "mug", 2, seed=1), "A photo of [V2]"))
    config = tiny_config((), root / "run", subjects=subjects, base_model=str(base_dir), rank=RANK,
                         lora_alpha=LORA_ALPHA, target_prompt="A sketch of [V1] and [V2]",
                         clean_prompt="A sketch of cat and mug")
    base, embedding = trained_looking(config)
    adapter = export_adapter(root / "adapter", base.denoiser, embedding, manifest(config, 2))
    return adapter, base_dir, base.denoiser


def test_every_key_is_one_kohya_comfyui_and_a1111_map(exported):
    adapter, base_dir, trained = exported
    m = read_manifest(adapter)
    assert m["kohya_lora"] == "kohya/palp_cat_mug.safetensors"
    lora = load_file(adapter / m["kohya_lora"])
    modules = {k.split(".", 1)[0] for k in lora}
    assert set(lora) == {f"{n}.{part}" for n in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}

    fresh = build_tiny()["unet"]  # no LoRA: the plain module tree kohya walks
    assert modules <= kohya_network_names(fresh)
    lora_layers = {n for n, mod in trained.named_modules() if hasattr(mod, "lora_A")}
    assert len(modules) == len(lora_layers) == 32  # every LoRA'd layer: (q, k, v, out) x attn1/2 x 4 blocks
    linear = dict(fresh.named_modules())
    for name in lora_layers:
        kohya = "lora_unet_" + name.replace(".", "_")
        assert lora[f"{kohya}.lora_down.weight"].shape == (RANK, linear[name].in_features)
        assert lora[f"{kohya}.lora_up.weight"].shape == (linear[name].out_features, RANK)
        assert lora[f"{kohya}.alpha"].shape == () and lora[f"{kohya}.alpha"].item() == LORA_ALPHA

    with safe_open(adapter / m["kohya_lora"], "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert {k: meta[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                                 "ss_v2", "ss_output_name")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_output_name": "palp_cat_mug"}
    assert "[V1] = palp_cat_v1" in meta["ss_training_comment"]
    assert meta["ss_sd_model_name"] == "base" and not any(str(base_dir) in v for v in meta.values())  # no path


def test_sd15_layout_maps_in_comfyui_and_a1111_to_the_same_layers():
    # SD-1.5's UNet (the diffusers defaults with CLIP-L's 768-wide context), on the meta device: no weights
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        add_lora(unet, 32)
    names = {k.split(".", 1)[0] for k in kohya_state_dict(get_peft_model_state_dict(unet), 32)}
    comfy = comfy_lora_keys(SD1_UNET_CONFIG)
    assert len(names) == 128 and names <= kohya_network_names(unet)  # 16 transformer blocks x 2 attn x 4
    assert names == set(comfy)  # ComfyUI maps every key, and there is no attention layer the export leaves out
    for name in names:  # A1111 patches the very LDM layer ComfyUI does
        assert a1111_compvis_name(name) == comfy[name].removesuffix(".weight").replace(".", "_")


def sample(pipe, prompt, seed=3):
    return pipe(prompt, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def stock(base_dir):
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_for_tools(pipe, adapter, lora_file):
    """What a kohya/A1111 user has: the kohya LoRA and one embedding file per trigger word."""
    m = read_manifest(adapter)
    pipe.load_lora_weights(lora_file)  # diffusers detects the kohya layout (lora_conversion_utils)
    for token, file in m["a1111_embeddings"].items():
        pipe.load_textual_inversion(adapter / file, token=m["triggers"][token])
    return m


def test_diffusers_kohya_loader_reproduces_the_diffusers_samples(exported, tmp_path):
    adapter, base_dir, _ = exported
    diffusers_pipe = stock(base_dir)
    plain = sample(diffusers_pipe, "A sketch of cat and mug")
    load_into_pipeline(diffusers_pipe, adapter)
    want = sample(diffusers_pipe, "A sketch of [V1] and [V2]")

    tools_pipe = stock(base_dir)
    m = load_for_tools(tools_pipe, adapter, adapter / read_manifest(adapter)["kohya_lora"])
    assert m["triggers"] == {"[V1]": "palp_cat_v1", "[V2]": "palp_mug_v2"}
    got = sample(tools_pipe, "A sketch of palp_cat_v1 and palp_mug_v2")
    assert np.abs(got - want).max() < TOLERANCE
    assert np.abs(want - plain).max() > 1e-2  # the adapter really changes the image

    # mutation: alpha = rank (what diffusers' convert_state_dict_to_kohya writes) must fail the tolerance
    lora = load_file(adapter / m["kohya_lora"])
    wrong = tmp_path / "alpha-is-rank.safetensors"
    save_file({k: torch.tensor(float(RANK)) if k.endswith(".alpha") else v for k, v in lora.items()}, wrong)
    mutated = stock(base_dir)
    load_for_tools(mutated, adapter, wrong)
    assert np.abs(sample(mutated, "A sketch of palp_cat_v1 and palp_mug_v2") - want).max() > 100 * TOLERANCE


def test_embeddings_are_a1111_safetensors_named_by_trigger(exported):
    adapter, _, _ = exported
    m = read_manifest(adapter)
    assert m["a1111_embeddings"] == {"[V1]": "embeddings/palp_cat_v1.safetensors",
                                     "[V2]": "embeddings/palp_mug_v2.safetensors"}
    for token, file in m["a1111_embeddings"].items():
        emb = load_file(adapter / file)  # safetensors: no pickle to run
        assert list(emb) == ["emb_params"] and emb["emb_params"].shape == (1, 32)  # [n_vectors, text width]
        assert torch.equal(emb["emb_params"][0], load_file(adapter / m["embeddings"][token])[token])
    assert not list(adapter.rglob("*.pt")) and not list(adapter.rglob("*.ckpt"))
    assert json.loads((adapter / "manifest.json").read_text())["triggers"] == m["triggers"]


def test_trigger_words_are_plain_and_unique():
    subjects = [{"name": "Cat", "token": "[V1]"}, {"name": "cat", "token": "<v1>"}, {"name": "My Mug!", "token": "*"}]
    assert trigger_words(subjects) == {"[V1]": "palp_cat_v1", "<v1>": "palp_cat_v1_2", "*": "palp_my_mug"}
    assert lora_name(subjects) == "palp_cat_cat_my_mug"


# --- SDXL: kohya's SDXL networks, A1111 and ComfyUI name SDXL LoRA modules by the original (SGM) UNet's layers --
# ComfyUI's unet_config for SDXL, as comfy/supported_models.py SDXL + comfy/model_detection.py give it
SDXL_UNET_CONFIG = dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)


def test_sdxl_layout_is_named_as_comfyui_a1111_and_kohya_name_sdxl_layers():
    # SDXL-base's UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), on the meta device
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        add_lora(unet, 32)
    names = {k.split(".", 1)[0] for k in kohya_state_dict(get_peft_model_state_dict(unet), 32, sgm_layers=2)}
    # ComfyUI's own key for a weight of the LDM model: "lora_unet_" + its name after "diffusion_model.", "." -> "_";
    # A1111 replaces "lora_unet" with "diffusion_model" and looks that up among the LDM module names
    ldm = {"lora_unet_" + v.removesuffix(".weight").replace(".", "_") for v in comfy_attention_map(SDXL_UNET_CONFIG).values()}
    assert len(names) == 560 and names == ldm  # 70 transformer blocks x 2 attn x 4, none left out


@pytest.fixture(scope="module")
def exported_xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya_xl")
    base_dir = save_tiny_xl(root / "base")
    subjects = (SubjectSpec("cat", "[V1]", "cat", write_images(root / "cat", 2, seed=0), "A photo of [V1]"),)
    config = tiny_config((), root / "run", subjects=subjects, base_model=str(base_dir), rank=RANK,
                         lora_alpha=LORA_ALPHA)
    base, embedding = trained_looking(config)
    return export_adapter(root / "adapter", base.denoiser, embedding, manifest(config, 2, base)), base_dir


def test_sdxl_kohya_lora_and_a1111_embeddings_reproduce_the_diffusers_samples(exported_xl):
    adapter, base_dir = exported_xl
    m = read_manifest(adapter)
    with safe_open(adapter / m["kohya_lora"], "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in keys)  # SGM names, as kohya's SDXL LoRAs have them
    emb = load_file(adapter / m["a1111_embeddings"]["[V1]"])
    assert {k: tuple(v.shape) for k, v in emb.items()} == {"clip_l": (1, 32), "clip_g": (1, 32)}

    def xl_pipe():
        pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    diffusers_pipe = xl_pipe()
    plain = sample(diffusers_pipe, "A sketch of cat")
    load_into_pipeline(diffusers_pipe, adapter)
    want = sample(diffusers_pipe, "A sketch of [V1]")
    tools = xl_pipe()
    tools.load_lora_weights(adapter / m["kohya_lora"])  # diffusers maps kohya's SGM names back (lora_conversion_utils)
    word = m["triggers"]["[V1]"]
    tools.load_textual_inversion(emb["clip_l"], token=word, text_encoder=tools.text_encoder, tokenizer=tools.tokenizer)
    tools.load_textual_inversion(emb["clip_g"], token=word, text_encoder=tools.text_encoder_2,
                                 tokenizer=tools.tokenizer_2)
    got = sample(tools, f"A sketch of {word}")
    assert np.abs(got - want).max() < TOLERANCE
    assert np.abs(want - plain).max() > 1e-2  # the adapter really changes the image
