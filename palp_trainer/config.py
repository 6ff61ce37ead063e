"""TrainConfig: everything `train_loop` reads. Plain frozen dataclasses; no Ray or MLflow types."""

from dataclasses import asdict, dataclass

TINY_RESOLUTION = 32  # px of the built-in tiny model (its VAE downsamples 2x: latents [4, 16, 16])
ALIGNMENTS = ("palp", "sds", "nfsd", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
SAMPLERS = ("ddim", "dpm")


@dataclass(frozen=True)
class SubjectSpec:
    """One subject: its images, its placeholder [V] and the prompt y_P that teaches it."""

    name: str
    token: str  # e.g. "[V1]"
    class_word: str  # e.g. "cat"; initializes the placeholder row and fills clean prompts
    images: tuple[str, ...]  # image files (folders already expanded)
    prompt: str  # y_P, e.g. "A photo of [V1]"


METHODS = ("cfg", "pg", "alignit")


def _method_labels(spec) -> list[str]:
    """Recipe method entries -> labels: "cfg", "alignit", "pg-0.6" (one per ω; MLflow-safe names)."""
    labels = []
    for entry in spec:
        if isinstance(entry, str) and "-" in entry:  # already a label (e.g. from to_dict)
            name, omega = entry.split("-", 1)
            entry = {name: {"omega": float(omega)}}
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"methods: each entry is a name or {{name: {{options}}}}, got {entry!r}")
        (name, options), = entry.items()
        if name not in METHODS:
            raise ValueError(f"methods: unknown method {name!r}; choose from {METHODS}")
        if name != "pg":
            labels.append(name)
            continue
        omegas = (options or {}).get("omega", 0.6)
        for omega in omegas if isinstance(omegas, (list, tuple)) else [omegas]:
            if not 0 <= float(omega) <= 1:
                raise ValueError(f"methods: pg omega must be in [0, 1], got {omega}")
            labels.append(f"pg-{float(omega):g}")
    return list(dict.fromkeys(labels))


def method_of(label: str) -> tuple[str, dict]:
    """"pg-0.6" -> ("pg", {"omega": 0.6})."""
    name, _, omega = label.partition("-")
    return name, ({"omega": float(omega)} if omega else {})


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
    methods: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(_method_labels(self.methods)))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.num_images < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("num_images, steps and batch_size must be >= 1")

    @property
    def image_seeds(self) -> tuple[int, ...]:
        return self.seeds or tuple(range(self.num_images))


@dataclass(frozen=True)
class TrainConfig:
    subjects: tuple[SubjectSpec, ...]
    target_prompt: str  # with placeholders, e.g. "An oil painting of [V1] inspired by [V2] painting"
    clean_prompt: str  # y^c: class words, no placeholder
    output_dir: str
    base_model: str = "tiny"  # "tiny" | hub id | local diffusers directory
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
    same_noise: bool = True  # re-noise x̂_0 with the personalization ε (Sec. 4)
    rescale: bool = True  # w̃(t) = √ᾱ/√(1−ᾱ) (Eq. 7 remark)
    t_range: tuple[int, int] = (0, 1000)  # timesteps drawn for both branches, [lo, hi)
    align_t_range: tuple[int, int] = (0, 1000)  # alignment term applied where t is in [lo, hi)
    subject_sampling: str = "uniform"  # "uniform" over subjects | "union" of all images
    flip: bool = True
    allow_upscale: bool = False
    checkpoint_every: int = 0  # 0: only at the end
    resume_from: str | None = None
    eval: EvalConfig | None = None
    progress: bool = True
    mlflow_uri: str | None = None  # rank 0 appends metrics/artifacts to this existing run
    mlflow_run_id: str | None = None

    def __post_init__(self):
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment: must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {PRECISIONS}, got {self.precision!r}")
        if self.subject_sampling not in ("uniform", "union"):
            raise ValueError(f"subject_sampling: must be 'uniform' or 'union', got {self.subject_sampling!r}")
        if not self.subjects:
            raise ValueError("subjects: at least one subject is needed")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.rank < 1:
            raise ValueError("steps, batch_size, grad_accum and rank must be >= 1")
        if any(m < 1 or m > self.steps for m in self.milestones):
            raise ValueError(f"milestones: each must be in [1, steps={self.steps}], got {self.milestones}")
        for name in ("t_range", "align_t_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi <= 1000:
                raise ValueError(f"{name}: need 0 <= lo < hi <= 1000, got {(lo, hi)}")

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

