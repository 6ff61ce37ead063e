"""train_loop(config): the whole training run, top to bottom. The only module that talks to ray.train."""

import json
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import storage
from .config import TrainConfig, knobs_where
from .data import SubjectLatents
from .export import export_adapter
from .models import Base, add_lora, add_placeholders, load_base
from .stopwatch import Stopwatch
from .task import PalpModel, PalpTask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_FILE = "state.pt"
DECISIONS = "palp-scheduler"  # Ray KV namespace where the driver publishes early-stopping decisions
DECISION_WAIT_S = 120.0  # past this, train on (the driver then stops the trial the usual way)


class NonFiniteLoss(FloatingPointError):
    pass


class TrialOutOfMemory(RuntimeError):
    """The device ran out of memory: one line naming what to lower (the sweep's other trials go on)."""


def out_of_memory(config: TrainConfig, where: str) -> TrialOutOfMemory:
    return TrialOutOfMemory(
        f"out of memory {where} at batch_size {config.batch_size}, resolution {config.resolution} px, "
        f"{config.precision}, rank {config.rank}: lower train.batch_size (raise train.grad_accum to keep the "
        f"effective batch), the resolution or eval.batch_size, or use bf16")


def _ray_train():
    """ray.train when this process is a Ray Train worker, else None (single-process run)."""
    try:
        import ray.train
        ray.train.get_context()
        return ray.train
    except (ImportError, RuntimeError):
        return None


def _placement():
    """(ray.train or None, rank, world size, device) of this process."""
    train = _ray_train()
    if train is None:
        return None, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import ray.train.torch
    context = train.get_context()
    return train, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def build(config: TrainConfig, device: torch.device, base: Base | None = None):
    """Base model (`base`, or loaded from config.base_model) + placeholders + LoRA on `device`;
    frozen weights in the compute dtype."""
    dtype = DTYPES[config.precision]
    base = base or load_base(config.base_model)
    embedding = add_placeholders(base, config.tokens, tuple(s.class_word for s in config.subjects))
    lora_params = add_lora(base.unet, config.rank, config.lora_alpha)
    for module in base.frozen:
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)  # trainables stay fp32 masters
        module.to(device)
    return base, embedding, lora_params


def manifest(config: TrainConfig, step: int, base: Base | None = None) -> dict:
    """The adapter's palp.json: the knobs of KNOBS' `manifest` kind, the base's family and prediction, the
    subjects' placeholders, the LoRA scale's alpha and the step it was saved at."""
    return {
        "prediction_type": base.noise_scheduler.config.prediction_type if base else "epsilon",
        "family": base.family.name if base else "sd",
        **{k: getattr(config, k) for k in knobs_where("manifest")},
        "placeholders": {s.token: s.class_word for s in config.subjects},
        "tokens": list(config.tokens),
        "subjects": [asdict(s) for s in config.subjects],
        "lora_alpha": config.lora_alpha or config.rank, "steps": step,
    }


def localized(config: TrainConfig) -> TrainConfig:
    """`config` with subject images given as storage URIs replaced by this node's cached copies."""
    def local(f: str) -> str:
        return str(storage.cached(f)) if storage.is_remote(f) else f
    return replace(config, subjects=tuple(replace(s, images=tuple(local(f) for f in s.images))
                                          for s in config.subjects))


def publish(output: Path, config: TrainConfig) -> None:
    """Copy rank 0's outputs (metrics.jsonl, samples, adapter) to storage, where they outlive this node."""
    if config.output_uri:
        storage.upload(output, config.output_uri)


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
    export_adapter(directory, base.unet, embedding, manifest(config, step, base), tools=False)
    torch.save({
        "step": step,
        "seconds": seconds,
        "lora": {n: p.detach().cpu() for n, p in base.unet.named_parameters() if p.requires_grad},
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
    params = dict(base.unet.named_parameters())
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


def decision_key(scheduler_key: str, step: int) -> bytes:
    return f"{scheduler_key}/{step}".encode()


def scheduler_decision(scheduler_key: str, step: int, wait_s: float = DECISION_WAIT_S) -> str | None:
    """The early-stopping scheduler's decision on this trial's report at `step` ("CONTINUE", "STOP"), waited
    for so that a stopped trial stops at its milestone, not whenever Tune's stop reaches its actors. Every
    rank reads the same key, so all stop at the same step."""
    from ray.experimental import internal_kv

    deadline = time.monotonic() + wait_s
    while True:
        found = internal_kv._internal_kv_get(decision_key(scheduler_key, step), namespace=DECISIONS)
        if found is not None:
            return found.decode()
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


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
    train, rank, world, device = _placement()
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
    if config.eval is not None and rank == 0:
        from .evaluate import scorer_for
        with watch("scorer"):  # loaded once per process (cached); here, so evaluations time sampling alone
            scorer_for(config.eval, str(device))
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is a no-op)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    generator = torch.Generator().manual_seed(config.seed)  # data, t and noise: identical on every rank

    step, seconds = 0, 0.0
    checkpoint = train.get_checkpoint() if train is not None else None
    if checkpoint is not None:  # a Ray Train retry or a resumed sweep
        with checkpoint.as_directory() as directory:
            step, seconds = load_checkpoint(Path(directory), base, embedding, optimizer, scaler, generator)
        if rank == 0:
            print(f"palp: resumed from the checkpoint at step {step}", flush=True)
    elif config.resume_from:
        step, seconds = load_checkpoint(Path(config.resume_from), base, embedding, optimizer, scaler, generator)

    output = Path(config.output_dir)
    if config.output_uri and not output.is_absolute():
        output = Path(tempfile.gettempdir()) / output  # this node's scratch; publish() copies it to storage
    output.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        if config.output_uri and step and not (output / "metrics.jsonl").exists():  # restarted on another node
            storage.download(storage.join(config.output_uri, "metrics.jsonl"), output / "metrics.jsonl")
        _keep_metrics_until(output / "metrics.jsonl", step)  # steps redone after a restart are written once
    global_batch = config.batch_size * world
    log = None
    if rank == 0 and config.mlflow_run_id:
        from .runlog import RunLog  # MLflow only where a run was handed in
        with watch("tracking"):
            log = RunLog(config.mlflow_uri, config.mlflow_run_id)
    bar = tqdm(total=config.steps, initial=step, disable=not config.progress or rank != 0, desc="palp")
    metrics: dict = {}
    last_eval: dict = {}
    started = time.perf_counter() - seconds  # training time carries on across restarts
    try:
        if train is not None and 0 < config.steps <= step:
            # resumed after its last step (interrupted during the final evaluation or export): score and
            # report again, so Tune and MLflow hold this trial's real final scores
            if config.eval is not None and rank == 0:
                last_eval = _evaluate(config, base, step, output, log)
                publish(output, config)
            metrics = {"step": step, **last_eval, "train_seconds": seconds, "time_total_s": seconds}
            train.report(metrics)
        while step < config.steps:
            with watch("steps" if watch.seconds["first_step"] else "first_step"):  # the first: CUDA graph capture
                logs = train_step(task, data, optimizer, scaler, generator, global_batch, step=step, rank=rank,
                                  world=world)
            step += 1
            bar.update(1)
            bar.set_postfix({k.removesuffix("_loss"): f"{v:.4f}" for k, v in logs.items()})
            metrics = {"step": step, **logs, "loss": sum(logs.values()),
                       "train_seconds": time.perf_counter() - started}
            if rank == 0:
                with open(output / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if log:
                log.metrics(step, logs)

            milestone = step in config.report_steps
            ckpt_due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            if milestone and config.eval is not None and rank == 0:
                with watch("eval"):
                    last_eval = _evaluate(config, base, step, output, log)
            metrics.update(last_eval)  # between milestones, reports carry the latest scores
            # Checkpoints before the first evaluation report no score: the sweep lets Tune take those
            # (sweep.build_tuner), so a lost node costs at most checkpoint_every steps from the start on.
            # The rule depends on `step` alone, so every rank makes the same number of report calls.
            report = train is not None and (milestone or ckpt_due)
            if report or (train is None and ckpt_due):
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
                        train.report(metrics, checkpoint=train.Checkpoint.from_directory(checkpoint_dir)
                                     if checkpoint_dir else None)
                    else:  # standalone, checkpoint_every
                        shutil.copytree(tmp, output / "checkpoints" / f"step-{step:06d}", dirs_exist_ok=True)
                if report and milestone and config.scheduler_key and step < config.steps:
                    with watch("decision"):
                        stop = scheduler_decision(config.scheduler_key, step) == "STOP"
                    if stop:
                        bar.close()
                        _log_times(log, step, watch)
                        return metrics  # stopped early: no final adapter; the driver marks the run
    except torch.OutOfMemoryError:
        raise out_of_memory(config, f"at step {step + 1}") from None
    bar.close()
    metrics["time_total_s"] = time.perf_counter() - started  # training + evaluations, before export
    if rank == 0:
        with watch("export"):
            export_adapter(output / "adapter", base.unet, embedding, manifest(config, step, base))
            publish(output, config)
        metrics["adapter"] = storage.join(config.output_uri or str(output), "adapter")
        if log:
            with watch("tracking"):
                log.flush()
                log.artifacts(output / "adapter", "adapter")
    _log_times(log, step, watch)
    return {**metrics, **watch.metrics()}


def _log_times(log, step: int, watch: Stopwatch) -> None:
    if log:
        log.metrics(step, watch.metrics())
        log.flush()


def _evaluate(config: TrainConfig, base, step: int, output: Path, log) -> dict:
    """Milestone sampling and scores (every sampling method at the last step), logged to the trial's run."""
    from .evaluate import evaluate_adapter, evaluate_methods

    scores = evaluate_adapter(config, base, step, output / "samples")
    if step == config.steps and config.eval.methods:
        scores.update(evaluate_methods(config, base, step, output / "samples", scores))
    if log:
        redone = log.holds(step, "composite")  # a restart redid this evaluation: its images are in the run
        log.metrics(step, scores)
        log.flush()
        for key, grid in scores.items():  # "samples" (CFG, every milestone), "method/<label>/samples" (last step)
            if key.endswith("samples") and not redone:
                log.samples(grid, key, step)
    return scores


def _keep_metrics_until(path: Path, step: int) -> None:
    """metrics.jsonl keeps the lines of steps <= `step` (0: a fresh run starts an empty file)."""
    lines = path.read_text().splitlines() if step and path.exists() else []
    kept = [line for line in lines if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
