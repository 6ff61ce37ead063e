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


def kohya_state_dict(peft_state: dict[str, torch.Tensor], lora_alpha: float) -> dict[str, torch.Tensor]:
    """peft's UNet LoRA ("<module>.lora_A.weight") in kohya's layout: "lora_unet_<module, '.' -> '_'>" with
    .lora_down.weight [r, in], .lora_up.weight [out, r] and .alpha (the loaders scale by alpha / r).

    diffusers' convert_state_dict_to_kohya writes alpha = r (scale 1), which is wrong whenever lora_alpha != r."""
    out = {}
    for key, weight in peft_state.items():
        module, factor = key.split(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{_FACTORS['lora_' + factor]}"] = weight
        out[f"{name}.alpha"] = torch.tensor(float(lora_alpha))  # a 0-d float32, as kohya's LoRAModule saves it
    return out


def kohya_metadata(manifest: dict, name: str, text_width: int) -> dict[str, str]:
    """The ss_* keys A1111 (extensions-builtin/Lora/network.py) and kohya's tools read, and a few modelspec.* keys;
    safetensors metadata values are strings."""
    version = "sd_v2" if text_width == 1024 else "sd_v1"  # OpenCLIP-H (SD-2.x) or CLIP-L (SD-1.x) text width
    resolution, base = manifest["resolution"], manifest["base_model"]
    if base.startswith("/") or "://" in base:  # a folder or storage URI: its name only, as sd-scripts writes it
        base = base.rstrip("/").rsplit("/", 1)[-1]
    triggers = ", ".join(f"{t} = {w}" for t, w in manifest["triggers"].items())
    v = manifest.get("prediction_type", "epsilon") == "v_prediction"
    architecture = "stable-diffusion-v1" if version == "sd_v1" else (
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


def export_for_tools(directory: Path, peft_state: dict[str, torch.Tensor], embedding, manifest: dict) -> dict:
    """Write kohya/<name>.safetensors and embeddings/<trigger>.safetensors; returns their manifest entries
    (paths relative to `directory`). `manifest` already holds "triggers"."""
    name = lora_name(manifest["subjects"])
    lora = Path(KOHYA_DIR) / f"{name}.safetensors"
    (directory / KOHYA_DIR).mkdir(exist_ok=True)
    save_file(kohya_state_dict(peft_state, manifest["lora_alpha"]), directory / lora,
              metadata=kohya_metadata(manifest, name, embedding.rows.shape[-1]))
    (directory / EMBEDDINGS_DIR).mkdir(exist_ok=True)
    files = {}
    for token, row in zip(embedding.tokens, embedding.rows):
        files[token] = (Path(EMBEDDINGS_DIR) / f"{manifest['triggers'][token]}.safetensors").as_posix()
        # {"emb_params": [n_vectors, d]}: what sd-scripts' train_textual_inversion saves; A1111 and ComfyUI take
        # the single tensor of a safetensors embedding whatever its key; diffusers' load_textual_inversion too
        save_file({"emb_params": row.detach().float().cpu().reshape(1, -1).contiguous()}, directory / files[token])
    return {"kohya_lora": lora.as_posix(), "a1111_embeddings": files}
