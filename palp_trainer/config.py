"""TrainConfig: everything `train_loop` reads. Plain frozen dataclasses; no Ray or MLflow types."""

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

TINY_RESOLUTION = 32  # px of the built-in tiny and world bases (their VAEs downsample 2x: latents [4, 16, 16])
SMALL_BASES = ("tiny", "world", "tiny_xl")  # built-in CPU-sized bases: 32 px, fp32 by default
SCORERS = ("clip", "world")  # what eval.scorer may name: palp_trainer/evaluation/scorers.py implements each
ALIGNMENTS = ("palp", "sds", "nfsd", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
SAMPLERS = ("ddim", "dpm")
# what a base's UNet may predict (its scheduler's prediction_type): ε (SD-1.x, SD-2.x base) or v (SD-2.x 768)
PREDICTIONS = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class BaseDefaults:
    """What `null` means for a recipe's resolution, precision and eval.scorer on a base: the one home of that rule
    (recipes, `palp-sweep generate` and the trainer's callers read it)."""

    resolution: int
    precision: str
    scorer: str


def base_defaults(base_model: str) -> BaseDefaults:
    """The small built-in bases: 32 px, fp32 (CPU models); SDXL (a folder or a cached hub id whose
    model_index.json names StableDiffusionXLPipeline): 1024 px; else SD-1.x/2.x's 512 px; bf16 for both. Adapters
    of the world base are scored by its oracle judge, every other base's by CLIP."""
    small = base_model in SMALL_BASES
    scorer = "world" if base_model == "world" else "clip"
    if small:
        return BaseDefaults(TINY_RESOLUTION, "fp32", scorer)
    import json
    from pathlib import Path
    index = Path(base_model).expanduser() / "model_index.json"
    if not index.is_file() and base_model.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(base_model, "model_index.json")
        index = Path(cached) if isinstance(cached, str) else index
    try:
        xl = json.loads(index.read_text()).get("_class_name") == "StableDiffusionXLPipeline"
    except (OSError, ValueError):
        xl = False
    return BaseDefaults(1024 if xl else 512, "bf16", scorer)


@dataclass(frozen=True)
class SubjectSpec:
    """One subject: its images, its placeholder [V] and the prompt y_P that teaches it."""

    name: str
    token: str  # e.g. "[V1]"
    class_word: str  # e.g. "cat"; initializes the placeholder row and fills clean prompts
    images: tuple[str, ...]  # image files (folders already expanded)
    prompt: str  # y_P, e.g. "A photo of [V1]"


METHODS = ("cfg", "pg", "alignit")
DEFAULT_OMEGA = 0.6  # PG's best subject fidelity on SD 2.1 DB-LoRA+TI (papers/README.md)
_OPTIONS = {"cfg": (), "pg": ("omega",), "alignit": ()}


def check_omega(omega: float, where: str = "omega") -> float:
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not 0.0 <= omega <= 1.0:
        raise ValueError(f"{where}: ω must be a number in [0, 1] (0 = base model, 1 = plain CFG), got {omega!r}")
    return float(omega)


def check_guidance_scale(scale: float, where: str = "guidance_scale") -> float:
    # diffusers runs CFG only above 1; below it, any value would silently mean 1 (the conditional branch alone)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale < float("inf"):
        raise ValueError(f"{where}: CFG scale w must be a finite number >= 1 (1 = no CFG), got {scale!r}")
    return float(scale)


def check_seeds(seeds, where: str = "seeds") -> tuple[int, ...]:
    """Each seed once (a repeated seed repeats its image and weighs it twice in every mean), in torch's range."""
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"{where}: a seed must be an integer in [0, 2**64), got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: each seed once, got {list(seeds)}")
    return tuple(seeds)


def parse_methods(spec) -> list[tuple[str, str, dict]]:
    """Recipe list -> [(label, method, kwargs)]: `["cfg", {"pg": {"omega": [0.4, 0.6]}}, "alignit"]` ->
    `[("cfg", "cfg", {}), ("pg-0.4", "pg", {"omega": 0.4}), ("pg-0.6", "pg", {"omega": 0.6}), ("alignit", ...)]`.

    A bare "pg" means ω = DEFAULT_OMEGA. Labels are unique; they name metrics and files."""
    spec = [_from_label(e) for e in spec] if isinstance(spec, (list, tuple)) else spec
    if isinstance(spec, (str, dict)) or not spec:
        raise ValueError(f"methods: give a non-empty list such as ['cfg', 'pg', 'alignit'], got {spec!r}")
    out = []
    for i, entry in enumerate(spec):
        where = f"methods[{i}]"
        items = [(entry, {})] if isinstance(entry, str) else list(entry.items()) if isinstance(entry, dict) else None
        if not items:
            raise ValueError(f"{where}: expected a method name or {{name: {{option: value}}}}, got {entry!r}")
        for name, options in items:
            if name not in METHODS:
                raise ValueError(f"{where}: unknown method {name!r}; choose from {', '.join(METHODS)}")
            if not isinstance(options, dict):
                raise ValueError(f"{where}: options of {name!r} must be a mapping, got {options!r}")
            unknown = sorted(set(options) - set(_OPTIONS[name]))
            if unknown:
                allowed = ", ".join(_OPTIONS[name]) or "none"
                raise ValueError(f"{where}: {name!r} has no option {unknown[0]!r} (options: {allowed})")
            if name != "pg":
                out.append((name, name, {}))
                continue
            omegas = options.get("omega", DEFAULT_OMEGA)
            for omega in omegas if isinstance(omegas, (list, tuple)) else [omegas]:
                omega = check_omega(omega, f"{where}: pg")
                out.append((f"pg-{omega:g}", "pg", {"omega": omega}))  # MLflow-safe: no "@" in metric names
    labels = [label for label, _, _ in out]
    duplicate = next((label for label in labels if labels.count(label) > 1), None)
    if duplicate:
        raise ValueError(f"methods: {duplicate!r} is listed twice")
    return out


def _from_label(entry):
    """A label read back from to_dict ("pg-0.6") -> its recipe form ({"pg": {"omega": 0.6}})."""
    if isinstance(entry, str) and entry.startswith("pg-"):
        return {"pg": {"omega": float(entry[3:])}}
    return entry


def method_of(label: str) -> tuple[str, dict]:
    """"pg-0.6" -> ("pg", {"omega": 0.6})."""
    _, method, kwargs = parse_methods([label])[0]
    return method, kwargs


@dataclass(frozen=True)
class EvalConfig:
    """Milestone sampling and scoring (Sec. 5 protocol)."""

    num_images: int = 4
    seeds: tuple[int, ...] = ()  # empty: 0..num_images-1, the same in every trial
    sampler: str = "ddim"
    steps: int = 25
    guidance_scale: float = 7.5
    batch_size: int = 4
    clip_model: str = "openai/clip-vit-base-patch32"  # "tiny" builds a toy CLIP in code (tests)
    dino_model: str | None = None  # e.g. "facebook/dino-vits16"; None skips DINO
    elements: tuple[str, ...] = ()  # per-element text alignment (Table 2 columns)
    weight_text: float = 1.0  # composite = clip_t^wt * clip_i^wi, normalized (geometric mean)
    weight_image: float = 1.0
    # sampling methods compared on the finished trial: ["cfg", {"pg": {"omega": [0.4, 0.6]}}, "alignit"]
    methods: tuple[object, ...] = ()  # parsed by parse_methods into labels
    # milestone sampling replays the denoiser as a CUDA graph (CUDA only; opt-in until measured on a GPU)
    cuda_graphs: bool = False
    # "clip": CLIP-T / CLIP-I (/ DINO), meaningful with real weights; "world": the world's oracle judge
    # (judge_text / judge_subject, palp_trainer/world/judge.py). None: "world" for base_model world, else "clip"
    scorer: str | None = None

    def __post_init__(self):
        if self.methods:
            object.__setattr__(self, "methods", tuple(label for label, _, _ in parse_methods(list(self.methods))))
        if self.scorer is not None and self.scorer not in SCORERS:
            raise ValueError(f"scorer: must be one of {SCORERS}, got {self.scorer!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: must be one of {SAMPLERS}, got {self.sampler!r}")
        for name in ("num_images", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        check_guidance_scale(self.guidance_scale)
        check_seeds(self.seeds)

    @property
    def image_seeds(self) -> tuple[int, ...]:
        return self.seeds or tuple(range(self.num_images))


@dataclass(frozen=True)
class TrainConfig:
    subjects: tuple[SubjectSpec, ...]
    target_prompt: str  # with placeholders, e.g. "An oil painting of [V1] inspired by [V2] painting"
    clean_prompt: str  # y^c: class words, no placeholder
    # rank 0 writes samples, metrics.jsonl and the adapter here; with output_uri a relative path is under the
    # temp dir of the node rank 0 runs on
    output_dir: str
    base_model: str = "tiny"  # "tiny" | "world" | "tiny_xl" | hub id | local diffusers directory
    resolution: int = 512
    precision: str = "fp32"
    seed: int = 0
    steps: int = 500
    milestones: tuple[int, ...] = ()  # evaluate/report at these steps (and at `steps`)
    batch_size: int = 1  # per worker
    grad_accum: int = 1
    lr: float = 5e-5  # LoRA (App. C)
    embedding_lr: float = 5e-3  # the placeholder rows
    weight_decay: float = 1e-2
    rank: int = 32
    lora_alpha: float | None = None  # None: = rank (scale 1)
    alignment: str = "palp"
    alpha: float = 7.5  # CFG scale of the pre-trained branch (Eq. 5/6)
    beta: float = 1.0  # CFG scale of the personalized branch
    align_weight: float = 1.0  # λ
    align_every: int = 1  # the alignment term on every k-th step only, at weight k·λ (k = 1: every step, the paper)
    same_noise: bool = True  # re-noise x̂_0 with the personalization ε (Sec. 4)
    rescale: bool = True  # w̃(t) = √ᾱ/√(1−ᾱ) (Eq. 7 remark)
    t_range: tuple[int, int] = (0, 1000)  # timesteps drawn for both branches, [lo, hi)
    align_t_range: tuple[int, int] = (0, 1000)  # alignment term applied where t is in [lo, hi)
    subject_sampling: str = "uniform"  # "uniform" over subjects | "union" of all images
    flip: bool = True
    allow_upscale: bool = False
    checkpoint_every: int = 0  # 0: only at the end
    resume_from: str | None = None
    # storage URI (s3://...) that output_dir is copied to, so the outputs outlive the node; subject images may
    # be storage URIs too (fetched once per node)
    output_uri: str | None = None
    eval: EvalConfig | None = None
    progress: bool = True
    mlflow_uri: str | None = None  # rank 0 appends metrics/artifacts to this existing run
    mlflow_run_id: str | None = None
    # set under an early-stopping scheduler: after each milestone but the last, wait for its decision
    # (published under this key, see worker.scheduler_decision) and stop there if it says so
    scheduler_key: str | None = None

    def __post_init__(self):
        for name, knob in KNOBS.items():
            check_knob(name, getattr(self, name))
        if not self.subjects:
            raise ValueError("subjects: at least one subject is needed")
        if any(m < 1 or m > self.steps for m in self.milestones):
            raise ValueError(f"milestones: each must be in [1, steps={self.steps}], got {self.milestones}")

    def to_dict(self) -> dict:
        """Plain nested dicts (what Ray passes to workers); `from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["subjects"] = tuple(SubjectSpec(**{**s, "images": tuple(s["images"])}) for s in d["subjects"])
        if d.get("eval") is not None:
            d["eval"] = EvalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["eval"].items()})
        for key in ("milestones", "t_range", "align_t_range"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(s.token for s in self.subjects)

    @property
    def report_steps(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.milestones) | {self.steps}))



@dataclass(frozen=True)
class Knob:
    """What kind of TrainConfig field a knob is, and its rule. KNOBS has one row per field; every list of knobs
    elsewhere (a recipe's train and search sections, what trial-group members may differ in, what the TI+DB
    baseline never reads, a trial's MLflow params, the adapter's manifest, the registry's key tags) reads it."""

    check: Callable[[object], bool] | None = None  # the value's rule, with `problem` saying it
    problem: str = ""
    train: bool = False  # a recipe's `train:` section sets it once for every trial
    searchable: bool = False  # a `search:` dim may sweep it
    group: bool = False  # trial-group members may differ in it: the step reads it per row, or the optimizer
    alignment_only: bool = False  # only the alignment term reads it: the baseline (alignment: none) never does
    per_trial: bool = False  # a trial's own places and names, not a training knob
    param: bool = True  # logged as a param of the trial's MLflow run (subjects, prompts, eval: the parent run's)
    manifest: bool = False  # in the adapter's manifest (palp.json), as it is
    key_tag: int = 0  # > 0: a registered version's key tag, shown first by `palp-sweep models`, in this order


_AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
_POSITIVE = (lambda v: v > 0, "must be > 0")
_T_RANGE = (lambda v: 0 <= v[0] < v[1] <= 1000, "need 0 <= lo < hi <= 1000")
_ALIGNMENT_KNOB = dict(train=True, searchable=True, alignment_only=True, manifest=True)

# in the order recipes list them: the searchable knobs in the order a trial's label names them ("palp α7.5 r4")
KNOBS = {
    "subjects": Knob(param=False),
    "target_prompt": Knob(manifest=True),
    "clean_prompt": Knob(manifest=True),
    "output_dir": Knob(per_trial=True, param=False),
    "base_model": Knob(manifest=True, key_tag=6),
    "resolution": Knob(lambda v: v >= 8 and v % 8 == 0, "must be a positive multiple of 8", manifest=True),
    "precision": Knob(lambda v: v in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
    "seed": Knob(),
    "steps": Knob(*_AT_LEAST_1, key_tag=5),
    "milestones": Knob(),
    "batch_size": Knob(*_AT_LEAST_1, train=True),
    "grad_accum": Knob(*_AT_LEAST_1, train=True),
    "alpha": Knob(*_POSITIVE, group=True, key_tag=2, **_ALIGNMENT_KNOB),
    "beta": Knob(*_POSITIVE, group=True, key_tag=3, **_ALIGNMENT_KNOB),
    "rank": Knob(*_AT_LEAST_1, train=True, searchable=True, manifest=True, key_tag=4),
    "lr": Knob(*_POSITIVE, train=True, searchable=True, group=True),
    "embedding_lr": Knob(lambda v: v >= 0, "must be >= 0 (0 freezes the placeholder rows)", train=True,
                         searchable=True, group=True),
    "align_weight": Knob(lambda v: v >= 0, "must be >= 0", group=True, **_ALIGNMENT_KNOB),
    "align_every": Knob(lambda v: v >= 1, "must be >= 1 (1: the alignment term on every step)", **_ALIGNMENT_KNOB),
    "alignment": Knob(lambda v: v in ALIGNMENTS, f"must be one of {', '.join(ALIGNMENTS)}", train=True,
                      searchable=True, manifest=True, key_tag=1),
    "same_noise": Knob(train=True, searchable=True, alignment_only=True),
    "weight_decay": Knob(lambda v: v >= 0, "must be >= 0", train=True),
    "lora_alpha": Knob(lambda v: v is None or v > 0, "must be > 0 (or null: = rank)", train=True),
    "rescale": Knob(train=True),
    "t_range": Knob(*_T_RANGE, train=True),
    "align_t_range": Knob(*_T_RANGE, train=True),
    "subject_sampling": Knob(lambda v: v in ("uniform", "union"), "must be 'uniform' or 'union'", train=True),
    "flip": Knob(train=True),
    "allow_upscale": Knob(train=True),
    "checkpoint_every": Knob(lambda v: v >= 0, "must be >= 0 (0: only at the end)", train=True),
    "resume_from": Knob(per_trial=True, param=False),
    "output_uri": Knob(per_trial=True, param=False),
    "eval": Knob(param=False),
    "progress": Knob(param=False),
    "mlflow_uri": Knob(per_trial=True, param=False),
    "mlflow_run_id": Knob(per_trial=True, param=False),
    "scheduler_key": Knob(per_trial=True, param=False),
}
assert sorted(KNOBS) == sorted(f.name for f in fields(TrainConfig)), "KNOBS: one row per TrainConfig field"


def knobs_where(kind: str) -> tuple[str, ...]:
    """The knobs of one kind, in KNOBS' order: knobs_where("group") -> ("alpha", "beta", "lr", ...)."""
    return tuple(name for name, knob in KNOBS.items() if getattr(knob, kind))


def check_knob(name: str, value) -> None:
    """KNOBS[name]'s rule on `value`: a ValueError `name: problem, got value` (a recipe prefixes its field path)."""
    knob = KNOBS[name]
    if knob.check is not None and not knob.check(value):
        raise ValueError(f"{name}: {knob.problem}, got {value!r}")


def key_tags() -> tuple[str, ...]:
    """The knobs a person compares registered versions by, in their order (alignment, α, β, rank, steps, base)."""
    return tuple(sorted(knobs_where("key_tag"), key=lambda k: KNOBS[k].key_tag))


GROUP_KNOBS = knobs_where("group")
ALIGNMENT_ONLY = knobs_where("alignment_only")


def group_refusal(precision: str) -> str | None:
    """Why trials at this precision cannot share a trial group, or None."""
    if precision == "fp16":
        return ("a group's members would share fp16's loss scale (one member's overflow skips every member's "
                "step); use precision bf16 or fp32")
    return None


def group_key(config: TrainConfig) -> str:
    """Trials with equal keys can share a trial group (palp_trainer/objective/group.py): the config without GROUP_KNOBS and
    the per-trial fields."""
    leave_out = GROUP_KNOBS + knobs_where("per_trial")
    return repr(sorted((k, v) for k, v in config.to_dict().items() if k not in leave_out))
