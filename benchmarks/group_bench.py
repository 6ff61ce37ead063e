"""A trial group's step against its members' steps alone: the throughput trial groups buy (palp_trainer/objective/group.py).

    python benchmarks/group_bench.py --tiny                    # CPU: the tiny base, K = 1, 2, 4, 8
    python benchmarks/group_bench.py --groups 1 4 8 16 --json out.json   # GPU: SD-1.5-size random weights, bf16

For each K it times one group step of K PALP members at batch 1 (the loop's own group_step) and one trial's
step alone with the trainer's default fast paths (loop.train_step; CUDA graphs on a GPU). Speed-up = K x the
single step / the group step: how many times more trial-steps per second a group trains.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.step_bench import RandomLatents, bench_config, loop_step, random_base, sync  # noqa: E402
from palp_trainer.families import base as models  # noqa: E402
from palp_trainer.families.base import add_lora, add_placeholders  # noqa: E402
from palp_trainer.loops import solo as loop  # noqa: E402
from palp_trainer.objective.group import GroupModel, GroupTask, group_step, make_group_optimizer  # noqa: E402
from palp_trainer.objective.task import PalpModel, PalpTask  # noqa: E402


def timed(step, steps: int, repeats: int, device) -> float:
    """Median ms of `step()` over `repeats` runs of `steps` steps, after 3 untimed (the first captures graphs)."""
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - started) / steps * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--groups", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    out = tempfile.mkdtemp(prefix="group-bench-")
    config = bench_config(args.tiny, out, batch_size=1, alignment="palp")
    dtype = models.DTYPES[config.precision]
    base = random_base(device, args.tiny)
    embedding = add_placeholders(base, config.tokens, ("cat",))
    lora = add_lora(base.denoiser, config.rank)
    for module in (base.denoiser, base.text_encoder, base.vae):
        for q in module.parameters():
            if not q.requires_grad:
                q.data = q.data.to(dtype)
        module.to(device)
    data = RandomLatents(8, config.resolution // (2 if args.tiny else 8), device, dtype)
    generator = torch.Generator().manual_seed(0)

    task = PalpTask(config, base, PalpModel(base), embedding.first_id, device, dtype)
    optimizer = loop.make_optimizer(config, lora, embedding)
    counter = iter(range(10**9))
    single = timed(lambda: loop_step(task, data, optimizer, generator, 1, next(counter)), args.steps, args.repeats,
                   device)
    del task, optimizer
    rows = [{"k": 1, "ms_per_step": single, "speedup": 1.0, "kind": "single trial (loop.train_step)"}]
    print(f"{device.type}: single trial {single:.1f} ms/step")
    for p_ in [*lora, embedding.rows]:
        p_.requires_grad_(False)
    for k in args.groups:
        configs = [replace(config, alpha=5.0 + i, lr=1e-4 * (1 + i)) for i in range(k)]
        model = GroupModel(base, embedding, k).to(device)
        group = GroupTask(configs, base, model, embedding.first_id, device, dtype)
        optimizer = make_group_optimizer(configs, model.members)
        counter = iter(range(10**9))
        ms = timed(lambda: group_step(group, data, optimizer, generator, 1, step=next(counter)), args.steps,
                   args.repeats, device)
        for h in model.hooks:
            h.remove()
        rows.append({"k": k, "ms_per_step": ms, "speedup": k * single / ms, "kind": "group (group_step)"})
        print(f"group of {k}: {ms:.1f} ms/step, {k * single / ms:.2f}x the trial-steps per second of single trials")
        del model, group, optimizer
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                         "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
