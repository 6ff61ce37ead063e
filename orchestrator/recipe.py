"""A recipe: YAML (+ `key=value` overrides) -> typed, validated, frozen objects.

Recipes hold overrides only; every default lives in a dataclass here or in `palp_trainer.config`
(TrainDefaults reads TrainConfig's own defaults). Every problem is a `RecipeError` whose message is
one line, `field.path: problem`, e.g. `subjects[1].images: no such file or directory: .../data/dgo`.

Two defaults depend on `base_model`: `resolution` None means 32 px for "tiny" (the built-in toy
model) and 512 otherwise; `precision` None means "fp32" for "tiny" (a CPU model) and "bf16" otherwise.
"""

import difflib
import re
import types
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Union, get_args, get_origin

import yaml
from PIL import Image, UnidentifiedImageError

from palp_trainer.config import ALIGNMENTS, PRECISIONS, TINY_RESOLUTION, EvalConfig, TrainConfig
from palp_trainer.data import IMAGE_SUFFIXES, DataError, list_images

PLACEHOLDER = re.compile(r"\[[^\[\]\s]+\]")  # "[V1]", "[sks]": brackets, no spaces
DIM_KINDS = ("fixed", "grid", "choice", "uniform", "loguniform")


class RecipeError(ValueError):
    """A bad recipe or override; the one-line message starts with the field path."""


# --------------------------------------------------------------------------- the typed recipe

_TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def _default(name: str):
    """TrainConfig's own default for a knob: one source of truth."""
    return _TRAIN_DEFAULTS[name]


# Range rules shared by `train` and `search`; a knob missing here only needs its type.
_RULES = {
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "grad_accum": (lambda v: v >= 1, "must be >= 1"),
    "lr": (lambda v: v > 0, "must be > 0"),
    "embedding_lr": (lambda v: v >= 0, "must be >= 0 (0 freezes the placeholder rows)"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "rank": (lambda v: v >= 1, "must be >= 1"),
    "lora_alpha": (lambda v: v is None or v > 0, "must be > 0 (or null: = rank)"),
    "alignment": (lambda v: v in ALIGNMENTS, f"must be one of {', '.join(ALIGNMENTS)}"),
    "alpha": (lambda v: v > 0, "must be > 0"),
    "beta": (lambda v: v > 0, "must be > 0"),
    "align_weight": (lambda v: v >= 0, "must be >= 0"),
    "t_range": (lambda v: 0 <= v[0] < v[1] <= 1000, "need 0 <= lo < hi <= 1000"),
    "align_t_range": (lambda v: 0 <= v[0] < v[1] <= 1000, "need 0 <= lo < hi <= 1000"),
    "subject_sampling": (lambda v: v in ("uniform", "union"), "must be 'uniform' or 'union'"),
    "checkpoint_every": (lambda v: v >= 0, "must be >= 0 (0: only at the end)"),
}


def _check_knob(name: str, value, path: str) -> None:
    ok, problem = _RULES.get(name, (lambda v: True, ""))
    if not ok(value):
        raise RecipeError(f"{path}: {problem}, got {value!r}")


@dataclass(frozen=True)
class TrainDefaults:
    """The trainer knobs a recipe sets once for every trial (a `search` dim overrides its knob)."""

    batch_size: int = _default("batch_size")  # per worker; global batch = workers * batch * grad_accum
    grad_accum: int = _default("grad_accum")
    lr: float = _default("lr")
    embedding_lr: float = _default("embedding_lr")
    weight_decay: float = _default("weight_decay")
    rank: int = _default("rank")
    lora_alpha: float | None = _default("lora_alpha")
    alignment: str = _default("alignment")
    alpha: float = _default("alpha")
    beta: float = _default("beta")
    align_weight: float = _default("align_weight")
    same_noise: bool = _default("same_noise")
    rescale: bool = _default("rescale")
    t_range: tuple[int, int] = _default("t_range")
    align_t_range: tuple[int, int] = _default("align_t_range")
    subject_sampling: str = _default("subject_sampling")
    flip: bool = _default("flip")
    allow_upscale: bool = _default("allow_upscale")
    checkpoint_every: int = _default("checkpoint_every")

    def __post_init__(self):
        for f in fields(self):
            _check_knob(f.name, getattr(self, f.name), f.name)

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_KNOB_TYPES = {f.name: f.type for f in fields(TrainDefaults)}


@dataclass(frozen=True)
class Dim:
    """One searched knob. fixed: (v,); grid/choice: the values; uniform/loguniform: (lo, hi)."""

    kind: str
    values: tuple

    def __post_init__(self):
        if self.kind not in DIM_KINDS:
            raise RecipeError(f"kind: must be one of {', '.join(DIM_KINDS)}, got {self.kind!r}")
        if not self.values:
            raise RecipeError(f"{self.kind}: needs at least one value")
        if self.kind == "fixed" and len(self.values) != 1:
            raise RecipeError(f"fixed: needs exactly one value, got {list(self.values)}")
        if self.kind in ("uniform", "loguniform"):
            if len(self.values) != 2 or not self.values[0] < self.values[1]:
                raise RecipeError(f"{self.kind}: needs [lo, hi] with lo < hi, got {list(self.values)}")
            if self.kind == "loguniform" and self.values[0] <= 0:
                raise RecipeError(f"loguniform: needs lo > 0, got {self.values[0]!r}")

    @property
    def sampled(self) -> bool:
        """Drawn anew for each of `num_samples` (not expanded like a grid)."""
        return self.kind in ("choice", "uniform", "loguniform")

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.values[0])
        args = ", ".join(format_value(v) for v in self.values)
        return f"{self.kind}({args})" if self.kind != "grid" else f"[{args}]"


def format_value(v) -> str:
    """Short and exact enough for tables: 1e-05 -> '1e-5', 0.0001 -> '1e-4', 7.5 -> '7.5', 15.0 -> '15'."""
    if not isinstance(v, float):
        return str(v)
    if v != 0 and not 1e-3 <= abs(v) < 1e5:
        mantissa, exponent = f"{v:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:.6g}"


@dataclass(frozen=True)
class Search:
    """Hyperparameters swept per (subject set, prompt) pair; a dim left out takes its `train` value.

    Each trial trains to max(steps) and reports (ASHA rungs) at every step in `steps`.
    """

    alpha: Dim | None = None
    beta: Dim | None = None
    rank: Dim | None = None
    lr: Dim | None = None
    embedding_lr: Dim | None = None
    align_weight: Dim | None = None  # λ
    alignment: Dim | None = None
    same_noise: Dim | None = None
    num_samples: int = 1  # Tune's num_samples: repeats the grid, redraws sampled dims
    steps: tuple[int, ...] = (500,)

    def __post_init__(self):
        if self.num_samples < 1:
            raise RecipeError(f"num_samples: must be >= 1, got {self.num_samples}")
        if not self.steps or any(s < 1 for s in self.steps):
            raise RecipeError(f"steps: must be positive step counts, got {list(self.steps)}")
        if list(self.steps) != sorted(set(self.steps)):
            raise RecipeError(f"steps: must be increasing, got {list(self.steps)}")

    @property
    def dims(self) -> dict[str, Dim]:
        """The searched knobs, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in _KNOB_TYPES and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"  # "asha" stops weak trials at milestones; "fifo" runs every trial to the end
    metric: str = "composite"
    mode: str = "max"
    grace_period: int = 1  # in milestones: ASHA never stops a trial before its grace_period-th report
    reduction_factor: int = 2

    def __post_init__(self):
        if self.type not in ("asha", "fifo"):
            raise RecipeError(f"type: must be 'asha' or 'fifo', got {self.type!r}")
        if self.mode not in ("max", "min"):
            raise RecipeError(f"mode: must be 'max' or 'min', got {self.mode!r}")
        if not self.metric:
            raise RecipeError("metric: must not be empty")
        if self.grace_period < 1:
            raise RecipeError(f"grace_period: must be >= 1 milestone, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise RecipeError(f"reduction_factor: must be >= 2, got {self.reduction_factor}")


@dataclass(frozen=True)
class Resources:
    """Per trial: a Ray Train worker group of `workers_per_trial` (DDP) workers."""

    workers_per_trial: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when use_gpu, else 0
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs fit
    max_failures: int = 0  # Ray Train restarts of a trial's worker group (from its last checkpoint)
    checkpoints_to_keep: int | None = 2  # per trial; None keeps all

    def __post_init__(self):
        if self.gpus_per_worker is None:
            object.__setattr__(self, "gpus_per_worker", 1.0 if self.use_gpu else 0.0)
        elif self.gpus_per_worker > 0 and not self.use_gpu:
            raise RecipeError("gpus_per_worker: set resources.use_gpu: true to give workers GPUs")
        if self.workers_per_trial < 1:
            raise RecipeError(f"workers_per_trial: must be >= 1, got {self.workers_per_trial}")
        if self.cpus_per_worker <= 0:
            raise RecipeError(f"cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise RecipeError(f"gpus_per_worker: must be > 0 with use_gpu, got {self.gpus_per_worker}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise RecipeError(f"max_concurrent_trials: must be >= 1 (or null), got {self.max_concurrent_trials}")
        if self.max_failures < 0:
            raise RecipeError(f"max_failures: must be >= 0, got {self.max_failures}")
        if self.checkpoints_to_keep is not None and self.checkpoints_to_keep < 1:
            raise RecipeError(f"checkpoints_to_keep: must be >= 1 (or null), got {self.checkpoints_to_keep}")


@dataclass(frozen=True)
class MlflowSpec:
    tracking_uri: str | None = None  # None: a sqlite store under storage_path
    experiment: str | None = None  # None: the recipe name
    registered_model_template: str = "palp-{subjects}-{prompt_slug}"
    champion_metric: str | None = None  # None: scheduler.metric
    promote_only_if_better: bool = True

    def __post_init__(self):
        try:
            self.registered_model_template.format(subjects="s", prompt_slug="p")
        except (KeyError, IndexError, ValueError) as e:
            raise RecipeError(f"registered_model_template: bad field {e}; "
                              "use only {subjects} and {prompt_slug}") from None


@dataclass(frozen=True)
class Subject:
    """One subject: its images (expanded to files), placeholder token, class word and y_P."""

    name: str
    token: str
    class_word: str
    images: tuple[str, ...]
    prompt: str = "A photo of {token}"  # y_P; "{token}" is replaced by the subject's token

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise RecipeError(f"name: use letters, digits, - and _ only (it names runs and models), "
                              f"got {self.name!r}")
        if not PLACEHOLDER.fullmatch(self.token):
            raise RecipeError(f"token: must look like [V1] (brackets, no spaces), got {self.token!r}")
        if not self.class_word.strip():
            raise RecipeError("class_word: must not be empty")
        if not self.images:
            raise RecipeError("images: no image files")
        object.__setattr__(self, "prompt", self.prompt.replace("{token}", self.token))
        if self.token not in self.prompt:
            raise RecipeError(f"prompt: must contain the subject's token {self.token}, got {self.prompt!r}")


@dataclass(frozen=True)
class Prompt:
    """A target prompt (with placeholders), its clean prompt y^c and the Table-2 style elements."""

    target: str
    clean: str  # y^c: class words instead of placeholders
    elements: tuple[str, ...] = ()  # per-element text alignment, e.g. ("a sketch", "a cat", ...)
    name: str | None = None  # names the pair; None: derived from the target

    def __post_init__(self):
        if not PLACEHOLDER.search(self.target):
            raise RecipeError(f"target: contains no placeholder; mention a subject token such as [V1], "
                              f"got {self.target!r}")
        if found := PLACEHOLDER.search(self.clean):
            raise RecipeError(f"clean: still contains placeholder {found.group()}; use its class word")
        if not self.slug:
            raise RecipeError(f"name: gives an empty slug, got {self.name!r}")

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The target's placeholders in order of appearance."""
        return tuple(dict.fromkeys(PLACEHOLDER.findall(self.target)))

    @property
    def slug(self) -> str:
        return slugify(self.name or self.target)


def slugify(text: str, limit: int = 40) -> str:
    """'A sketch of [V1] in Paris' -> 'a-sketch-of-v1-in-paris'; cut at a word to <= limit chars."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(slug) > limit:
        cut = slug[:limit + 1]
        slug = cut.rsplit("-", 1)[0] if "-" in cut else slug[:limit]
    return slug


@dataclass(frozen=True)
class Pair:
    """What one trial trains: the subjects a prompt mentions (in order) and the prompt."""

    subjects: tuple[Subject, ...]
    prompt: Prompt

    @property
    def id(self) -> str:
        return f"{'+'.join(s.name for s in self.subjects)}__{self.prompt.slug}"


@dataclass(frozen=True)
class Recipe:
    """One sweep: every (subject set, prompt) pair x the `search` grid/samples, each trial a Train job."""

    name: str
    subjects: tuple[Subject, ...]
    prompts: tuple[Prompt, ...]
    base_model: str = "tiny"  # "tiny" | hub id | local diffusers directory
    resolution: int | None = None  # None: 32 for tiny, else 512
    precision: str | None = None  # None: fp32 for tiny, else bf16
    seed: int = _default("seed")
    train: TrainDefaults = field(default_factory=TrainDefaults)
    search: Search = field(default_factory=Search)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: Resources = field(default_factory=Resources)
    storage_path: str = "runs"  # relative to the CWD, or s3:// / gs://
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)

    def __post_init__(self):
        tiny = self.base_model == "tiny"
        if self.resolution is None:
            object.__setattr__(self, "resolution", TINY_RESOLUTION if tiny else 512)
        if self.precision is None:
            object.__setattr__(self, "precision", "fp32" if tiny else "bf16")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise RecipeError(f"name: use letters, digits, '.', - and _ only (it names the sweep), got {self.name!r}")
        if self.resolution < 8 or self.resolution % 8:
            raise RecipeError(f"resolution: must be a positive multiple of 8, got {self.resolution}")
        if self.precision not in PRECISIONS:
            raise RecipeError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.subjects:
            raise RecipeError("subjects: at least one subject is needed")
        if not self.prompts:
            raise RecipeError("prompts: at least one target prompt is needed")
        _check_unique(self.subjects)
        tokens = {s.token for s in self.subjects}
        slugs = {}
        for i, p in enumerate(self.prompts):
            _check_defined(p.target, tokens, f"prompts[{i}].target")
            if p.slug in slugs:
                raise RecipeError(f"prompts[{i}]: its slug {p.slug!r} is also prompts[{slugs[p.slug]}]'s; "
                                  f"give one a distinct `name`")
            slugs[p.slug] = i
        used = {t for p in self.prompts for t in p.placeholders}
        for i, s in enumerate(self.subjects):
            if s.token not in used:
                raise RecipeError(f"subjects[{i}].token: {s.token} appears in no prompt target; "
                                  "use it in a prompt or remove the subject")
        if self.scheduler.type == "asha" and self.scheduler.grace_period > len(self.search.steps):
            raise RecipeError(f"scheduler.grace_period: {self.scheduler.grace_period} milestones, but search.steps "
                              f"has only {len(self.search.steps)}")

    def pairs(self) -> tuple[Pair, ...]:
        by_token = {s.token: s for s in self.subjects}
        return tuple(Pair(tuple(by_token[t] for t in p.placeholders), p) for p in self.prompts)

    def pair_ids(self) -> list[str]:
        return [p.id for p in self.pairs()]

    def pair(self, pair_id: str) -> Pair:
        for p in self.pairs():
            if p.id == pair_id:
                return p
        raise RecipeError(f"pair: no pair {pair_id!r} in recipe {self.name}; known: {', '.join(self.pair_ids())}")

    def pair_parts(self, pair_id: str) -> tuple[tuple[Subject, ...], Prompt]:
        p = self.pair(pair_id)
        return p.subjects, p.prompt


def _check_unique(subjects: tuple[Subject, ...]) -> None:
    for key in ("name", "token"):
        seen = {}
        for i, s in enumerate(subjects):
            value = getattr(s, key)
            if value in seen:
                raise RecipeError(f"subjects[{i}].{key}: {value!r} is also subjects[{seen[value]}].{key}; "
                                  "each subject needs its own")
            seen[value] = i


def _check_defined(text: str, tokens: set[str], path: str) -> None:
    for t in PLACEHOLDER.findall(text):
        if t not in tokens:
            raise RecipeError(f"{path}: placeholder {t} is defined by no subject")


# --------------------------------------------------------------------------- YAML -> typed objects

class _Loader(yaml.SafeLoader):
    """safe_load, but `5e-5` is a float (YAML 1.2), not the string YAML 1.1 makes of it."""


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
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise RecipeError(f"{path}: {file} is not a {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file")
    try:
        with Image.open(file) as im:
            size = im.size
            im.verify()  # header + structure; cheap, decodes no pixels
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise RecipeError(f"{path}: unreadable image {file}: {e}") from None
    if min(size) < resolution and not allow_upscale:
        raise RecipeError(f"{path}: {file} is {size[0]}x{size[1]}, smaller than resolution {resolution}; "
                          "set train.allow_upscale: true to upscale it")


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
    # resolution decides which images are too small; resolve it the way Recipe does
    resolution = scalars.get("resolution")
    if resolution is None:
        resolution = TINY_RESOLUTION if scalars.get("base_model", "tiny") == "tiny" else 512
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
    # EvalConfig's own check lumps these together; name the field
    for key in ("num_images", "steps", "batch_size"):
        if isinstance(raw.get(key), int) and not isinstance(raw[key], bool) and raw[key] < 1:
            raise RecipeError(f"eval.{key}: must be >= 1, got {raw[key]}")
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
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not valid YAML: not a text file") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise RecipeError(f"{path}: expected a mapping with name, subjects and prompts, got {got}")
    for override in overrides:
        apply_override(raw, override)
    return parse_recipe(raw, path.parent)


__all__ = ["Dim", "MlflowSpec", "Pair", "Prompt", "Recipe", "RecipeError", "Resources", "SchedulerSpec",
           "Search", "Subject", "TrainDefaults", "apply_override", "format_value", "load_recipe", "parse_recipe",
           "slugify"]
