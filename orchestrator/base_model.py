"""The recipe's base model, checked once on the driver before any trial: a folder must be a diffusers pipeline of
a family the trainer supports, a hub id must be in the local Hugging Face cache or on the hub. Otherwise every
trial would start a worker group and fail on the download, one trial after another."""

import json
from pathlib import Path

from palp_trainer.config import PREDICTIONS, SMALL_BASES
from palp_trainer.families.sd import BUILT_IN, FAMILIES
from palp_trainer.storage import is_remote

from .recipe import RecipeError

INDEX = "model_index.json"  # a diffusers pipeline's manifest: names its class, hence its family
SCHEDULER = "scheduler/scheduler_config.json"  # its prediction_type: what the UNet predicts
HUB_TIMEOUT_S = 10.0


def check_base(ref: str) -> str:
    """The family of base model `ref` ("tiny", "world", a folder, a storage URI or a hub id); RecipeError naming
    `base_model` when it is not usable."""
    if ref in SMALL_BASES:
        return FAMILIES[BUILT_IN[ref]].label
    if is_remote(ref):  # staged by an earlier sweep from a folder checked then (read on the nodes)
        return "staged"
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        if not (path / INDEX).is_file():
            raise RecipeError(f"base_model: {ref} is not a diffusers pipeline folder (no {INDEX}); give a folder "
                              "written by save_pretrained, or a Hugging Face hub id such as "
                              "stable-diffusion-v1-5/stable-diffusion-v1-5")
        return _family(path / INDEX, ref)
    return _hub_family(ref)


def _hub_family(repo: str) -> str:
    """From the local cache's model_index.json, else from the hub's record of the repository (one request)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    cached = try_to_load_from_cache(repo, INDEX)
    if isinstance(cached, str):
        return _family(Path(cached), repo)
    where = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise RecipeError(f"base_model: {repo} is {where}, and HF_HUB_OFFLINE is set")
    try:
        info = HfApi(endpoint=constants.ENDPOINT).model_info(repo, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise RecipeError(f"base_model: no model {repo} on the hub (deleted, private, or a typo)") from None
    except Exception as e:  # no network, a proxy, a hub outage: huggingface_hub raises many kinds
        first = " ".join(str(e).split())[:160]
        raise RecipeError(f"base_model: {repo} is {where}, and the hub is unreachable ({first})") from None
    name = ((info.config or {}).get("diffusers") or {}).get("_class_name")
    return _check_class(name, repo) if name else FAMILIES["StableDiffusionPipeline"].label


def _family(index: Path, ref: str) -> str:
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise RecipeError(f"base_model: {ref}: unreadable {INDEX} ({e})") from None
    family = _check_class(name, ref)
    scheduler = index.parent / SCHEDULER  # beside model_index.json, in a folder and in a cache snapshot alike
    if scheduler.is_file():
        prediction = json.loads(scheduler.read_text()).get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise RecipeError(f"base_model: {ref} predicts {prediction!r} ({SCHEDULER}); supported: "
                              f"{', '.join(PREDICTIONS)}")
    return family


def _check_class(name: str | None, ref: str) -> str:
    if name not in FAMILIES:
        supported = ", ".join(f"{f.label} ({c})" for c, f in FAMILIES.items())
        raise RecipeError(f"base_model: {ref} is a {name}; supported: {supported}")
    return FAMILIES[name].label
