"""Step benchmark: plain LoRA+TI (alignment none) against PALP, through the trainer's own step.

    python benchmarks/step_bench.py --json results.json                 # GPU: full-size SD-1.5, bf16
    python benchmarks/step_bench.py --tiny                              # CPU smoke test (times mean nothing)
    python benchmarks/step_bench.py --variants eager fast fast-cuda_graphs --batches 1 16
    python benchmarks/step_bench.py --train-steps 500 --json tta.json   # time-to-adapter through train_loop
    python benchmarks/step_bench.py --sdxl --batches 1 --json sdxl.json  # GPU: SDXL-size, 1024 px, bf16, rank 32

The architecture is SD-1.5's UNet and CLIP-L's text encoder with random weights (nothing downloaded);
latents are random [B, 4, 64, 64] (the trainer caches VAE latents, so the VAE is not in the step). `--sdxl`:
SDXL-base's UNet and its two text encoders (CLIP-L, OpenCLIP-bigG), latents [B, 4, 128, 128] (1024 px).
Each step is `loop.train_step`, the function `loop.train_loop` calls (make_batch, training_step, one host
sync for the loss terms, backward, AdamW step, zero_grad), on the model that `models.build` and
`loop.make_optimizer` return.

A variant names the task's FastPaths: `eager` (all off: the plain step), `fast` (FastPaths.auto: what the
trainer uses on this device), then `-knob` / `+knob` to switch one off / on, e.g. `fast-cuda_graphs`.
"""

import argparse
import dataclasses
import gc
import itertools
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from palp_trainer.config import TINY_RESOLUTION, EvalConfig, SubjectSpec, TrainConfig
from palp_trainer.data import SubjectLatents
from palp_trainer.families import base as models
from palp_trainer.families.base import Base, load_base
from palp_trainer.families.sd import SDXL
from palp_trainer.families.tiny import SD1_SCHEDULER, build_tokenizer
from palp_trainer.loops import solo as loop
from palp_trainer.objective.task import FastPaths, PalpModel, PalpTask

# SD-1.5's unet/config.json (the diffusers defaults, with CLIP-L's 768-d cross-attention)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# CLIP ViT-L/14's text tower (SD-1.x text_encoder/config.json)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# its text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower, with the projection whose output is pooled
CLIP_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
# SD-1.5's vae/config.json: only train_loop runs (latent cache, milestone decoding) use it
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
MODES = {  # mode -> TrainConfig overrides
    "lora_ti": {"alignment": "none"},
    "palp": {"alignment": "palp"},
    "palp_every2": {"alignment": "palp", "align_every": 2},  # the alignment term on every 2nd step, at 2λ
}
DEFAULT_MODES = ("lora_ti", "palp")
SCALER_OFF = torch.amp.GradScaler("cpu", enabled=False)  # what train_loop makes for bf16 and fp32
KNOBS = tuple(f.name for f in dataclasses.fields(FastPaths))
# not FastPaths knobs (they live outside the task): measured here to decide whether the loop should adopt them
LOOP_KNOBS = ("cudnn_benchmark", "fused_adamw")


def random_base(device: torch.device, tiny: bool, xl: bool = False) -> Base:
    """The tiny model, or SD-1.5's (`xl`: SDXL's) architecture with random weights built on `device` (as load_base
    leaves it)."""
    if tiny:
        return load_base("tiny_xl" if xl else "tiny")
    tokenizer = build_tokenizer()  # ids only need to be valid for the 49408-row table
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL_UNET if xl else SD15_UNET))
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **ids)) if xl else None
        vae = AutoencoderKL(**SD_VAE)
    base = Base("sdxl-random" if xl else "sd15-random", tokenizer, text_encoder, vae, unet,
                DDPMScheduler(**SD1_SCHEDULER), *((SDXL(), build_tokenizer(), text_encoder_2) if xl else ()))
    for module in base.frozen:
        module.requires_grad_(False)
        module.eval()
    return base


class RandomLatents(SubjectLatents):
    """Cached 'VAE latents' [N, 4, h, w] drawn at random; `draw` is SubjectLatents' own."""

    def __init__(self, n: int, size: int, device: torch.device, dtype: torch.dtype):
        self.latents = torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        self.subject = torch.zeros(n, dtype=torch.long, device=device)
        self.num_subjects = 1
        pixels = 8 * size  # photos of the training size, uncropped (SDXL's add_time_ids; other families ignore them)
        self.time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * n, dtype=torch.float32, device=device)


def parse_variant(name: str, device: torch.device, dtype: torch.dtype, batch_size: int = 1) -> FastPaths:
    """`eager`, `fast`, then any `-knob` / `+knob`, e.g. `fast-cuda_graphs`, `eager+lora_compute_dtype`."""
    head, changes = re.fullmatch(r"(eager|fast)((?:[+-]\w+)*)", name).groups()
    fast = FastPaths() if head == "eager" else FastPaths.auto(device, dtype, distributed=False, batch_size=batch_size)
    for sign, knob in re.findall(r"([+-])(\w+)", changes):
        if knob in LOOP_KNOBS:
            continue
        if knob not in KNOBS:
            raise SystemExit(f"variant {name}: unknown knob {knob!r}; knobs: {', '.join(KNOBS)}")
        fast = dataclasses.replace(fast, **{knob: sign == "+"})
    return fast


def bench_config(tiny: bool, out_dir: str, xl: bool = False, **overrides) -> TrainConfig:
    fields = dict(
        subjects=(SubjectSpec("cat", "[V1]", "cat", (), "A photo of [V1]"),),
        target_prompt="A sketch of [V1]", clean_prompt="A sketch of cat", output_dir=out_dir,
        base_model=("tiny_xl" if xl else "tiny") if tiny else ("sdxl-random" if xl else "sd15-random"),
        resolution=TINY_RESOLUTION if tiny else 1024 if xl else 512,
        precision="fp32" if tiny else "bf16", rank=4 if tiny else 32, progress=False,
    )
    return TrainConfig(**{**fields, **overrides})


def loop_step(task: PalpTask, data, optimizer, generator, batch_size: int, step: int) -> dict:
    """train_loop's step itself (grad_accum 1, world size 1; bf16/fp32, so the scaler is off)."""
    return loop.train_step(task, data, optimizer, SCALER_OFF, generator, batch_size, step=step)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(task: PalpTask, data, optimizer, batch_size: int) -> float:
    """FLOPs per step (forward + backward), averaged over one `align_every` cycle, counted on the eager path
    (a graph replay dispatches nothing)."""
    counter = FlopCounterMode(display=False)
    k = task.config.align_every
    with counter:
        for step in range(k):
            batch = task.make_batch(torch.Generator().manual_seed(123), data, batch_size)
            sum(task.training_step(batch, align=task.aligns_at(step)).values()).backward()
    optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / k


KERNEL_CLASSES = (  # first match wins; names as cuDNN / cuBLAS / PyTorch print them
    ("layout (nchw<->nhwc)", r"nchwToNhwc|nhwcToNchw|convertTensor|transpose_readWrite"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn_generated_fort_native_sdpa"),
    ("conv", r"conv|implicit_gemm|xmma_fprop|dgrad|wgrad|sm90_xmma"),
    ("gemm", r"gemm|cutlass|Kernel2|nvjet|splitK"),
    ("norm", r"norm|welford|Norm"),
    ("copy/cast", r"copy|Copy|cast|to_copy"),
    ("elementwise", r"elementwise|vectorized|unrolled|foreach|multi_tensor"),
    ("reduce", r"reduce|Reduce|sum"),
)


def profile_steps(task, data, optimizer, batch_size: int, steps: int, device) -> dict:
    """Kernel time by class, top kernels and launch counts per step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    generator = torch.Generator().manual_seed(7)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in range(steps):
            loop_step(task, data, optimizer, generator, batch_size, step)
        sync(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    per_step = lambda us: us / steps / 1000  # µs total -> ms per step
    classes: dict[str, float] = {}
    for e in kernels:
        label = next((c for c, pat in KERNEL_CLASSES if re.search(pat, e.key)), "other")
        classes[label] = classes.get(label, 0.0) + per_step(e.self_device_time_total)
    launches = {e.key: e.count // steps for e in events
                if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                             "cudaGraphLaunch", "cudaMemcpyAsync")}
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    return {
        "gpu_busy_ms_per_step": sum(per_step(e.self_device_time_total) for e in kernels),
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "launch_calls_per_step": launches,
        "gpu_ms_by_class": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": e.key[:120], "ms_per_step": per_step(e.self_device_time_total),
                         "calls_per_step": e.count / steps} for e in top],
    }


def run_one(base, embedding, lora_params, device, dtype, args, variant: str, mode: str, batch_size: int,
            out_dir: str, profile: bool) -> dict:
    config = bench_config(args.tiny, out_dir, args.sdxl, batch_size=batch_size, **MODES[mode])
    fast = parse_variant(variant, device, dtype, batch_size)
    torch.backends.cudnn.benchmark = "+cudnn_benchmark" in variant
    if not fast.channels_last:  # a previous run may have left the UNet in NHWC
        base.denoiser.to(memory_format=torch.contiguous_format)
    data = RandomLatents(8, config.resolution // 8 if not args.tiny else config.resolution // 2, device, dtype)
    model = PalpModel(base)
    optimizer = loop.make_optimizer(config, lora_params, embedding)
    if "+fused_adamw" in variant:  # the same groups, one fused kernel instead of foreach launches
        optimizer = torch.optim.AdamW([{k: g[k] for k in ("params", "lr", "weight_decay")} for g in optimizer.param_groups],
                                      fused=True)
    row = {"variant": variant, "mode": mode, "batch": batch_size, "fast": dataclasses.asdict(fast)}
    eager = PalpTask(config, base, model, embedding.first_id, device, dtype,
                     dataclasses.replace(fast, cuda_graphs=False))
    row["tflop_per_step"] = count_flops(eager, data, optimizer, batch_size) / 1e12
    del eager
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # weights, plus what earlier runs left behind (each capture's side stream keeps a cuBLAS workspace)
        row["start_gib"] = torch.cuda.memory_allocated() / 2**30
    task = PalpTask(config, base, model, embedding.first_id, device, dtype, fast)
    generator = torch.Generator().manual_seed(0)
    sync(device)
    started = time.perf_counter()
    steps = itertools.count()  # the optimizer step index: align_every picks the steps with the alignment term
    logs = loop_step(task, data, optimizer, generator, batch_size, next(steps))  # includes a CUDA-graph capture
    sync(device)
    row["first_step_s"] = time.perf_counter() - started
    for _ in range(args.warmup):
        loop_step(task, data, optimizer, generator, batch_size, next(steps))
    sync(device)
    if device.type == "cuda":
        row["setup_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        sync(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            logs = loop_step(task, data, optimizer, generator, batch_size, next(steps))
        sync(device)
        times.append((time.perf_counter() - started) / args.steps)
    ms = statistics.median(times) * 1000
    row.update(ms_per_step=ms, ms_spread=(max(times) - min(times)) * 1000, img_per_s=batch_size / ms * 1000,
               tflop_per_s=row["tflop_per_step"] / ms * 1000, losses=logs)
    if device.type == "cuda":
        # a captured graph's memory counts as allocated during the capture (setup), not during replays
        row["steady_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_gib"] = max(row["setup_peak_gib"], row["steady_peak_gib"])
        row["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if profile:
        row["profile"] = profile_steps(task, data, optimizer, batch_size, 3, device)
    del task, optimizer
    return row


def versions(device: torch.device) -> dict:
    import diffusers
    import peft
    import transformers
    out = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"}
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def table(rows: list[dict]) -> str:
    head = ("variant", "mode", "B", "ms/step", "img/s", "TFLOP/step", "TFLOP/s", "peak GiB", "1st step s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['mode']} | {r['batch']} | error: {r['error'][:80]} |")
            continue
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        lines.append(f"| {r['variant']} | {r['mode']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['img_per_s']:.1f} "
                     f"| {r['tflop_per_step']:.3g} | {r['tflop_per_s']:.3g} | {peak} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


def subject_images(directory: Path, n: int, size: int) -> tuple[str, ...]:
    from PIL import Image
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(i))
        smooth = torch.nn.functional.interpolate(pixels[None], size=(size, size), mode="bilinear")[0]
        path = directory / f"{i}.png"
        Image.fromarray((smooth.permute(1, 2, 0) * 255).byte().numpy()).save(path)
        paths.append(str(path))
    return tuple(paths)


def time_to_adapter(args, device: torch.device, work: Path) -> dict:
    """`loop.train_loop` end to end at default settings (bf16 on GPU), evaluated at steps/2 and steps."""
    from palp_trainer.evaluation import milestone as evaluate
    size = TINY_RESOLUTION if args.tiny else 512
    images = subject_images(work / "images", 4, size)
    eval_config = EvalConfig(clip_model="tiny", cuda_graphs=args.eval_cuda_graphs,
                             **({"steps": 2, "num_images": 2} if args.tiny else {}))
    config = bench_config(args.tiny, str(work / "run"), steps=args.train_steps, milestones=(args.train_steps // 2,),
                          eval=eval_config, rank=4 if args.tiny else 32,
                          subjects=(SubjectSpec("cat", "[V1]", "cat", images, "A photo of [V1]"),))
    evals, sampling = [], []
    real_evaluate = evaluate.evaluate_adapter

    def timed_evaluate(*a, **k):
        started = time.perf_counter()
        out = real_evaluate(*a, **k)
        evals.append(time.perf_counter() - started)
        sampling.append(out["eval_sample_seconds"])  # of which: sampling the images (the rest: grid, scores)
        return out

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the grid's runs in this process are not this run's peak
    started = time.perf_counter()
    with mock.patch.object(evaluate, "evaluate_adapter", timed_evaluate):
        metrics = loop.train_loop(config, random_base(device, args.tiny))  # the base's build time counts
    sync(device)
    total = time.perf_counter() - started
    history = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [b["train_seconds"] - a["train_seconds"] for a, b in zip(history, history[1:])
             if a["step"] not in config.report_steps]  # a milestone's evaluation lands in the next step's time
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "steps": args.train_steps, "batch": config.batch_size, "precision": config.precision,
        "time_to_adapter_s": total, "eval_s": evals, "eval_sample_s": sampling,
        "eval_fraction": sum(evals) / total,
        "eval_cuda_graphs": args.eval_cuda_graphs,
        "first_step_s": history[0]["train_seconds"], "median_step_ms": statistics.median(steps) * 1000 if steps else None,
        "train_loop_seconds": metrics["time_total_s"], "final_losses": {k: history[-1][k] for k in history[-1]
                                                                       if k.endswith("_loss")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test")
    parser.add_argument("--sdxl", action="store_true", help="SDXL's architecture (with --tiny: the tiny SDXL)")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=list(MODES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--variants", nargs="*", default=["eager", "fast"], help="none: time to adapter alone")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per repeat (a multiple of align_every: palp_every2 needs an even number)")
    parser.add_argument("--repeats", type=int, default=3, help="the median of these is reported")
    parser.add_argument("--warmup", type=int, default=3, help="steps after the first, untimed")
    parser.add_argument("--profile", nargs="*", default=[], metavar="VARIANT:MODE:BATCH",
                        help="also profile these runs (kernel classes, top kernels, launches)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="VARIANT:MODE:BATCH",
                        help="further single runs (ablations) after the grid")
    parser.add_argument("--train-steps", type=int, default=0, help="also time train_loop for this many steps")
    parser.add_argument("--eval-cuda-graphs", action="store_true",
                        help="time_to_adapter: milestone sampling replays its denoiser as a CUDA graph")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip runs once this much time passed")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.sdxl and args.train_steps:
        raise SystemExit("--train-steps times the SD-1.5 trainer end to end; with --sdxl, time steps alone")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: the full-size benchmark needs a GPU; use --tiny for the CPU smoke test")
    dtype = models.DTYPES[bench_config(args.tiny, "-", args.sdxl).precision]
    report = {"versions": versions(device), "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    started = time.perf_counter()

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))

    plan = [(v, m, b) for v in args.variants for m in args.modes for b in args.batches]
    plan += [tuple(s.split(":")) for s in args.extra]
    plan = [(v, m, int(b)) for v, m, b in plan]
    profiled = {tuple(s.split(":")[:2]) + (int(s.split(":")[2]),) for s in args.profile}
    with tempfile.TemporaryDirectory() as tmp:
        if plan:
            base = random_base(device, args.tiny, args.sdxl)
            base, embedding, lora_params = models.build(bench_config(args.tiny, tmp, args.sdxl), device, base)
            for variant, mode, batch_size in plan:
                if time.perf_counter() - started > args.budget_s:
                    report["runs"].append({"variant": variant, "mode": mode, "batch": batch_size,
                                           "error": "skipped: over --budget-s"})
                    continue
                try:
                    row = run_one(base, embedding, lora_params, device, dtype, args, variant, mode, batch_size, tmp,
                                  (variant, mode, batch_size) in profiled)
                except Exception as e:  # one failing variant must not lose the others' numbers
                    row = {"variant": variant, "mode": mode, "batch": batch_size, "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()[-3000:]}
                    if not args.json:
                        raise
                report["runs"].append(row)
                print(table([row]).splitlines()[-1], flush=True)
                save()
            del base, embedding, lora_params
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.train_steps:
            try:
                report["time_to_adapter"] = time_to_adapter(args, device, Path(tmp) / "tta")
            except Exception as e:
                report["time_to_adapter"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                if not args.json:
                    raise
            save()
    report["wall_s"] = time.perf_counter() - started
    save()
    print(f"\n{report['versions']}\n")
    print(table(report["runs"]))
    if "time_to_adapter" in report:
        print("\ntime to adapter:", json.dumps({k: v for k, v in report["time_to_adapter"].items()}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
