"""Adapter files for the tools people use: the LoRA in kohya's layout (ComfyUI, AUTOMATIC1111/Forge, kohya's
sd-scripts) and one A1111-style textual-inversion embedding per subject, named by its trigger word.

    adapter/kohya/palp_cat.safetensors          -> ComfyUI models/loras,      A1111/Forge models/Lora
    adapter/embeddings/palp_cat_v1.safetensors  -> ComfyUI models/embeddings, A1111/Forge embeddings

In those UIs "[V1]" is prompt-weighting syntax, so each placeholder gets a plain trigger word (the embedding's
file name, which is how A1111, ComfyUI and sd-scripts name an embedding): "A sketch of [V1]" in diffusers is
"A sketch of palp_cat_v1 <lora:palp_cat:1>" in A1111 and "A sketch of embedding:palp_cat_v1" in ComfyUI.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

KOHYA_DIR = "kohya"
EMBEDDINGS_DIR = "embeddings"
# the peft LoRA factors and their kohya names: lora_A [r, in] is kohya's lora_down, lora_B [out, r] its lora_up
_FACTORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def _slug(text: str) -> str:
    return "_".join(re.findall(r"[a-z0-9]+", text.lower()))


def trigger_words(subjects: list[dict]) -> dict[str, str]:
    """{token: trigger}: "palp_" + subject name + token, e.g. {"[V1]": "palp_cat_v1"}; lowercase, no brackets,
    unique within the adapter (a clash gets a numeric suffix, so no file overwrites another)."""
    triggers: dict[str, str] = {}
    for s in subjects:
        word = base = "_".join(filter(None, ("palp", _slug(s["name"]), _slug(s["token"]))))
        n = 1
        while word in triggers.values():
            n += 1
            word = f"{base}_{n}"
        triggers[s["token"]] = word
    return triggers


def lora_name(subjects: list[dict]) -> str:
    """The LoRA's file name and ss_output_name (what A1111 calls it: <lora:palp_cat:1>)."""
    return "_".join(["palp", *(_slug(s["name"]) for s in subjects)])


def sgm_name(module: str, layers_per_block: int) -> str:
    """A diffusers UNet attention module's name in the original (SGM/LDM) UNet, which SDXL LoRAs use: the i-th
    attention of down block b is input_blocks.{1 + (layers + 1)·b + i}.1, of up block b output_blocks.{(layers + 1)·b
    + i}.1, the mid block's middle_block.1 (ComfyUI's comfy/utils.py unet_to_diffusers, the same rule)."""
    n = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        return f"input_blocks.{1 + n * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        return f"output_blocks.{n * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"kohya export: no SGM name for UNet module {module}")


def kohya_state_dict(peft_state: dict[str, torch.Tensor], lora_alpha: float,
                     sgm_layers: int | None = None) -> dict[str, torch.Tensor]:
    """peft's UNet LoRA ("<module>.lora_A.weight") in kohya's layout: "lora_unet_<module, '.' -> '_'>" with
    .lora_down.weight [r, in], .lora_up.weight [out, r] and .alpha (the loaders scale by alpha / r). `sgm_layers`
    (SDXL: the UNet's layers_per_block): modules by their SGM names, as kohya's SDXL networks name them.

    diffusers' convert_state_dict_to_kohya writes alpha = r (scale 1), which is wrong whenever lora_alpha != r."""
    out = {}
    for key, weight in peft_state.items():
        module, factor = key.split(".lora_", 1)
        if sgm_layers is not None:
            module = sgm_name(module, sgm_layers)
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{_FACTORS['lora_' + factor]}"] = weight
        out[f"{name}.alpha"] = torch.tensor(float(lora_alpha))  # a 0-d float32, as kohya's LoRAModule saves it
    return out


def kohya_metadata(manifest: dict, name: str, text_width: int) -> dict[str, str]:
    """The ss_* keys A1111 (extensions-builtin/Lora/network.py) and kohya's tools read, and a few modelspec.* keys;
    safetensors metadata values are strings."""
    xl = manifest.get("family") == "sdxl"
    # SDXL, else OpenCLIP-H's text width (SD-2.x) or CLIP-L's (SD-1.x)
    version = "sdxl_base_v1-0" if xl else "sd_v2" if text_width == 1024 else "sd_v1"
    resolution, base = manifest["resolution"], manifest["base_model"]
    if base.startswith("/") or "://" in base:  # a folder or storage URI: its name only, as sd-scripts writes it
        base = base.rstrip("/").rsplit("/", 1)[-1]
    triggers = ", ".join(f"{t} = {w}" for t, w in manifest["triggers"].items())
    v = manifest.get("prediction_type", "epsilon") == "v_prediction"
    architecture = "stable-diffusion-xl-v1-base" if xl else "stable-diffusion-v1" if version == "sd_v1" else (
        "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512")  # modelspec's names
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(manifest["rank"]),
        "ss_network_alpha": str(manifest["lora_alpha"]),
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),
        "ss_v_parameterization": str(v),  # sd-scripts' flag for v-prediction bases
        "ss_output_name": name,
        "ss_sd_model_name": base,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(manifest["steps"]),
        "ss_training_comment": f"PALP adapter, UNet LoRA + textual inversion; trigger words: {triggers}; "
                               f"trained for: {manifest['target_prompt']}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v else "epsilon",
        "modelspec.trigger_phrase": ", ".join(manifest["triggers"].values()),
    }


def export_for_tools(directory: Path, peft_state: dict[str, torch.Tensor], embedding, manifest: dict,
                     layers_per_block: int = 2) -> dict:
    """Write kohya/<name>.safetensors and embeddings/<trigger>.safetensors; returns their manifest entries
    (paths relative to `directory`). `manifest` already holds "triggers"."""
    name = lora_name(manifest["subjects"])
    lora = Path(KOHYA_DIR) / f"{name}.safetensors"
    (directory / KOHYA_DIR).mkdir(exist_ok=True)
    sgm = layers_per_block if manifest.get("family") == "sdxl" else None
    save_file(kohya_state_dict(peft_state, manifest["lora_alpha"], sgm), directory / lora,
              metadata=kohya_metadata(manifest, name, embedding.rows.shape[-1]))
    (directory / EMBEDDINGS_DIR).mkdir(exist_ok=True)
    files = {}
    width = embedding.base.embedding_dim  # the first encoder's columns of a row
    for token, row in zip(embedding.tokens, embedding.rows.detach().float().cpu()):
        files[token] = (Path(EMBEDDINGS_DIR) / f"{manifest['triggers'][token]}.safetensors").as_posix()
        # {"emb_params": [n_vectors, d]}: what sd-scripts' train_textual_inversion saves; A1111 and ComfyUI take
        # the single tensor of a safetensors embedding whatever its key; diffusers' load_textual_inversion too.
        # SDXL: {"clip_l": [1, d_l], "clip_g": [1, d_g]}, the layout A1111 and ComfyUI read for SDXL embeddings
        tensors = ({"clip_l": row[None, :width].contiguous(), "clip_g": row[None, width:].contiguous()}
                   if manifest.get("family") == "sdxl" else {"emb_params": row.reshape(1, -1).contiguous()})
        save_file(tensors, directory / files[token])
    return {"kohya_lora": lora.as_posix(), "a1111_embeddings": files}
