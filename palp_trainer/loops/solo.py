"""train_loop(config): one trial's training run, top to bottom (group_loop.train_group is its trial-group twin;
worker.py holds what both do around the steps)."""

import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import storage
from ..config import TrainConfig
from ..data import SubjectLatents
from ..export.adapter import export_adapter, manifest
from ..families.base import DTYPES, Base, build
from ..objective.task import PalpModel, PalpTask
from .stopwatch import Stopwatch
from .worker import (MetricsFile, Placement, evaluate_and_log, load_scorer, localized, log_times, out_of_memory,
                     output_folder, publish, stopped_here)

STATE_FILE = "state.pt"


class NonFiniteLoss(FloatingPointError):
    pass


def make_optimizer(config: TrainConfig, lora_params, embedding) -> torch.optim.Optimizer:
    """AdamW; the placeholder rows get their own lr and no weight decay (textual inversion)."""
    return torch.optim.AdamW([
        {"params": lora_params, "lr": config.lr},
        {"params": [embedding.rows], "lr": config.embedding_lr, "weight_decay": 0.0},
    ], weight_decay=config.weight_decay, fused=embedding.rows.is_cuda)  # one kernel for all params on GPU


def save_checkpoint(directory: Path, step: int, base, embedding, optimizer, scaler, generator, config,
                    seconds: float = 0.0) -> Path:
    """LoRA + embeddings (as an exported adapter), optimizer, fp16 loss scale, step, the training time so far
    and every RNG state. Tensors and plain Python only: it loads with `weights_only=True` (no pickle code)."""
    # tools=False: a checkpoint is resumed here, not opened in a UI; the LoRA is not stored a second time
    export_adapter(directory, base.denoiser, embedding, manifest(config, step, base), tools=False)
    torch.save({
        "step": step,
        "seconds": seconds,
        "lora": {n: p.detach().cpu() for n, p in base.denoiser.named_parameters() if p.requires_grad},
        "rows": embedding.rows.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),  # {} unless fp16
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }, directory / STATE_FILE)
    return directory


def load_checkpoint(directory: Path, base, embedding, optimizer, scaler, generator) -> tuple[int, float]:
    """Restore a checkpoint into the live objects; returns (step, training seconds so far)."""
    # weights_only: checkpoints come from shared storage (maybe s3://); unpickling them could run code
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    params = dict(base.denoiser.named_parameters())
    with torch.no_grad():
        for name, value in state["lora"].items():
            params[name].copy_(value)
        embedding.rows.copy_(state["rows"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state.get("seconds", 0.0)


def train_step(task: PalpTask, data, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               generator: torch.Generator, global_batch: int, *, step: int, rank: int = 0,
               world: int = 1) -> dict[str, float]:
    """Optimizer step `step` (0-based; with align_every it decides whether the alignment term runs) over
    grad_accum micro-batches; returns each loss term, averaged over them.

    The step `train_loop` runs, and the one benchmarks/step_bench.py times. One host sync per micro-batch
    (all terms read together), which is also the non-finite check."""
    config = task.config
    logs: dict[str, float] = {}
    for micro in range(config.grad_accum):
        batch = task.make_batch(generator, data, global_batch, rank, world)
        sync = task.model.no_sync() if world > 1 and micro < config.grad_accum - 1 else nullcontext()
        with sync:
            terms = task.training_step(batch, align=task.aligns_at(step))
            values = torch.stack([v.detach().float() for v in terms.values()]).tolist()
            for name, v in zip(terms, values):
                if not math.isfinite(v):
                    raise NonFiniteLoss(f"step {step + 1}: {name} is {v}")
                logs[name] = logs.get(name, 0.0) + v / config.grad_accum
            scaler.scale(sum(terms.values()) / config.grad_accum).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return logs


def train_loop(config: TrainConfig | dict, base: Base | None = None) -> dict:
    """Train one PALP adapter; returns the last metrics. Runs alone or as a Ray Train worker.

    `base` stands in for load_base(config.base_model) (the benchmark's random-weight SD-1.5)."""
    watch = Stopwatch()  # phases of this trial: time/<phase>_s in its run (benchmarks/sweep_bench.py)
    if isinstance(config, dict):  # Ray Train hands workers the plain-dict form
        config = TrainConfig.from_dict(config)
    config = localized(config)  # subject images given as storage URIs: this node's copies (the adapter carries its own)
    here = Placement.here()
    rank, world, device = here.rank, here.world, here.device
    torch.manual_seed(config.seed)
    with watch("base"):
        base, embedding, lora_params = build(config, device, base)
    dtype = DTYPES[config.precision]
    with watch("data"):
        data = SubjectLatents(base.vae, [s.images for s in config.subjects], config.resolution, config.flip,
                              config.allow_upscale, device, dtype)
    with watch("task"):
        model = PalpModel(base)
        if world > 1:
            import ray.train.torch
            model = ray.train.torch.prepare_model(model, move_to_device=False)
        task = PalpTask(config, base, model, embedding.first_id, device, dtype)
        optimizer = make_optimizer(config, lora_params, embedding)
    load_scorer(config, here, watch)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is a no-op)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    generator = torch.Generator().manual_seed(config.seed)  # data, t and noise: identical on every rank

    step, seconds = 0, 0.0
    with here.restored() as directory:
        if directory is not None:  # a Ray Train retry or a resumed sweep
            step, seconds = load_checkpoint(directory, base, embedding, optimizer, scaler, generator)
            if rank == 0:
                print(f"palp: resumed from the checkpoint at step {step}", flush=True)
    if directory is None and config.resume_from:
        step, seconds = load_checkpoint(Path(config.resume_from), base, embedding, optimizer, scaler, generator)

    output = output_folder(config)
    metrics_file = MetricsFile(output, config, step) if rank == 0 else None
    global_batch = config.batch_size * world
    log = None
    if rank == 0 and config.mlflow_run_id:
        from .runlog import RunLog  # MLflow only where a run was handed in
        with watch("tracking"):
            log = RunLog(config.mlflow_uri, config.mlflow_run_id)
    bar = tqdm(total=config.steps, initial=step, disable=not config.progress or rank != 0, desc="palp")
    metrics: dict = {}
    last_eval: dict = {}
    under_ray = here.train is not None
    started = time.perf_counter() - seconds  # training time carries on across restarts
    try:
        if under_ray and 0 < config.steps <= step:
            # resumed after its last step (interrupted during the final evaluation or export): score and
            # report again, so Tune and MLflow hold this trial's real final scores
            if config.eval is not None and rank == 0:
                last_eval = evaluate_and_log(config, base, step, output, log)
                publish(output, config)
            metrics = {"step": step, **last_eval, "train_seconds": seconds, "time_total_s": seconds}
            here.report(metrics)
        while step < config.steps:
            with watch("steps" if watch.seconds["first_step"] else "first_step"):  # the first: CUDA graph capture
                logs = train_step(task, data, optimizer, scaler, generator, global_batch, step=step, rank=rank,
                                  world=world)
            step += 1
            bar.update(1)
            bar.set_postfix({k.removesuffix("_loss"): f"{v:.4f}" for k, v in logs.items()})
            metrics = {"step": step, **logs, "loss": sum(logs.values()),
                       "train_seconds": time.perf_counter() - started}
            if metrics_file:
                metrics_file.append(metrics)
            if log:
                log.metrics(step, logs)

            milestone = step in config.report_steps
            ckpt_due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            if milestone and config.eval is not None and rank == 0:
                with watch("eval"):
                    last_eval = evaluate_and_log(config, base, step, output, log)
            metrics.update(last_eval)  # between milestones, reports carry the latest scores
            # Checkpoints before the first evaluation report no score: the sweep lets Tune take those
            # (sweep.build_tuner), so a lost node costs at most checkpoint_every steps from the start on.
            # The rule depends on `step` alone, so every rank makes the same number of report calls.
            report = under_ray and (milestone or ckpt_due)
            if report or (not under_ray and ckpt_due):
                metrics["time_total_s"] = time.perf_counter() - started
                with watch("checkpoint"), tempfile.TemporaryDirectory() as tmp:
                    checkpoint_dir = None
                    if rank == 0:
                        checkpoint_dir = save_checkpoint(Path(tmp), step, base, embedding, optimizer, scaler,
                                                         generator, config, metrics["time_total_s"])
                        publish(output, config)  # what the checkpoint covers is durable with it:
                        if log:  # metrics.jsonl and samples in storage, the steps' metrics in MLflow
                            log.flush(final=False)
                    if report:
                        here.report(metrics, checkpoint_dir)
                    else:  # standalone, checkpoint_every
                        shutil.copytree(tmp, output / "checkpoints" / f"step-{step:06d}", dirs_exist_ok=True)
                if report and milestone:
                    with watch("decision"):
                        stop = stopped_here(config, step)
                    if stop:
                        bar.close()
                        log_times(log, step, watch)
                        return metrics  # stopped early: no final adapter; the driver marks the run
    except torch.OutOfMemoryError:
        raise out_of_memory(config, f"at step {step + 1}") from None
    bar.close()
    metrics["time_total_s"] = time.perf_counter() - started  # training + evaluations, before export
    if rank == 0:
        with watch("export"):
            export_adapter(output / "adapter", base.denoiser, embedding, manifest(config, step, base))
            publish(output, config)
        metrics["adapter"] = storage.join(config.output_uri or str(output), "adapter")
        if log:
            with watch("tracking"):
                log.flush()
                log.artifacts(output / "adapter", "adapter")
    log_times(log, step, watch)
    return {**metrics, **watch.metrics()}
