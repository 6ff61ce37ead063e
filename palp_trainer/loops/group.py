"""train_group(configs): a trial group's run, top to bottom (loop.train_loop for K members at once).

Each member keeps everything a trial has: its metrics.jsonl, samples and adapter in its own output folder, its
MLflow run, its reports and the early-stopping decisions on it. The group has one Ray Train run: its checkpoints
hold every member, so a restart restores them all.
"""

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import storage
from ..config import TrainConfig
from ..data import SubjectLatents
from ..export.adapter import export_adapter, manifest
from ..families.base import DTYPES, build
from ..objective.group import GroupModel, GroupTask, group_step, make_group_optimizer, member_configs
from .stopwatch import Stopwatch
from .worker import (MetricsFile, Placement, evaluate_and_log, load_scorer, localized, log_times, out_of_memory,
                     output_folder, publish, stopped_here)

STATE_FILE = "group_state.pt"
# (trial id, kind, payload): "report" a milestone's metrics; "done" the final metrics after export;
# "error" one line, for a member that left the group on a non-finite loss
Send = Callable[[int, str, dict | str], None]


def save_group_checkpoint(directory: Path, step: int, model: GroupModel, active: list[int], optimizer,
                          generator: torch.Generator, configs: list[dict], trial_ids: list[str]) -> Path:
    """Every member (its config, trial id, LoRA and rows), who is still training, the optimizer and the RNG states;
    plain tensors and Python (loads with weights_only)."""
    torch.save({"step": step, "active": list(active), "configs": configs, "trial_ids": list(trial_ids),
                "members": model.members.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}, directory / STATE_FILE)
    return directory


def load_group_checkpoint(directory: Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def restore(state: dict, model: GroupModel, optimizer, generator) -> tuple[int, list[int]]:
    """A group checkpoint into the live objects (built for its members); returns (step, active members)."""
    model.members.load_state_dict(state["members"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["active"]


def train_group(configs: list[TrainConfig | dict], trial_ids: list[str], send: Send | None = None) -> dict[int, dict]:
    """Train a group of members (group.member_configs), trials `trial_ids`; returns member -> its last metrics.

    Restarted from a checkpoint, the group is the one the checkpoint holds: after `--resume` only some members may
    come back (ASHA stopped the others, or they finished); those keep training, the rest stay where they left."""
    watch = Stopwatch()
    send = send or (lambda trial_id, kind, payload: None)
    placement = Placement.here()
    rank, device = placement.rank, placement.device
    raw = [c.to_dict() if isinstance(c, TrainConfig) else c for c in configs]
    here = set(trial_ids)
    state = None
    with placement.restored() as directory:
        if directory is not None:
            state = load_group_checkpoint(directory)
            raw, trial_ids = state["configs"], state["trial_ids"]
    configs = member_configs([localized(TrainConfig.from_dict(c)) for c in raw])
    config, k = configs[0], len(configs)
    dtype = DTYPES[config.precision]
    torch.manual_seed(config.seed)  # the LoRA initialisation every member's trial would start from
    with watch("base"):
        base, embedding, lora_params = build(config, device)
        for p in [*lora_params, embedding.rows]:
            p.requires_grad_(False)  # peft's adapter and the embedding's rows hold a member only to evaluate it
    with watch("data"):
        data = SubjectLatents(base.vae, [s.images for s in config.subjects], config.resolution, config.flip,
                              config.allow_upscale, device, dtype)
    with watch("task"):
        group = GroupModel(base, embedding, k).to(device)
        task = GroupTask(configs, base, group, embedding.first_id, device, dtype)  # one worker (Resources)
        optimizer = make_group_optimizer(configs, group.members)
    load_scorer(config, placement, watch)
    generator = torch.Generator().manual_seed(config.seed)

    step = 0
    if state is not None:
        step, active = restore(state, group, optimizer, generator)
        # back: the members that came back (`--resume`), less any the scheduler stopped at the checkpoint's step
        # (it was taken before the decision; a Ray Train restart hands the worker every member again)
        task.active = [m for m in active if trial_ids[m] in here and not stopped_here(configs[m], step, wait_s=0)]
        if rank == 0:
            print(f"palp: group resumed from the checkpoint at step {step} with {len(task.active)} of its "
                  f"{len(active)} training members", flush=True)
    outputs = [output_folder(c) for c in configs]
    logs, metrics_files = [None] * k, [None] * k
    if rank == 0:
        from .runlog import RunLog
        for m in task.active:
            metrics_files[m] = MetricsFile(outputs[m], configs[m], step)
            if configs[m].mlflow_run_id:
                with watch("tracking"):
                    logs[m] = RunLog(configs[m].mlflow_uri, configs[m].mlflow_run_id)
    metrics: dict[int, dict] = {m: {} for m in range(k)}
    last_eval: dict[int, dict] = {m: {} for m in range(k)}
    bar = tqdm(total=config.steps, initial=step, disable=not config.progress or rank != 0, desc=f"palp group of {k}")
    started = time.perf_counter()
    try:
        while task.active and step < config.steps:
            with watch("steps" if watch.seconds["first_step"] else "first_step"):
                step_logs = group_step(task, data, optimizer, generator, config.batch_size, step=step)
            step += 1
            bar.update(1)
            bar.set_postfix(training=len(task.active))
            for m, terms in step_logs.items():
                if not all(math.isfinite(v) for v in terms.values()):
                    task.active.remove(m)  # diverged: this member fails alone, the others train on
                    bad = ", ".join(f"{n} is {v}" for n, v in terms.items())
                    if rank == 0:
                        send(trial_ids[m], "error", f"step {step}: {bad}")
                    continue
                metrics[m] = {"step": step, **terms, "loss": sum(terms.values()),
                              "train_seconds": time.perf_counter() - started}
                if rank == 0:
                    metrics_files[m].append(metrics[m])
                    if logs[m]:
                        logs[m].metrics(step, terms)
            milestone = step in config.report_steps
            if not (milestone or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                continue
            if milestone and config.eval is not None and rank == 0:
                with watch("eval"):
                    for m in task.active:
                        group.load_member(m)
                        last_eval[m] = evaluate_and_log(configs[m], base, step, outputs[m], logs[m])
            with watch("checkpoint"), tempfile.TemporaryDirectory() as tmp:
                checkpoint_dir = None
                if rank == 0:
                    checkpoint_dir = save_group_checkpoint(Path(tmp), step, group, task.active, optimizer, generator,
                                                           raw, trial_ids)
                    for m in task.active:  # what the checkpoint covers is durable with it
                        publish(outputs[m], configs[m])
                        if logs[m]:
                            logs[m].flush(final=False)
                if placement.train is not None:
                    placement.report({"step": step, "members": len(task.active)}, checkpoint_dir)
            if not milestone:
                continue
            for m in task.active:
                metrics[m].update(last_eval[m], time_total_s=time.perf_counter() - started)
                if rank == 0 and step < config.steps:
                    send(trial_ids[m], "report", metrics[m])
            if step < config.steps:
                with watch("decision"):  # every rank reads the same decisions, so all drop the same members
                    stopped = [m for m in task.active if stopped_here(configs[m], step)]
                task.active = [m for m in task.active if m not in stopped]
                for m in stopped:
                    log_times(logs[m], step, watch, **{"time/group_size": float(k)})
    except torch.OutOfMemoryError:
        raise out_of_memory(config, f"at step {step + 1} in a trial group of {len(task.active)}") from None
    bar.close()
    if rank == 0:
        for m in task.active:  # ran to the end
            if not metrics[m]:  # restarted after the last step (export cut short): score it again
                group.load_member(m)
                metrics[m] = {"step": step, **(evaluate_and_log(configs[m], base, step, outputs[m], logs[m])
                                               if config.eval is not None else {})}
            with watch("export"):
                group.load_member(m)
                export_adapter(outputs[m] / "adapter", base.denoiser, embedding, manifest(configs[m], step, base))
                publish(outputs[m], configs[m])
            metrics[m]["adapter"] = storage.join(configs[m].output_uri or str(outputs[m]), "adapter")
            if logs[m]:
                with watch("tracking"):
                    logs[m].flush()
                    logs[m].artifacts(outputs[m] / "adapter", "adapter")
            # the group's phase times, in each member's run (time/group_size: how many members shared them)
            log_times(logs[m], step, watch, **{"time/group_size": float(k)})
            send(trial_ids[m], "done", metrics[m])
    return metrics
