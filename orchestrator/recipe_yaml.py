"""YAML (+ `key=value` overrides) -> the typed, validated `Recipe` of `recipe.py`.

Unknown keys (with a "did you mean"), wrong types, out-of-range values and unreadable images are
`RecipeError`s whose one-line message starts with the field path.
"""

import difflib
import math
import re
import types
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Union, get_args, get_origin

import yaml

from palp_trainer.config import EvalConfig, base_defaults
from palp_trainer.data import IMAGE_SUFFIXES, DataError, list_images, load_image

from .recipe import (DIM_KINDS, _KNOB_TYPES, Dim, MlflowSpec, Prompt, Recipe, RecipeError, Resources, SchedulerSpec,
                     Search, Subject, TrainDefaults, _check_defined, _check_knob, _check_unique)


class _Loader(yaml.SafeLoader):
    """safe_load, but `5e-5` is a float (YAML 1.2), not the string YAML 1.1 makes of it, and a key given
    twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # before `<<` merges are flattened in: an explicit key may override those
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice in one mapping",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))

# common names for a key -> the key; offered as "did you mean" when they are close to a typo
_ALIASES = {
    "learning_rate": "lr", "lora_rank": "rank", "lambda": "align_weight", "align_lambda": "align_weight",
    "embedding_learning_rate": "embedding_lr", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_workers": "workers_per_trial", "gpu": "use_gpu",
    "samples": "num_samples", "max_steps": "steps", "milestones": "steps", "model": "base_model",
    "pretrained_model": "base_model", "placeholder": "token", "class": "class_word", "clean_prompt": "clean",
    "target_prompt": "target", "output_dir": "storage_path",
}


def _unknown_key(key, valid, path: str) -> RecipeError:
    valid = list(valid)
    names = valid + [a for a, k in _ALIASES.items() if k in valid]
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if close:
        return RecipeError(f"{path}: unknown key; did you mean {_ALIASES.get(close[0], close[0])!r}?")
    return RecipeError(f"{path}: unknown key; valid keys: {', '.join(valid)}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, path: str):
    """Check `value` against annotation `tp`; int is accepted for float, bool is not an int."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        (tp,) = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(value, tp, path)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise RecipeError(f"{path}: expected a list of {len(args)}, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    ok = {float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool)}.get(tp, lambda v: isinstance(v, tp))
    if not ok(value):
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):  # YAML's .nan / .inf pass every `x > 0`-style range check
        raise RecipeError(f"{path}: expected a finite number, got {value!r}")
    return float(value) if tp is float else value


def _mapping(raw, path: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping, got {type(raw).__name__} {raw!r}")
    return raw


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _build(cls, raw, path: str, skip=(), **parsed):
    """cls(**raw) with unknown keys, missing keys and types checked; errors prefixed with `path`.

    `parsed` holds fields the caller already built; `skip` names fields a recipe may not set here.
    """
    raw = _mapping(raw, path)
    valid = [f.name for f in fields(cls) if f.name not in skip]
    for key in raw:
        if key not in valid:
            raise _unknown_key(key, valid, _join(path, key))
    kwargs = dict(parsed)
    for f in fields(cls):
        if f.name in kwargs:
            continue
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], f.type, _join(path, f.name))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise RecipeError(f"{_join(path, f.name)}: required")
    return _construct(cls, kwargs, path)


def _construct(cls, kwargs: dict, path: str):
    try:
        return cls(**kwargs)
    except ValueError as e:  # RecipeError, or EvalConfig's own ValueError; both start with the field
        raise RecipeError(_join(path, e)) from None


def _parse_dim(raw, knob: str, path: str) -> Dim:
    tp = _KNOB_TYPES[knob]
    if isinstance(raw, dict):
        if len(raw) != 1:
            raise RecipeError(f"{path}: expected one of {{grid|choice|uniform|loguniform: [...]}}, got {raw!r}")
        ((kind, values),) = raw.items()
        if kind not in DIM_KINDS[1:]:
            raise _unknown_key(kind, DIM_KINDS[1:], _join(path, kind))
        at = _join(path, kind)
        if not isinstance(values, list):
            raise RecipeError(f"{at}: expected a list, got {type(values).__name__} {values!r}")
        if kind in ("uniform", "loguniform") and tp is not float:
            raise RecipeError(f"{at}: {knob} is {_type_name(tp)}, not a float; use a list or {{choice: [...]}}")
    elif isinstance(raw, list):
        kind, values, at = "grid", raw, path
    else:
        kind, values, at = "fixed", [raw], path
    typed = []
    for i, v in enumerate(values):
        item = at if kind == "fixed" else f"{at}[{i}]"
        typed.append(_coerce(v, tp, item))
        _check_knob(knob, typed[-1], item)
    return _construct(Dim, {"kind": kind, "values": tuple(typed)}, path)


def _parse_search(raw) -> Search:
    raw = dict(_mapping(raw, "search"))
    dims = {k: _parse_dim(raw.pop(k), k, f"search.{k}") for k in list(raw) if k in _KNOB_TYPES
            and k in {f.name for f in fields(Search)}}
    if isinstance(raw.get("steps"), int) and not isinstance(raw["steps"], bool):
        raw["steps"] = [raw["steps"]]  # `steps: 500` is one milestone
    return _build(Search, raw, "search", **dims)


def _check_image(file: Path, resolution: int, allow_upscale: bool, path: str) -> None:
    """Load it as the trainer will (every pixel decoded, size checked): a bad file fails here, before Ray starts."""
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise RecipeError(f"{path}: {file} is not a {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file")
    try:
        load_image(file, resolution, allow_upscale)
    except DataError as e:
        raise RecipeError(f"{path}: {e}") from None


def _parse_images(raw, base: Path, resolution: int, allow_upscale: bool, path: str) -> tuple[str, ...]:
    """A folder (its images) or a list of files; relative paths resolve against the recipe's folder."""
    if not isinstance(raw, (str, list)):
        raise RecipeError(f"{path}: expected a folder or a list of image files, got {type(raw).__name__} {raw!r}")
    entries = [(raw, path)] if isinstance(raw, str) else [
        (_coerce(v, str, f"{path}[{i}]"), f"{path}[{i}]") for i, v in enumerate(raw)]
    if not entries:
        raise RecipeError(f"{path}: no image files")
    files = []
    for entry, at in entries:
        try:
            found = list_images((base / Path(entry).expanduser()).absolute())
        except DataError as e:
            raise RecipeError(f"{at}: {e}") from None
        for f in found:
            _check_image(f, resolution, allow_upscale, at)
        files += [str(f) for f in found]
    return tuple(files)


def _parse_subject(raw, i: int, base: Path, resolution: int, allow_upscale: bool) -> Subject:
    path = f"subjects[{i}]"
    raw = _mapping(raw, path)
    images = raw.get("images")
    if "images" in raw:
        images = _parse_images(images, base, resolution, allow_upscale, f"{path}.images")
    return _build(Subject, {k: v for k, v in raw.items() if k != "images"}, path,
                  **({"images": images} if images is not None else {}))


def _parse_prompt(raw, i: int, subjects: tuple[Subject, ...]) -> Prompt:
    path = f"prompts[{i}]"
    if isinstance(raw, str):
        raw = {"target": raw}  # a bare string is the target
    raw = _mapping(raw, path)
    if "clean" not in raw and isinstance(raw.get("target"), str):
        # y^c: each placeholder replaced by its subject's class word
        _check_defined(raw["target"], {s.token for s in subjects}, f"{path}.target")
        clean = raw["target"]
        for s in subjects:
            clean = clean.replace(s.token, s.class_word)
        raw = {**raw, "clean": clean}
    return _build(Prompt, raw, path)


def _list(raw, path: str) -> list:
    if not isinstance(raw, list):
        raise RecipeError(f"{path}: expected a list, got {type(raw).__name__} {raw!r}")
    return raw


_SECTIONS = ("train", "search", "scheduler", "eval", "resources", "mlflow", "subjects", "prompts")


def parse_recipe(raw: dict, base_dir: str | Path = ".") -> Recipe:
    """A raw mapping (already overridden) -> Recipe; `base_dir` anchors relative image paths."""
    raw = _mapping(raw, "recipe")
    valid = [f.name for f in fields(Recipe)]
    for key in raw:
        if key not in valid:
            raise _unknown_key(key, valid, str(key))
    scalars = {f.name: _coerce(raw[f.name], f.type, f.name) for f in fields(Recipe)
               if f.name in raw and f.name not in _SECTIONS}
    for key in ("name", "subjects", "prompts"):
        if key not in raw:
            raise RecipeError(f"{key}: required")
    train = _build(TrainDefaults, raw.get("train"), "train")
    # resolution decides which images are too small: the Recipe's, before the Recipe is built
    resolution = scalars.get("resolution")
    if resolution is None:
        resolution = base_defaults(scalars.get("base_model", Recipe.base_model)).resolution
    subjects = tuple(_parse_subject(s, i, Path(base_dir), resolution, train.allow_upscale)
                     for i, s in enumerate(_list(raw["subjects"], "subjects")))
    _check_unique(subjects)  # before prompts: a prompt error would hide the real cause
    prompts = tuple(_parse_prompt(p, i, subjects) for i, p in enumerate(_list(raw["prompts"], "prompts")))
    sections = dict(
        train=train,
        search=_parse_search(raw.get("search")),
        scheduler=_build(SchedulerSpec, raw.get("scheduler"), "scheduler"),
        eval=_parse_eval(raw.get("eval")),
        resources=_build(Resources, raw.get("resources"), "resources"),
        mlflow=_build(MlflowSpec, raw.get("mlflow"), "mlflow"),
    )
    return _construct(Recipe, {**scalars, "subjects": subjects, "prompts": prompts, **sections}, "")


def _parse_eval(raw) -> EvalConfig:
    raw = _mapping(raw, "eval")
    if "elements" in raw:
        raise RecipeError("eval.elements: set per prompt, as prompts[i].elements")
    return _build(EvalConfig, raw, "eval", skip=("elements",))


_OVERRIDE_PATH = re.compile(r"[A-Za-z_]\w*(\[\d+\])*(\.[A-Za-z_]\w*(\[\d+\])*)*")


def apply_override(raw: dict, override: str) -> dict:
    """Set one `dotted.path[i]=yaml value` in the raw mapping, in place; returns it."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_PATH.fullmatch(key):
        raise RecipeError(f"override {override!r}: expected key=value, e.g. train.rank=4 or search.alpha=[7.5,15]")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{key}: override value is not valid YAML: {_yaml_problem(e)}") from None
    steps = [m[0] or int(m[1]) for m in re.findall(r"([A-Za-z_]\w*)|\[(\d+)\]", key)]
    node, at = raw, ""
    for step, nxt in zip(steps, steps[1:] + [None]):
        if isinstance(step, int):
            if not isinstance(node, list):
                raise RecipeError(f"{at}: is not a list; cannot override {key}")
            if step >= len(node):
                raise RecipeError(f"{at}[{step}]: index out of range; {at} has {len(node)} entries")
            at = f"{at}[{step}]"
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"{at}: is not a mapping; cannot override {key}")
            at = _join(at, step)
        if nxt is None:
            node[step] = value
        else:
            if isinstance(node, dict) and node.get(step) is None:
                if isinstance(nxt, int):
                    raise RecipeError(f"{at}: no list to index; cannot override {key}")
                node[step] = {}
            node = node[step]
    return raw


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def load_recipe(path: str | Path, overrides=()) -> Recipe:
    """Read a recipe file, apply `key=value` overrides to the raw mapping, then type and validate."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, expected a YAML recipe file")
    if not path.is_file():  # a FIFO or device would block or stream forever
        raise RecipeError(f"{path}: is not a regular file, expected a YAML recipe file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not valid YAML: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read it: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise RecipeError(f"{path}: expected a mapping with name, subjects and prompts, got {got}")
    for override in overrides:
        apply_override(raw, override)
    return parse_recipe(raw, path.parent)

