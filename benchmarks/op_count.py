"""ATen ops one training step dispatches (loop.train_step on the tiny base, batch 2): a timing-free measure of
what a change adds to the step. Compare two checkouts' outputs; the losses show the math is unchanged.

    python -m benchmarks.op_count OUT.json     # from the repository root
"""

import collections
import json
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.step_bench import RandomLatents, bench_config, loop_step, random_base
from palp_trainer.families import base as models
from palp_trainer.loops import solo as loop
from palp_trainer.objective.task import FastPaths, PalpModel, PalpTask

CPU = torch.device("cpu")


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count(alignment: str, out_dir: str) -> dict:
    config = bench_config(True, out_dir, batch_size=2, alignment=alignment)
    base, embedding, lora = models.build(config, CPU, random_base(CPU, True))
    task = PalpTask(config, base, PalpModel(base), embedding.first_id, CPU, torch.float32, FastPaths())
    data = RandomLatents(8, 16, CPU, torch.float32)
    optimizer, generator = loop.make_optimizer(config, lora, embedding), torch.Generator().manual_seed(0)
    loop_step(task, data, optimizer, generator, 2, 0)  # the first step builds AdamW's state
    with OpCount() as ops:
        losses = loop_step(task, data, optimizer, generator, 2, 1)
    return {"ops": sum(ops.counts.values()), "by_op": dict(ops.counts), "losses": losses}


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = {mode: count(mode, tmp) for mode in ("none", "palp")}
    for mode, row in report.items():
        print(mode, row["ops"], row["losses"])
    if argv:
        with open(argv[0], "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
