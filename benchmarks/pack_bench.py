"""Packing trials on one GPU: do N trials at once finish sooner than N trials in turn?

    python benchmarks/pack_bench.py --trials 2 --train-steps 500 --json pack.json   # GPU
    python benchmarks/pack_bench.py --tiny --trials 2 --train-steps 2                # CPU smoke test

A recipe packs trials with a fractional `resources.gpus_per_worker` (0.5: two trials' workers per GPU).
This runs step_bench.py's time to adapter (`train_loop` at the default settings, batch 1, two evaluations)
once alone, then `--trials` copies at once, each in its own process on the same device, as Ray places
packed workers. Reported: each run's wall time, every process's time to adapter and peak memory, and
the speed-up of packing = trials x (one alone) / (all at once); above 1, packing pays.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_BENCH = Path(__file__).with_name("step_bench.py")


def run_at_once(n: int, args, work: Path) -> dict:
    """`n` step_bench.py processes started together; the wall time until the last one exits."""
    cmd = [sys.executable, str(STEP_BENCH), "--variants", "--train-steps", str(args.train_steps)]
    cmd += ["--tiny"] if args.tiny else []
    outs = [work / f"{n}-{i}.json" for i in range(n)]
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd + ["--json", str(out)], stdout=subprocess.DEVNULL) for out in outs]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"{n} at once: step_bench.py exited with {codes}")
    reports = [json.loads(out.read_text())["time_to_adapter"] for out in outs]
    return {"trials": n, "wall_s": wall, "time_to_adapter_s": [r["time_to_adapter_s"] for r in reports],
            "peak_gib": [r.get("peak_gib") for r in reports], "median_step_ms": [r["median_step_ms"] for r in reports]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test")
    parser.add_argument("--trials", type=int, default=2, help="trials packed on the device")
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    if args.trials < 2:
        raise SystemExit("--trials: packing needs at least 2")
    with tempfile.TemporaryDirectory() as tmp:
        alone = run_at_once(1, args, Path(tmp))
        packed = run_at_once(args.trials, args, Path(tmp))
    report = {"alone": alone, "packed": packed, "speedup": args.trials * alone["wall_s"] / packed["wall_s"]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
