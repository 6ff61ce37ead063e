"""Adapter files that stock diffusers loads: LoRA weights, one learned_embeds file per placeholder, manifest;
the subjects' reference images (what CLIP-I / DINO score against) and the same adapter for ComfyUI / A1111 /
kohya tools (export_kohya). Every file the manifest names is inside the adapter folder.

    pipe = StableDiffusionPipeline.from_pretrained(manifest["base_model"])
    pipe.load_lora_weights(adapter_dir)
    pipe.load_textual_inversion(adapter_dir / "learned_embeds-V1.safetensors", token="[V1]")
"""

import hashlib
import json
import math
import re
import reprlib
from dataclasses import asdict
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import TrainConfig, knobs_where
from ..data import DataError, crop_image
from ..families.base import Base, add_lora, add_placeholders, load_base
from .kohya import export_for_tools, trigger_words

LORA_FILE = "pytorch_lora_weights.safetensors"
XL_EMBEDDINGS = ("clip_l", "clip_g")  # an SDXL embedding file's tensors: the first encoder's, the second's
MANIFEST_FILE = "manifest.json"
REFERENCES_DIR = "references"


class AdapterError(DataError):
    """An adapter folder that cannot be loaded; the one-line message names the file (and the manifest key)."""


def _split(row: torch.Tensor, embedding) -> list[torch.Tensor]:
    """An SDXL placeholder row [d_l + d_g] as its clip_l and clip_g vectors, [1, d] each."""
    width = embedding.base.embedding_dim
    return [row[None, :width].contiguous(), row[None, width:].contiguous()]


def embeds_file(token: str) -> str:
    return f"learned_embeds-{re.sub(r'[^A-Za-z0-9]+', '', token) or 'token'}.safetensors"


def export_adapter(directory: str | Path, unet, embedding, manifest: dict, tools: bool = True) -> Path:
    """Write `pytorch_lora_weights.safetensors`, `learned_embeds-*.safetensors`, `references/` and
    `manifest.json`; with `tools`, the kohya LoRA and A1111 embeddings too (export_kohya).

    `manifest["subjects"][k]["images"]` are subject k's image files on this machine; the manifest written names
    their copies in the folder instead (see `_write_references`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    xl = manifest.get("family") == "sdxl"
    (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(lora), weight_name=LORA_FILE,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),  # keeps lora_alpha: scale survives
    )
    files = {}
    for token, row in zip(embedding.tokens, embedding.rows.detach().float().cpu()):
        files[token] = embeds_file(token)
        # SD-1.x {token: [d]}: the layout of diffusers' textual_inversion example, read by load_textual_inversion;
        # SDXL {"clip_l": [1, d_l], "clip_g": [1, d_g]}: diffusers' advanced SDXL script's, which A1111 and
        # ComfyUI read as well (one load_textual_inversion per encoder, load_into_pipeline)
        tensors = dict(zip(XL_EMBEDDINGS, _split(row, embedding))) if xl else {token: row.contiguous()}
        save_file(tensors, directory / files[token])
    triggers = trigger_words(manifest["subjects"])
    subjects = [{**s, "images": _write_references(directory, triggers[s["token"]], s["images"],
                                                  manifest["resolution"])} for s in manifest["subjects"]]
    manifest = {**manifest, "subjects": subjects, "lora_file": LORA_FILE, "embeddings": files, "triggers": triggers}
    if tools:
        manifest.update(export_for_tools(directory, lora, embedding, manifest, unet.config.layers_per_block))
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def _write_references(directory: Path, trigger: str, files, resolution: int) -> list[dict]:
    """references/<trigger>/<n>.png: each image as training and scoring saw it (short side resized to
    `resolution`, center-cropped; lossless PNG, so CLIP-I on them is the sweep's CLIP-I), with the sha256 of the
    original file, which names which photo it was without naming a path on this machine."""
    folder = Path(REFERENCES_DIR) / trigger
    (directory / folder).mkdir(parents=True, exist_ok=True)
    out = []
    for n, f in enumerate(files):
        # allow_upscale: training already accepted each image at this resolution (or upscaled it as told)
        crop_image(f, resolution, allow_upscale=True).save(directory / folder / f"{n}.png")
        out.append({"file": (folder / f"{n}.png").as_posix(),
                    "source_sha256": hashlib.sha256(Path(f).read_bytes()).hexdigest()})
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # json reads NaN


def _is_str_map(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) and x for k, x in v.items())


def _is_file_name(v) -> bool:  # a plain name: the file is inside the adapter folder
    return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v


def _is_inside(v) -> bool:  # a relative path that stays in the adapter folder, "/"-separated
    return (isinstance(v, str) and v != "" and "\\" not in v and not PurePosixPath(v).is_absolute()
            and not PureWindowsPath(v).drive and all(p not in ("", ".", "..") for p in v.split("/")))


def _is_reference(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("file"), str)
            and isinstance(v.get("source_sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", v["source_sha256"]))


def _is_subject(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("token"), str) and isinstance(v.get("class_word"), str)
            and isinstance(v.get("images"), list) and all(_is_reference(f) for f in v["images"]))


# what loading and sampling an adapter read: key -> (what it must be, check)
_MANIFEST = {
    "base_model": ("a model name or folder", lambda v: isinstance(v, str) and v != ""),
    "tokens": ("a non-empty list of placeholder strings",
               lambda v: isinstance(v, list) and v and all(isinstance(t, str) and t for t in v)),
    "placeholders": ("a mapping of each token to its class word", _is_str_map),
    "embeddings": ("a mapping of each token to a file in the adapter folder",
                   lambda v: _is_str_map(v) and all(_is_file_name(f) for f in v.values())),
    "lora_file": ("a file in the adapter folder", _is_file_name),
    "rank": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "lora_alpha": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "resolution": ("a positive multiple of 8", lambda v: isinstance(v, int) and not isinstance(v, bool)
                   and v > 0 and v % 8 == 0),
    "subjects": ("a list of {token, class_word, images: [{file, source_sha256}]}",
                 lambda v: isinstance(v, list) and all(_is_subject(x) for x in v)),
}
# written by export_adapter for the UIs (export_kohya); checked when present (checkpoints leave them out)
_TOOLS = {
    "triggers": ("a mapping of each token to a lowercase trigger word",
                 lambda v: _is_str_map(v) and all(re.fullmatch(r"[a-z0-9_]+", w) for w in v.values())),
    "kohya_lora": ("a path inside the adapter folder", _is_inside),
    "a1111_embeddings": ("a mapping of each token to a path inside the adapter folder",
                         lambda v: _is_str_map(v) and all(_is_inside(f) for f in v.values())),
}


def read_manifest(directory: str | Path) -> dict:
    """manifest.json, checked for every key loading and sampling read; an AdapterError names the key."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise AdapterError(f"no adapter at {directory}: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise AdapterError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot read it: {e.strerror or e}") from None
    if not isinstance(manifest, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    for key, (what, ok) in _MANIFEST.items():
        if key not in manifest:
            raise AdapterError(f"{path}: {key}: required")
        if not ok(manifest[key]):
            raise AdapterError(f"{path}: {key}: expected {what}, got {reprlib.repr(manifest[key])}")
    for key, (what, ok) in _TOOLS.items():
        if key in manifest and not ok(manifest[key]):
            raise AdapterError(f"{path}: {key}: expected {what}, got {reprlib.repr(manifest[key])}")
    tokens = set(manifest["tokens"])
    for key in ("placeholders", "embeddings", *(k for k in ("triggers", "a1111_embeddings") if k in manifest)):
        if set(manifest[key]) != tokens:
            raise AdapterError(f"{path}: {key}: its tokens {sorted(manifest[key])} are not the manifest's tokens "
                               f"{manifest['tokens']}")
    for i, subject in enumerate(manifest["subjects"]):
        if subject["token"] not in tokens:
            raise AdapterError(f"{path}: subjects[{i}].token: {subject['token']!r} is not one of the tokens "
                               f"{manifest['tokens']}")
        for j, image in enumerate(subject["images"]):
            if not _is_inside(image["file"]):
                raise AdapterError(f"{path}: subjects[{i}].images[{j}].file: {image['file']!r} is not a path inside "
                                   "the adapter folder (an adapter carries its reference images: no absolute path, "
                                   "no '..')")
    return manifest


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except FileNotFoundError:
        raise AdapterError(f"{file}: missing (named by {MANIFEST_FILE})") from None
    except (SafetensorError, OSError) as e:  # truncated, empty or not safetensors at all
        raise AdapterError(f"{file}: not a readable safetensors file ({e})") from None


def load_weights(directory: str | Path, unet, embedding) -> dict:
    """Load an exported adapter into the trainer's own modules (LoRA-wrapped UNet, PlaceholderEmbedding)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    lora_file = directory / manifest["lora_file"]
    lora = _load_tensors(lora_file)
    lora = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in lora.items()})
    try:
        result = set_peft_model_state_dict(unet, lora)
    except RuntimeError as e:  # shape mismatch: the file's rank or layers are not the manifest's
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise AdapterError(f"{lora_file}: does not fit the rank-{manifest['rank']} LoRA of "
                           f"{manifest['base_model']!r}: {detail}") from None
    if result.unexpected_keys:
        raise AdapterError(f"{lora_file}: LoRA keys do not match this model: {result.unexpected_keys[:3]}")
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing:  # left at their initial values, the adapter would silently be (part of) the base model
        raise AdapterError(f"{lora_file}: {len(missing)} LoRA weights of this model are missing, e.g. {missing[0]}")
    with torch.no_grad():
        for i, token in enumerate(embedding.tokens):
            file = directory / manifest["embeddings"][token]
            tensors = _load_tensors(file)
            row = (torch.cat([tensors[k][0] for k in XL_EMBEDDINGS]) if set(XL_EMBEDDINGS) <= set(tensors)
                   else tensors.get(token))
            if row is None or row.shape != embedding.rows[i].shape:
                got = "no such tensor" if row is None else f"shape {list(row.shape)}"
                raise AdapterError(f"{file}: expected a tensor {token!r} of shape {list(embedding.rows[i].shape)}, "
                                   f"got {got}")
            embedding.rows[i] = row
    return manifest


def load_adapter(directory: str | Path, device: torch.device | str = "cpu") -> tuple[Base, dict]:
    """Base model named by the manifest + the adapter, as the trainer's own modules (for sampling)."""
    manifest = read_manifest(directory)
    base = load_base(manifest["base_model"])
    tokens = tuple(manifest["tokens"])
    embedding = add_placeholders(base, tokens,
                                 tuple(manifest["placeholders"][t] for t in tokens))
    add_lora(base.denoiser, manifest["rank"], manifest["lora_alpha"])
    load_weights(directory, base.denoiser, embedding)
    for module in base.frozen:
        module.to(device)
    return base, manifest


def load_into_pipeline(pipe: StableDiffusionPipeline, directory: str | Path) -> dict:
    """Load an exported adapter into a stock pipeline with diffusers' own loaders; returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    pipe.load_lora_weights(directory, weight_name=manifest["lora_file"])
    for token, file in manifest["embeddings"].items():
        if manifest.get("family") == "sdxl":  # each encoder its own vector, as diffusers documents for SDXL
            tensors = load_file(directory / file)
            pipe.load_textual_inversion(tensors["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(tensors["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(directory / file, token=token)
    return manifest


def manifest(config: TrainConfig, step: int, base: Base | None = None) -> dict:
    """The adapter's palp.json: the knobs of KNOBS' `manifest` kind, the base's family and prediction, the
    subjects' placeholders, the LoRA scale's alpha and the step it was saved at."""
    return {
        "prediction_type": base.noise_scheduler.config.prediction_type if base else "epsilon",
        "family": base.family.name if base else "sd",
        **{k: getattr(config, k) for k in knobs_where("manifest")},
        "placeholders": {s.token: s.class_word for s in config.subjects},
        "tokens": list(config.tokens),
        "subjects": [asdict(s) for s in config.subjects],
        "lora_alpha": config.lora_alpha or config.rank, "steps": step,
    }
