"""A recipe as typed, validated, frozen objects (`recipe_yaml.load_recipe` builds one from YAML).

Recipes hold overrides only; every default lives in a dataclass here or in `palp_trainer.config`: the trainer
knobs' defaults, kinds and rules are TrainConfig's and its KNOBS table's (TrainDefaults and Search are built from
them). Every problem is a `RecipeError` whose message is one line, `field.path: problem`, e.g.
`subjects[1].images: no such file or directory: .../data/dgo`.

Three defaults depend on `base_model` (`palp_trainer.config.base_defaults`): `resolution` None means 32 px for the
built-in small bases, 1024 for SDXL and 512 otherwise; `precision` None means fp32 for the small bases (CPU
models) and bf16 otherwise; `eval.scorer` None means the world's oracle judge for "world" and CLIP otherwise.
"""

import re
from dataclasses import dataclass, field, fields, make_dataclass, replace

from palp_trainer.config import EvalConfig, TrainConfig, base_defaults, check_knob, group_refusal, knobs_where
from palp_trainer.evaluation.scorers import score_names

PLACEHOLDER = re.compile(r"\[[^\[\]\s]+\]")  # "[V1]", "[sks]": brackets, no spaces
DIM_KINDS = ("fixed", "grid", "choice", "uniform", "loguniform")
# how a trial's workers sit on nodes (Ray placement group strategies): pack fills one node first, spread puts
# them on different nodes where it can, strict_spread always (a trial then needs workers_per_trial nodes)
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


class RecipeError(ValueError):
    """A bad recipe or override; the one-line message starts with the field path."""


# --------------------------------------------------------------------------- the typed recipe

def _check_knob(name: str, value, path: str) -> None:
    """TrainConfig's rule for knob `name` (palp_trainer.config.KNOBS), its message under the field path."""
    try:
        check_knob(name, value)
    except ValueError as e:
        raise RecipeError(f"{path}{str(e).removeprefix(name)}") from None


class _TrainSection:
    def __post_init__(self):
        for f in fields(self):
            _check_knob(f.name, getattr(self, f.name), f.name)

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}
TrainDefaults = make_dataclass(
    "TrainDefaults", [(k, _TRAIN_FIELDS[k].type, field(default=_TRAIN_FIELDS[k].default)) for k in knobs_where("train")],
    bases=(_TrainSection,), frozen=True, namespace={"__module__": __name__})
TrainDefaults.__doc__ = """The trainer knobs a recipe sets once for every trial (a `search` dim overrides its knob):
TrainConfig's fields of KNOBS' `train` kind, with TrainConfig's defaults. batch_size is per worker; global batch =
workers * batch * grad_accum."""

_KNOB_TYPES = {k: _TRAIN_FIELDS[k].type for k in knobs_where("train")}


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


class _SearchSection:
    """Hyperparameters swept per (subject set, prompt) pair: one Dim per searchable knob (KNOBS' `searchable`
    kind); a dim left out takes its `train` value. Each trial trains to max(steps) and reports (ASHA rungs) at every
    step in `steps`."""

    def __post_init__(self):
        if self.num_samples < 1:
            raise RecipeError(f"num_samples: must be >= 1, got {self.num_samples}")
        if not self.steps or any(s < 1 for s in self.steps):
            raise RecipeError(f"steps: must be positive step counts, got {list(self.steps)}")
        if list(self.steps) != sorted(set(self.steps)):
            raise RecipeError(f"steps: must be increasing, got {list(self.steps)}")

    @property
    def dims(self) -> dict[str, Dim]:
        """The searched knobs, in KNOBS' order."""
        return {k: getattr(self, k) for k in knobs_where("searchable") if getattr(self, k) is not None}


Search = make_dataclass(
    "Search", [(k, Dim | None, None) for k in knobs_where("searchable")]
    + [("num_samples", int, 1),  # Tune's num_samples: repeats the grid, redraws sampled dims
       ("steps", tuple[int, ...], (500,))],
    bases=(_SearchSection,), frozen=True, namespace={"__module__": __name__})
Search.__doc__ = _SearchSection.__doc__


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
    # Ray Train restarts of a trial's worker group after a worker or node dies, from its last checkpoint; a
    # deterministic error (divergence, out of memory) is retried as often before the trial fails
    max_failures: int = 2
    checkpoints_to_keep: int | None = 2  # per trial; None keeps all
    placement: str = "pack"  # one of PLACEMENTS
    # up to this many trials of one pair that differ only in α, β, λ, lr or embedding_lr train in one worker group
    # and one step, each still its own Tune trial and MLflow run (palp_trainer/objective/group.py; benchmarks/RESULTS.md)
    trials_per_group: int = 1

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise RecipeError(f"placement: must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
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
        if self.trials_per_group < 1:
            raise RecipeError(f"trials_per_group: must be >= 1, got {self.trials_per_group}")
        if self.trials_per_group > 1 and self.workers_per_trial > 1:  # a group's K rows already fill its device
            raise RecipeError("trials_per_group: a trial group trains on one worker; set workers_per_trial: 1")
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
    base_model: str = "tiny"  # "tiny" | "world" | hub id | local diffusers directory
    resolution: int | None = None  # None: base_defaults (32 for the small bases, 1024 for SDXL, else 512)
    precision: str | None = None  # None: base_defaults (fp32 for the small bases, else bf16)
    seed: int = _TRAIN_FIELDS["seed"].default
    train: TrainDefaults = field(default_factory=TrainDefaults)
    search: Search = field(default_factory=Search)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: Resources = field(default_factory=Resources)
    storage_path: str = "runs"  # relative to the CWD, or s3:// / gs://
    # storage_path is a shared filesystem (NFS, ...) mounted at the same path on every node: a local path
    # is then allowed on a cluster of several nodes
    storage_shared: bool = False
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)

    def __post_init__(self):
        defaults = base_defaults(self.base_model)
        if self.resolution is None:
            object.__setattr__(self, "resolution", defaults.resolution)
        if self.precision is None:
            object.__setattr__(self, "precision", defaults.precision)
        if self.eval.scorer is None:
            object.__setattr__(self, "eval", replace(self.eval, scorer=defaults.scorer))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise RecipeError(f"name: use letters, digits, '.', - and _ only (it names the sweep), got {self.name!r}")
        for knob in ("resolution", "precision"):
            _check_knob(knob, getattr(self, knob), knob)
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
        if self.resources.trials_per_group > 1 and group_refusal(self.precision):
            raise RecipeError(f"resources.trials_per_group: {group_refusal(self.precision)}")
        if self.eval.cuda_graphs and not self.resources.use_gpu:
            raise RecipeError("eval.cuda_graphs: needs GPU workers; set resources.use_gpu: true or drop it")
        scores = score_names(self.eval)
        for where, metric in (("scheduler.metric", self.scheduler.metric),
                              ("mlflow.champion_metric", self.mlflow.champion_metric)):
            if metric is not None and metric not in scores:
                raise RecipeError(f"{where}: {metric!r} is not a score of eval.scorer {self.eval.scorer!r}; "
                                  f"choose from {', '.join(scores)}")
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
