"""`--dry-run`'s cost estimate: GPU-hours (or CPU-hours) and wall time of a sweep, from measured step times.

Every number in MEASURED is a row of benchmarks/RESULTS.md; the estimate scales them by the recipe's batch,
resolution, steps, evaluations and concurrency, and by what ASHA is expected to stop. It is a planning figure:
a different GPU, base model size or data loader changes it, and it says which device it was measured on.
"""

import math
from dataclasses import dataclass

from .recipe import Recipe


@dataclass(frozen=True)
class Measured:
    """Step times of one device and base model; the source names the RESULTS.md section."""

    device: str
    base: str
    resolution: int
    step_ms: dict  # arm ("palp": the alignment term on every step, "none": LoRA+TI) -> {batch: ms per step}
    eval_ms_per_image_step: float  # one sampling step of one image at `resolution`, CFG (two UNet rows)
    trial_start_s: float  # a trial's fixed cost: worker group, base load, task build
    source: str


MEASURED = {
    "gpu": Measured(
        device="NVIDIA H100 80GB", base="SD-1.5 (bf16, fast path)", resolution=512,
        step_ms={"palp": {1: 42.4, 4: 117.7, 16: 306.1}, "none": {1: 27.3, 4: 60.0, 16: 150.5}},
        eval_ms_per_image_step=3060 / (4 * 25),  # 3.06 s for 4 images x 25 DDIM steps (run 2)
        trial_start_s=25.8,  # a trivial TorchTrainer.fit() on the same machine (issue #15)
        source="benchmarks/RESULTS.md, 2026-11-22 (runs 1-3)"),
    "cpu": Measured(
        device="2 CPU cores", base="world (32 px, fp32)", resolution=32,
        step_ms={"palp": {4: 214.0}, "none": {4: 88.0}},  # make demo's trials, rank 4-8
        eval_ms_per_image_step=19.6,  # the demo's evaluations: 19.6 s for 5 x 8 images x 25 steps
        trial_start_s=15.0,  # make demo: wall time of a trial beyond its steps and evaluations
        source="benchmarks/RESULTS.md, 2026-11-29 (dry-run estimate)"),
}
# sampling cost of a method relative to CFG's two UNet rows per step (pg adds a third, AlignIT its branch)
METHOD_COST = {"cfg": 1.0, "pg": 1.5, "alignit": 1.5}


def step_ms(times: dict, batch: int) -> float:
    """ms per step at `batch`: linear between measured batches, proportional below/above them."""
    batches = sorted(times)
    if batch in times:
        return times[batch]
    if batch < batches[0]:
        return times[batches[0]] * batch / batches[0] if len(batches) == 1 else _line(times, *batches[:2], batch)
    if batch > batches[-1]:
        return times[batches[-1]] * batch / batches[-1]
    lo = max(b for b in batches if b < batch)
    hi = min(b for b in batches if b > batch)
    return _line(times, lo, hi, batch)


def _line(times: dict, lo: int, hi: int, batch: int) -> float:
    return max(times[lo] + (times[hi] - times[lo]) * (batch - lo) / (hi - lo), 0.0)


def asha_rungs(recipe: Recipe) -> list[int]:
    """The steps at which ASHA may stop a trial: Ray's rungs below max_t (grace * rf^k), each applied at the first
    reported milestone at or after it, if that is before the last. Empty for FIFO."""
    s, steps = recipe.scheduler, sorted(recipe.search.steps)
    if s.type != "asha":
        return []
    grace, max_t = steps[min(s.grace_period, len(steps)) - 1], steps[-1]
    count = int(math.log(max_t / grace) / math.log(s.reduction_factor) + 1)
    rungs = [grace * s.reduction_factor ** k for k in range(count)]
    # a rung that falls on the last milestone stops nothing: the trial has finished there
    return sorted({m for m in (next(m for m in steps if m >= r) for r in rungs) if m < max_t})


def _arm_ms(m: Measured, recipe: Recipe, row: dict) -> float:
    """One step of this trial's arm at the recipe's batch and resolution (same per worker under DDP)."""
    alignment = row.get("alignment", recipe.train.alignment)
    batch = recipe.train.batch_size
    plain = step_ms(m.step_ms["none"], batch)
    if alignment == "none":
        ms = plain
    else:
        every = row.get("align_every", recipe.train.align_every)
        every = every if isinstance(every, int) else recipe.train.align_every  # a sampled knob: its default
        ms = (step_ms(m.step_ms["palp"], batch) + (every - 1) * plain) / every
    return ms * recipe.train.grad_accum * (recipe.resolution / m.resolution) ** 2


def _eval_s(m: Measured, recipe: Recipe, methods: bool) -> float:
    e = recipe.eval
    cost = sum(METHOD_COST.get(label.split("-")[0], 1.5) for label in e.methods) if methods and e.methods else 1.0
    return e.num_images * e.steps * cost * m.eval_ms_per_image_step / 1000 * (recipe.resolution / m.resolution) ** 2


def trial_seconds(m: Measured, recipe: Recipe, row: dict, stop: int | None = None) -> float:
    """Wall seconds of one trial trained to `stop` (default: the last step): start-up, steps, evaluations."""
    steps = sorted(recipe.search.steps)
    stop = stop or steps[-1]
    evals = sum(_eval_s(m, recipe, methods=(s == steps[-1])) for s in steps if s <= stop)
    return m.trial_start_s + stop * _arm_ms(m, recipe, row) / 1000 + evals


def estimate(recipe: Recipe, rows: list[dict], slots: int) -> dict:
    """Device-hours and wall hours for the trial table `rows` with `slots` trials at a time: every trial to the end
    (`full`), and with ASHA stopping all but 1/reduction_factor at each rung (`asha`, its expected value)."""
    m = MEASURED["gpu" if recipe.resources.use_gpu else "cpu"]
    devices = recipe.resources.workers_per_trial * ((recipe.resources.gpus_per_worker or 1)
                                                    if recipe.resources.use_gpu else recipe.resources.cpus_per_worker)
    rf, rungs = recipe.scheduler.reduction_factor, asha_rungs(recipe)
    full = asha = 0.0
    for row in rows:
        full += trial_seconds(m, recipe, row)
        # stopped at rung k with probability (1/rf)^k (1 - 1/rf); past every rung with (1/rf)^len(rungs)
        asha += sum(rf ** -k * (1 - 1 / rf) * trial_seconds(m, recipe, row, r) for k, r in enumerate(rungs))
        asha += rf ** -len(rungs) * trial_seconds(m, recipe, row)
    per_trial = trial_seconds(m, recipe, rows[0]) if rows else 0.0
    return {"measured": m, "devices_per_trial": devices, "slots": slots, "trials": len(rows), "rungs": rungs, "per_trial_s": per_trial,
            "full_device_h": full * devices / 3600, "asha_device_h": asha * devices / 3600,
            "full_wall_h": full / 3600 / max(1, min(slots, len(rows))),
            "asha_wall_h": asha / 3600 / max(1, min(slots, len(rows)))}


def format_estimate(recipe: Recipe, est: dict) -> str:
    m, unit = est["measured"], "GPU" if recipe.resources.use_gpu else "CPU"
    first = sorted(recipe.search.steps)[-1]
    lines = [f"estimate from step times measured on {m.device}, {m.base} at {m.resolution} px ({m.source});",
             f"  scaled to batch {recipe.train.batch_size} x {recipe.train.grad_accum} micro-batch(es), {recipe.resolution} px, "
             f"{first} steps; another device or base model changes it",
             f"  one trial to step {first}: about {_duration(est['per_trial_s'] / 3600)} "
             f"(start-up {m.trial_start_s:g} s, training, {len(recipe.search.steps)} evaluation(s))",
             f"  {unit}-hours: {est['full_device_h']:.2f} if every trial runs to step {first}"
             + (f"; about {est['asha_device_h']:.2f} if ASHA stops all but 1/{recipe.scheduler.reduction_factor} "
                f"at step(s) {', '.join(map(str, est['rungs']))}" if est["rungs"] else "")]
    per = f"{est['devices_per_trial']:g} {unit}(s) per trial"
    slots = max(1, min(est["slots"], est["trials"]))
    lines.append(f"  on {slots * est['devices_per_trial']:g} {unit}(s) ({slots} trial(s) at a time, {per}): "
                 f"{_duration(est['full_wall_h'])}" + (f", about {_duration(est['asha_wall_h'])} with ASHA"
                                                         if est["rungs"] else "")
                 + ("; --gpus N: on N GPUs" if recipe.resources.use_gpu else ""))
    if recipe.resources.trials_per_group > 1:
        lines.append(f"  trials_per_group {recipe.resources.trials_per_group}: counted here as trials alone; groups "
                     "share start-up and steps (measured on CPU only: benchmarks/RESULTS.md)")
    return "\n".join(lines)


def _duration(hours: float) -> str:
    minutes = hours * 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{hours:.1f} h"
