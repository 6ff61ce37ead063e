"""`palp-sweep generate SOURCE --prompt ...`: sample an exported adapter with CFG, personalization guidance
or AlignIT on fixed seeds, save the images and a labelled grid, and score them: CLIP-T against the clean prompt, CLIP-I
against the reference images the adapter carries (skipped, with a line saying why, when they are missing).

    palp-sweep generate runs/smoke/.../adapter --prompt "A sketch of [V1]" --method cfg,pg,alignit --seeds 0,1,2,3
    palp-sweep generate "models:/palp-cat-a-sketch-of-v1@champion" --prompt "A sketch of [V1]" --method pg --omega 0.6

SOURCE is an adapter directory (manifest.json + LoRA + learned embeddings) or an MLflow model URI whose
artifacts hold one. Also runs as `python -m orchestrator.generate`.
"""

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from palp_trainer.config import (DEFAULT_OMEGA, METHODS, base_defaults, check_guidance_scale, check_seeds,
                                 parse_methods)
from palp_trainer.errors import DataError

from .cli_args import OneLineParser, UsageError, output_folder
from .recipe import slugify

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
_TRACKED = ("models:/", "runs:/")  # URIs the tracking store resolves
_TINY_TEXT_HIDDEN = 32  # palp_trainer.families.tiny's text encoder; real SD text encoders are 768 or 1024 wide


def _count(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="palp-sweep generate",
                description="Sample an adapter with CFG, personalization guidance (pg) or AlignIT on fixed seeds.")
    p.add_argument("source", help="exported adapter directory, or an MLflow model URI (models:/<name>@champion)")
    p.add_argument("--tracking-uri", help="where a models:/ or runs:/ SOURCE is registered "
                                          "(default: $MLFLOW_TRACKING_URI, else mlflow.db here, else "
                                          "~/palp-sweep/runs/mlflow.db)")
    p.add_argument("--prompt", required=True, help='with the adapter\'s placeholders, e.g. "A sketch of [V1]"')
    p.add_argument("--seeds", default="0,1,2,3", help="comma list; one image per seed (default 0,1,2,3)")
    p.add_argument("--steps", type=_count, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale w >= 1 (default 7.5)")
    p.add_argument("--method", default="cfg",
                   help=f"one of {', '.join(METHODS)}, or a comma list for a side-by-side grid (default cfg)")
    p.add_argument("--omega", default=str(DEFAULT_OMEGA),
                   help=f"pg's weak-model scale ω in [0, 1]; a comma list gives one pg row each (default {DEFAULT_OMEGA})")
    p.add_argument("--out", help="output folder, new or empty (default generated/<prompt slug>)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, over files of the same names")
    p.add_argument("--clip-model", help=f"CLIP for CLIP-T / CLIP-I (default {DEFAULT_CLIP}; 'tiny' for the tiny base; "
                                        "adapters of the world base are scored by its oracle judge)")
    p.add_argument("--no-score", action="store_true", help="skip scoring")
    p.add_argument("--sampler", choices=("ddim", "dpm"), default="ddim")
    p.add_argument("--batch-size", type=_count, default=4)
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    return p


def _numbers(text: str, kind, option: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{option}: expected a comma list of {kind.__name__}s, got {text!r}") from None
    return values


def _tracking(source: str, flag: str | None) -> None:
    """A models:/ or runs:/ SOURCE is resolved by the tracking store: check it before any loading."""
    if not source.startswith(_TRACKED):
        if flag:
            raise UsageError(f"--tracking-uri: only for a models:/ or runs:/ SOURCE, got {source!r}")
        return
    import mlflow

    from .registry_cli import open_store
    from .tracking import TrackingError
    try:
        mlflow.set_tracking_uri(open_store(flag))
    except TrackingError as e:
        raise UsageError(str(e)) from None


def _adapter_dir(source: str) -> Path:
    """The adapter folder: SOURCE itself, or the folder holding manifest.json in the downloaded MLflow model."""
    if "://" not in source and not source.startswith(_TRACKED):
        return Path(source)
    import mlflow
    from mlflow.exceptions import MlflowException

    from palp_trainer.export.adapter import MANIFEST_FILE
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
    except (MlflowException, OSError) as e:
        raise UsageError(f"{source}: cannot download it: {e}") from None
    manifests = sorted(local.rglob(MANIFEST_FILE), key=lambda p: len(p.parts))
    if not manifests:
        raise UsageError(f"{source}: the downloaded model holds no adapter ({MANIFEST_FILE})")
    return manifests[0].parent


def _default_clip(base_model: str) -> str:
    """'tiny' for the built-in tiny base (in code, or a folder written by `python -m palp_trainer.families.tiny`):
    scoring its 32 px toys needs no real CLIP download."""
    config = Path(base_model) / "text_encoder" / "config.json"
    if base_model == "tiny":
        return "tiny"
    try:
        hidden = json.loads(config.read_text()).get("hidden_size") if config.is_file() else None
    except (OSError, ValueError, AttributeError) as e:  # ValueError: not JSON; AttributeError: not an object
        raise UsageError(f"{config}: not a readable text-encoder config ({_first_line(e)})") from None
    return "tiny" if hidden == _TINY_TEXT_HIDDEN else DEFAULT_CLIP


def _references(adapter: Path, manifest: dict, used: list[str]) -> tuple[list[list] | None, str]:
    """Each prompted subject's reference images (PIL), which the adapter folder carries, or (None, why not)."""
    from palp_trainer.data import read_image

    refs = []
    for subject in manifest["subjects"]:
        if subject["token"] not in used:
            continue
        files = [adapter / image["file"] for image in subject["images"]]
        missing = [f for f in files if not f.is_file()]
        if not files:
            return None, f"the manifest lists no reference images for {subject['token']}"
        if missing:
            return None, (f"{len(missing)} of the {len(files)} reference images of {subject['token']} are missing "
                          f"from the adapter ({missing[0]})")
        try:
            refs.append([read_image(f) for f in files])
        except DataError as e:
            raise UsageError(f"reference image of {subject['token']}: {e}; pass --no-score to skip scoring") from None
    return refs, ""


@contextmanager
def _quiet_hub():
    """Offline, the hub client logs a line per retry of every file; the one error line says it once."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _run(args) -> int:
    omegas = _numbers(args.omega, float, "--omega")
    entries = [{"pg": {"omega": omegas}} if m == "pg" else m for m in args.method.split(",")]
    try:
        methods = parse_methods(entries)
    except ValueError as e:
        raise UsageError(str(e).replace("methods[", "--method entry [")) from None
    try:
        seeds = check_seeds(_numbers(args.seeds, int, "--seeds"), "--seeds")
        check_guidance_scale(args.guidance_scale, "--guidance-scale")
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = output_folder(args.out or Path("generated") / slugify(args.prompt), "--out", args.force)
    import torch  # seconds: only once the flags above are good (and never for --help)

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device: {_first_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if any(method == "pg" for _, method, _ in methods) and args.guidance_scale <= 1:
        raise UsageError(f"--guidance-scale: pg needs CFG (> 1), got {args.guidance_scale:g}")
    _tracking(args.source, args.tracking_uri)

    # diffusers' pipelines load in seconds: only after the command line is known to be good
    from palp_trainer.sampling.pipeline import pipeline_from
    from palp_trainer.export.adapter import load_adapter, read_manifest
    from palp_trainer.sampling.guidance import alignit_prompts, sample
    from palp_trainer.evaluation.scorers import scorer_kind
    from palp_trainer.evaluation.clip import placeholders_in, replace_placeholders

    adapter = _adapter_dir(args.source)
    manifest = read_manifest(adapter)  # AdapterError: one line naming the file and key
    used = placeholders_in(args.prompt, manifest["tokens"])
    if not used:
        raise UsageError(f"--prompt: {args.prompt!r} holds none of the adapter's placeholders "
                         f"{', '.join(manifest['tokens'])}")
    clean = replace_placeholders(args.prompt, manifest["placeholders"])

    scorer, refs, why = None, None, "--no-score"
    if not args.no_score:
        refs, why = _references(adapter, manifest, used)
    # the base's scorer (palp_trainer.evaluation.scorers), CLIP where --clip-model names one
    kind = scorer_kind("clip" if args.clip_model else base_defaults(manifest["base_model"]).scorer)
    if refs and kind.needs_references:  # the judge reads the subjects off their references: none, nothing to score
        scorer = kind.load(None, None, args.device)
    elif not args.no_score and not kind.needs_references:  # before sampling: a missing checkpoint fails in seconds
        clip = args.clip_model or _default_clip(manifest["base_model"])
        try:
            with _quiet_hub():
                scorer = kind.load(clip, None, args.device)
        except (OSError, ValueError) as e:
            raise UsageError(f"--clip-model {clip}: cannot load it ({_first_line(e)}); "
                             "pass a local CLIP folder, --clip-model tiny, or --no-score") from None

    try:
        with _quiet_hub():
            base, _ = load_adapter(adapter, args.device)
    except OSError as e:
        raise UsageError(f"base model {manifest['base_model']!r} of {adapter}: cannot load it "
                         f"({_first_line(e)})") from None
    pipe = pipeline_from(base, args.sampler)
    if args.steps > pipe.scheduler.config.num_train_timesteps:
        raise UsageError(f"--steps: at most the base model's {pipe.scheduler.config.num_train_timesteps} "
                         f"training timesteps, got {args.steps}")
    if any(method == "alignit" for _, method, _ in methods):
        try:  # p / p′ problems (spans that cannot be aligned) before anything is sampled
            alignit_prompts(pipe.tokenizer, args.prompt, manifest["placeholders"])
        except ValueError as e:
            raise UsageError(str(e)) from None

    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for label, method, kwargs in methods:
        rows[label] = sample(pipe, args.prompt, method, **kwargs, seeds=seeds, steps=args.steps,
                             guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                             resolution=manifest["resolution"], placeholders=manifest["placeholders"])
        for seed, image in zip(seeds, rows[label]):
            path = out / f"{label}-seed{seed}.png"
            image.save(path)
            print(path)
    grid = out / "grid.png"
    labelled_grid(rows, seeds).save(grid)
    print(f"{grid}  (rows: {', '.join(rows)}; columns: seeds {', '.join(map(str, seeds))})")

    if scorer is None:
        print(f"scores skipped: {why}")
        return 0
    width = max(map(len, rows))
    if kind.needs_references:  # the world judge
        subjects = [(s["token"], s["class_word"]) for s in manifest["subjects"] if s["token"] in used]
        print(f"scores of {args.prompt!r} by the world's oracle judge (probabilities):")
        for label, images in rows.items():
            s = scorer.score(images, args.prompt, subjects, refs)
            print(f"  {label:<{width}}  judge_text {s['judge_text']:.4f}  judge_subject {s['judge_subject']:.4f}  "
                  f"judge_success {s['judge_success']:.2f}")
        return 0
    if refs is None:  # CLIP-T needs only the prompt
        print(f"CLIP-I skipped: {why}")
    print(f"scores vs {clean!r} ({scorer.clip_id}, raw cosine):")
    for label, images in rows.items():
        if refs is None:
            print(f"  {label:<{width}}  clip_t {scorer.clip_t(images, clean):.4f}")
            continue
        s = scorer.score(images, clean, refs)
        print(f"  {label:<{width}}  clip_t {s['clip_t']:.4f}  clip_i {s['clip_i']:.4f}")
    return 0


def labelled_grid(rows: dict[str, list], seeds: list[int]):
    """One row per method, one column per seed, named in the picture: the methods in a band on the left, the seeds
    above (the corner says "seed"), black on white."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = next(iter(rows.values()))[0].size
    font = ImageFont.load_default(size=max(12, h // 12))  # 12 px beside the tiny base's 32 px, 42 px beside 512 px
    pad = font.size // 2
    left = max(font.getbbox(label)[2] for label in [*rows, "seed"]) + 2 * pad
    top = max(font.getbbox(str(seed))[3] for seed in seeds) + 2 * pad
    grid = Image.new("RGB", (left + w * len(seeds), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((left - pad, top // 2), "seed", fill="black", font=font, anchor="rm")
    for c, seed in enumerate(seeds):
        draw.text((left + c * w + w // 2, top // 2), str(seed), fill="black", font=font, anchor="mm")
    for r, (label, images) in enumerate(rows.items()):
        draw.text((pad, top + r * h + h // 2), label, fill="black", font=font, anchor="lm")
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB"), (left + c * w, top + r * h))
    return grid


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(_parser().parse_args(sys.argv[1:] if argv is None else argv))
    except (UsageError, DataError) as e:  # DataError: a bad image, or export's AdapterError
        print(f"palp-sweep: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
