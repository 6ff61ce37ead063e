"""Quality in the world (benchmarks/QUALITY.md): the judge's validation, the base's prompt following, and
PALP's Table 2 (text alignment vs subject fidelity against the TI+DB baseline), on CPU.

    python benchmarks/quality_bench.py judge            # judge accuracy per attribute: clean / VAE / blur / noise
    python benchmarks/quality_bench.py base             # the world base on held-out and seen combinations
    python benchmarks/quality_bench.py grid --seeds 1 --steps 300   # the dev pair over α × λ (QUALITY.md)
    python benchmarks/quality_bench.py table2           # PALP vs TI+DB (+ SDS, NFSD on a subset), with 95 % CIs

Each writes benchmarks/results/quality-<what>.json and prints markdown; table2 also writes a sample grid
and the overfitting diagnostic (x̂0 from pure noise, Sec. 4.3 / Fig. 5) as PNGs.
"""

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from datetime import date
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from palp_trainer.config import EvalConfig, SubjectSpec, TrainConfig
from palp_trainer.data import read_image
from palp_trainer.evaluation.clip import replace_placeholders
from palp_trainer.families.base import load_base
from palp_trainer.loops.solo import train_loop
from palp_trainer.sampling.pipeline import generate, pipeline_from
from palp_trainer.world import render as world
from palp_trainer.world.judge import HEADS, WorldJudge, _blur
from palp_trainer.world.pretrain import vae_roundtrip

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent.parent / "recipes" / "data" / "world"


def _header() -> dict:
    return {"date": date.today().isoformat(), "device": f"CPU ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)", "torch": torch.__version__}


def _write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"quality-{name}.json"
    path.write_text(json.dumps({**_header(), **payload}, indent=2))
    return path


# ---- the judge -------------------------------------------------------------------------------------------

def _degrade(images: np.ndarray, kind: str, g: torch.Generator) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if kind == "blur":
        x = _blur(x, torch.full((len(x),), 1.0))
    elif kind == "noise":
        x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return (x * 255).round().byte().permute(0, 2, 3, 1).numpy()


def accuracy(judge: WorldJudge, images: np.ndarray, attrs: list[world.Attrs]) -> dict:
    read = judge.read(images)
    out = {h: float(np.mean([getattr(r, h) == getattr(a, h) for r, a in zip(read, attrs)])) for h in HEADS}
    out["all"] = float(np.mean([r == a for r, a in zip(read, attrs)]))
    return out


def bench_judge(n: int) -> dict:
    judge, vae = WorldJudge(), load_base("world").vae
    rng = np.random.default_rng(12345)  # the judge trained on seed 7, the base's pool on seed 1
    attrs = [world.random_attrs(rng) for _ in range(n)]
    images = world.render_many(attrs, 12345)
    g = torch.Generator().manual_seed(0)
    conditions = {"clean": images, "vae": vae_roundtrip(vae, images), "blur σ=1px": _degrade(images, "blur", g),
                  "noise σ=0.05": _degrade(images, "noise", g)}
    conditions["vae+noise"] = _degrade(conditions["vae"], "noise", g)
    table = {name: accuracy(judge, imgs, attrs) for name, imgs in conditions.items()}
    # per class, through the VAE: the weakest class of each head
    read = judge.read(conditions["vae"])
    worst = {}
    for h, classes in HEADS.items():
        per = {c: float(np.mean([getattr(r, h) == c for r, a in zip(read, attrs) if getattr(a, h) == c]))
               for c in classes}
        worst[h] = min(per.items(), key=lambda kv: kv[1])
    print(f"| condition | {' | '.join(HEADS)} | all four |\n|---|{'---|' * (len(HEADS) + 1)}")
    for name, acc in table.items():
        print(f"| {name} | " + " | ".join(f"{100 * acc[h]:.1f} %" for h in HEADS) + f" | {100 * acc['all']:.1f} % |")
    print("weakest class through the VAE: " + ", ".join(f"{h}: {c} {100 * v:.1f} %" for h, (c, v) in worst.items()))
    return {"n": n, "accuracy": table, "weakest_class_vae": worst}


# ---- the base --------------------------------------------------------------------------------------------

def bench_base(seeds: int, guidance: float, steps: int) -> dict:
    judge, base = WorldJudge(), load_base("world")
    pipe = pipeline_from(base, "ddim")
    rng = np.random.default_rng(0)
    seen = [world.SEEN[i] for i in rng.choice(len(world.SEEN), len(world.HELD_OUT), replace=False)]
    out = {}
    for name, combos in (("held_out", world.HELD_OUT), ("seen", seen)):
        images, attrs = [], []
        for k, a in enumerate(combos):
            images += generate(pipe, world.caption(a), tuple(range(1000 * k, 1000 * k + seeds)), steps, guidance,
                               seeds, world.RESOLUTION)
            attrs += [a] * seeds
        out[name] = accuracy(judge, np.stack([np.asarray(im) for im in images]), attrs)
        out[name]["mean_attribute"] = float(np.mean([out[name][h] for h in HEADS]))
        out[name]["n"] = len(images)
        if name == "held_out":
            _grid(images[:seeds * 12], [world.caption(a) for a in combos[:12]], seeds,
                  RESULTS / "quality-base-held-out.png")
    print("| combinations | images | shape | colour | background | style | mean attribute | all four |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, acc in out.items():
        print(f"| {name} | {acc['n']} | " + " | ".join(f"{100 * acc[h]:.1f} %" for h in HEADS)
              + f" | {100 * acc['mean_attribute']:.1f} % | {100 * acc['all']:.1f} % |")
    return {"seeds_per_combination": seeds, "guidance_scale": guidance, "steps": steps, **out}


def _grid(images: list, labels: list[str], per_row: int, path: Path, scale: int = 3) -> Path:
    """Rows of `per_row` images, each row labelled on the left."""
    size = world.RESOLUTION * scale
    label_w = 260
    rows = (len(images) + per_row - 1) // per_row
    canvas = Image.new("RGB", (label_w + per_row * size, rows * size), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, c = divmod(i, per_row)
        canvas.paste(im.resize((size, size), Image.NEAREST), (label_w + c * size, r * size))
    for r, text in enumerate(labels[:rows]):
        draw.text((4, r * size + size // 2 - 6), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---- Table 2 ---------------------------------------------------------------------------------------------

SUBJECTS = {  # name -> token, class word (world.SUBJECT_CLASS)
    "moon": ("[V1]", "circle"), "house": ("[V1]", "square"), "arrow": ("[V1]", "triangle")}
PROMPTS = ("a sketch of a [V1] on grass", "a painting of a [V1] in the sky", "a photo of a blue [V1] on brick")


def subject_spec(name: str, token: str, class_word: str) -> SubjectSpec:
    images = tuple(sorted(str(p) for p in (DATA / name).glob("*.png")))
    return SubjectSpec(name, token, class_word, images, f"a photo of a {token}")


def train_config(subject: str, prompt: str, alignment: str, seed: int, out: Path, args) -> TrainConfig:
    token, cls = SUBJECTS[subject]
    spec = subject_spec(subject, token, cls)
    ev = EvalConfig(num_images=args.images, steps=args.sample_steps, guidance_scale=args.guidance,
                    batch_size=args.images, scorer="world", seeds=tuple(range(100, 100 + args.images)))
    return TrainConfig(
        subjects=(spec,), target_prompt=prompt, clean_prompt=replace_placeholders(prompt, {token: cls}),
        output_dir=str(out), base_model="world", resolution=world.RESOLUTION, precision="fp32", seed=seed,
        steps=args.steps, batch_size=args.batch, lr=args.lr, embedding_lr=args.embedding_lr, rank=args.rank,
        alignment=alignment, alpha=args.alpha, beta=1.0, align_weight=args.align_weight, flip=False,
        eval=ev, progress=False)


def _ci(values: list[float], rng: np.random.Generator, n_boot: int = 10000) -> tuple[float, float, float]:
    """Mean and 95 % percentile-bootstrap interval over runs."""
    v = np.asarray(values, dtype=float)
    boots = v[rng.integers(len(v), size=(n_boot, len(v)))].mean(1)
    return float(v.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


@torch.no_grad()
def x0_from_noise(base, prompt: str, guidance: float, seeds: tuple[int, ...]) -> list[Image.Image]:
    """Sec. 4.3 / Fig. 5: x̂0 = (x_T − √(1−ᾱ_T)·ε̂) / √ᾱ_T at the last timestep, decoded: what the model
    believes the prompt looks like before any denoising."""
    pipe = pipeline_from(base, "ddim")
    enc = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    cond, uncond = enc[0], enc[1]
    t = torch.tensor([base.noise_scheduler.config.num_train_timesteps - 1])
    a = base.noise_scheduler.alphas_cumprod[t]
    images = []
    for s in seeds:
        x = torch.randn((1, 4, world.RESOLUTION // 2, world.RESOLUTION // 2), generator=torch.Generator().manual_seed(s))
        e_c, e_u = base.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).sample.chunk(2)
        x0 = (x - (1 - a).sqrt() * (e_u + guidance * (e_c - e_u))) / a.sqrt()
        img = base.vae.decode(x0 / base.vae.config.scaling_factor).sample.clamp(-1, 1)
        images.append(Image.fromarray(((img[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()))
    return images


def _train_run(job) -> dict:
    """One training run (a pool worker, one thread): its judge scores, 4 sample tiles, x̂0-from-noise tiles."""
    i, subject, prompt, alignment, seed, args, tmp = job
    torch.set_num_threads(1)
    config = train_config(subject, prompt, alignment, seed, Path(tmp) / str(i), args)
    base = load_base("world")
    m = train_loop(config, base)
    row = {"subject": subject, "prompt": prompt, "alignment": alignment, "seed": seed, "alpha": args.alpha,
           "align_weight": args.align_weight, "steps": args.steps, "train_seconds": m["train_seconds"],
           **{k: m[k] for k in m if k.startswith("judge_") or k == "composite"}}
    tiles = _split(Image.open(m["samples"]).convert("RGB"), args.images)[:4]
    diag = x0_from_noise(base, prompt, args.guidance, (0, 1, 2, 3)) if subject == "moon" else []
    return {"row": row, "tiles": tiles, "diag": diag}


def _run_all(jobs: list, workers: int) -> list[dict]:
    started = time.perf_counter()
    out = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # no fork of an OpenMP parent
        for k, r in enumerate(pool.imap(_train_run, jobs)):
            row = r["row"]
            print(f"[{k + 1}/{len(jobs)} {time.perf_counter() - started:.0f}s] {row['subject']:<6} {row['alignment']:<5} "
                  f"α {row['alpha']:g} λ {row['align_weight']:g} s{row['seed']} {row['prompt']:<34} "
                  f"text {row['judge_text']:.3f} subject {row['judge_subject']:.3f} success {row['judge_success']:.2f}",
                  flush=True)
            out.append(r)
    return out


def _summary(runs: list[dict], methods: list[str], rng) -> tuple[dict, dict]:
    keys = ("judge_text", "judge_subject", "judge_success")
    table = {}
    for method in methods:
        rows = [r for r in runs if r["alignment"] == method]
        if rows:
            table[method] = {k: _ci([r[k] for r in rows], rng) for k in keys}
            table[method]["runs"] = len(rows)
    # paired: PALP minus TI+DB on the same (subject, prompt, seed)
    key = lambda r: (r["subject"], r["prompt"], r["seed"])  # noqa: E731
    none = {key(r): r for r in runs if r["alignment"] == "none"}
    paired = {k: _ci([r[k] - none[key(r)][k] for r in runs if r["alignment"] == "palp" and key(r) in none], rng)
              for k in keys}
    print("\n| method | runs | text alignment | subject fidelity | success (all attributes) |\n|---|---|---|---|---|")
    for method, t in table.items():
        print(f"| {method} | {t['runs']} | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                                                          (t["judge_text"], t["judge_subject"], t["judge_success"])) + " |")
    print("| PALP − TI+DB (paired) | | " + " | ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in
                                                      paired.values()) + " |")
    return table, paired


def bench_grid(args) -> dict:
    """The dev pair (moon, the first prompt) over α × λ, beside TI+DB: where PALP's settings were chosen."""
    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            jobs.append((len(jobs), "moon", PROMPTS[0], "none", seed, args, tmp))
            for alpha, lam in itertools.product(args.grid_alpha, args.grid_lambda):
                jobs.append((len(jobs), "moon", PROMPTS[0], "palp", seed,
                             argparse.Namespace(**{**vars(args), "alpha": alpha, "align_weight": lam}), tmp))
        results = _run_all(jobs, args.workers)
    runs = [r["row"] for r in results]
    print("\n| arm | α | λ | text alignment | subject fidelity | success |\n|---|---|---|---|---|---|")
    settings = sorted({(r["alignment"], r["alpha"] if r["alignment"] != "none" else 0, r["align_weight"]
                        if r["alignment"] != "none" else 0) for r in runs})
    for arm, alpha, lam in settings:
        rows = [r for r in runs if r["alignment"] == arm and (arm == "none" or (r["alpha"], r["align_weight"]) == (alpha, lam))]
        print(f"| {arm} | {alpha:g} | {lam:g} | " + " | ".join(
            f"{np.mean([r[k] for r in rows]):.3f}" for k in ("judge_text", "judge_subject", "judge_success")) + " |")
    return {"settings": {k: v for k, v in vars(args).items() if k != "what"}, "runs": runs}


def bench_table2(args) -> dict:
    rng = np.random.default_rng(0)
    plan = [(s, p, a, seed) for s in SUBJECTS for p in PROMPTS for a in ("palp", "none") for seed in range(args.seeds)]
    plan += [("moon", PROMPTS[0], a, seed) for a in ("sds", "nfsd") for seed in range(args.seeds)]
    grid_images, grid_labels, diag_images, diag_labels = [], [], [], []
    judge = WorldJudge()
    with tempfile.TemporaryDirectory() as tmp:
        results = _run_all([(i, *entry, args, tmp) for i, entry in enumerate(plan)], args.workers)
    runs = [r["row"] for r in results]
    for r in results:
        row = r["row"]
        if row["seed"] == 0 and row["prompt"] == PROMPTS[0] and row["subject"] == "moon":
            grid_images += r["tiles"]
            grid_labels.append(f"{row['alignment']}: {replace_placeholders(row['prompt'], {'[V1]': 'moon'})}")
            diag_images += r["diag"]
            diag_labels.append(f"{row['alignment']}: x0 from noise")
    # the reference row (Fig. 6): the base prompted with the class word, scored against each subject
    for subject, (token, cls) in SUBJECTS.items():
        base = load_base("world")
        pipe = pipeline_from(base, "ddim")
        refs = [[read_image(f) for f in subject_spec(subject, token, cls).images]]
        for prompt in PROMPTS:
            clean = replace_placeholders(prompt, {token: cls})
            for seed in range(args.seeds):
                seeds = tuple(range(100 + 1000 * seed, 100 + 1000 * seed + args.images))
                images = generate(pipe, clean, seeds, args.sample_steps, args.guidance, args.images, world.RESOLUTION)
                s = judge.score(images, prompt, [(token, cls)], refs)
                runs.append({"subject": subject, "prompt": prompt, "alignment": "base (class word)", "seed": seed,
                             **{k: v for k, v in s.items() if k.startswith("judge_") or k == "composite"}})
                if subject == "moon" and prompt == PROMPTS[0] and seed == 0:
                    grid_images += images[:4]
                    grid_labels.append(f"base: {clean}")
                    diag_images += x0_from_noise(base, clean, args.guidance, (0, 1, 2, 3))
                    diag_labels.append("base (class word): x0 from noise")
    _grid(grid_images, grid_labels, 4, RESULTS / "quality-table2-samples.png")
    _grid(diag_images, diag_labels, 4, RESULTS / "quality-x0-from-noise.png")
    table, paired = _summary(runs, ["palp", "none", "sds", "nfsd", "base (class word)"], rng)
    return {"settings": {k: v for k, v in vars(args).items() if k != "what"}, "table": table, "paired": paired,
            "runs": runs}


def _split(grid: Image.Image, n: int) -> list[Image.Image]:
    """The tiles of a save_grid image (square tiles of 32 px)."""
    s = world.RESOLUTION
    cols = grid.width // s
    return [grid.crop(((i % cols) * s, (i // cols) * s, (i % cols + 1) * s, (i // cols + 1) * s)) for i in range(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("judge", "base", "grid", "table2"))
    parser.add_argument("--workers", type=int, default=2, help="grid, table2: training runs at once (1 thread each)")
    parser.add_argument("--grid-alpha", type=float, nargs="+", default=[2.0, 5.0])
    parser.add_argument("--grid-lambda", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--n", type=int, default=3000, help="judge: validation renders")
    parser.add_argument("--seeds", type=int, default=2, help="base: per combination; table2: training seeds")
    parser.add_argument("--images", type=int, default=8, help="table2: samples scored per run")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--sample-steps", type=int, default=25)
    # 500: toward where TI+DB overfits the references' context on the dev pair (300: not yet; 1,000: on one
    # seed of two), at a cost the table can pay on 2 cores (QUALITY.md)
    parser.add_argument("--steps", type=int, default=500, help="grid, table2: training steps per run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--embedding-lr", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--align-weight", type=float, default=0.3, help="λ")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(True)
    if args.what == "judge":
        result = bench_judge(args.n)
    elif args.what == "base":
        result = bench_base(args.seeds, args.guidance, args.sample_steps)
    elif args.what == "grid":
        result = bench_grid(args)
    else:
        result = bench_table2(args)
    print(_write(args.what, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
