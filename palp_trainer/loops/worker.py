"""What a training process does around its steps, for each trial it trains: where it runs, where the trial's
files go, its metrics file, evaluate-and-log at a milestone, the early-stopping scheduler's decisions, the
out-of-memory message. The solo loop (loop.py) and the trial-group loop (group_loop.py) both run on it, and this
is the only module that talks to ray.train.
"""

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import storage
from ..config import TrainConfig
from .stopwatch import Stopwatch

DECISIONS = "palp-scheduler"  # Ray KV namespace where the driver publishes early-stopping decisions
DECISION_WAIT_S = 120.0  # past this, train on (the driver then stops the trial the usual way)


class TrialOutOfMemory(RuntimeError):
    """The device ran out of memory: one line naming what to lower (the sweep's other trials go on)."""


def out_of_memory(config: TrainConfig, where: str) -> TrialOutOfMemory:
    return TrialOutOfMemory(
        f"out of memory {where} at batch_size {config.batch_size}, resolution {config.resolution} px, "
        f"{config.precision}, rank {config.rank}: lower train.batch_size (raise train.grad_accum to keep the "
        f"effective batch), the resolution or eval.batch_size, or use bf16")


@dataclass(frozen=True)
class Placement:
    """This process: a Ray Train worker (`train` is ray.train) or a single process (`train` None)."""

    train: object | None
    rank: int
    world: int
    device: torch.device

    @classmethod
    def here(cls) -> "Placement":
        try:
            import ray.train
            context = ray.train.get_context()
        except (ImportError, RuntimeError):
            return cls(None, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        import ray.train.torch
        return cls(ray.train, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())

    @contextlib.contextmanager
    def restored(self):
        """The checkpoint Ray Train hands this worker (a retry, a resumed sweep) as a folder, or None."""
        checkpoint = self.train.get_checkpoint() if self.train is not None else None
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        """To Ray Train (and Tune through it), with rank 0's checkpoint folder; every rank calls it."""
        checkpoint = self.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self.train.report(metrics, checkpoint=checkpoint)


def output_folder(config: TrainConfig) -> Path:
    """The trial's output folder on this node: output_dir, or with output_uri (storage) a relative output_dir under
    this node's temp dir, which `publish` copies to storage."""
    output = Path(config.output_dir)
    if config.output_uri and not output.is_absolute():
        output = Path(tempfile.gettempdir()) / output
    output.mkdir(parents=True, exist_ok=True)
    return output


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


class MetricsFile:
    """A trial's metrics.jsonl: one line per step, written once even when a restart redoes steps."""

    def __init__(self, output: Path, config: TrainConfig, step: int):
        """Opened at `step` (0: a fresh run starts an empty file); restarted on another node, the stored file is
        fetched first; the lines of steps after `step` (redone now) are dropped."""
        self.path = output / "metrics.jsonl"
        if config.output_uri and step and not self.path.exists():
            storage.download(storage.join(config.output_uri, "metrics.jsonl"), self.path)
        lines = self.path.read_text().splitlines() if step and self.path.exists() else []
        kept = [line for line in lines if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def append(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def evaluate_and_log(config: TrainConfig, base, step: int, output: Path, log) -> dict:
    """Milestone sampling and scores (every sampling method at the last step), logged to the trial's run."""
    from ..evaluation.milestone import evaluate_adapter, evaluate_methods

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


def load_scorer(config: TrainConfig, placement: Placement, watch: Stopwatch) -> None:
    """Rank 0 loads the eval's scorer once per process (cached), before training, so evaluations time sampling."""
    if config.eval is not None and placement.rank == 0:
        from ..evaluation.milestone import scorer_for
        with watch("scorer"):
            scorer_for(config.eval, str(placement.device))


def log_times(log, step: int, watch: Stopwatch, **extra: float) -> None:
    """The phase times so far (time/<phase>_s) in the trial's run."""
    if log:
        log.metrics(step, {**watch.metrics(), **extra})
        log.flush()


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


def stopped_here(config: TrainConfig, step: int, wait_s: float = DECISION_WAIT_S) -> bool:
    """Whether the scheduler stops this trial at its milestone `step` (never at the last step: it ends there)."""
    return bool(config.scheduler_key) and step in config.report_steps and step < config.steps and \
        scheduler_decision(config.scheduler_key, step, wait_s) == "STOP"
