"""Wall time of `palp-sweep` commands a person types often: the median of N fresh processes each (#14 item 4).

    python benchmarks/cli_startup.py                                         # the --help pages only
    python benchmarks/cli_startup.py --tracking-uri sqlite:///$PWD/mlflow.db --model palp-cat-a-sketch-of-v1
    git archive 6637bf8 | tar -x -C /tmp/before && python benchmarks/cli_startup.py --baseline /tmp/before ...

With a store and a registered model it also times `models list`, `models show NAME` and `models pull NAME DIR`
(into a fresh folder each time). Each command is `python -m orchestrator.cli` run in the checkout it times.
`--baseline DIR` times another checkout too, alternating the two run by run, so that the load of a shared
machine weighs on both alike.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _once(root: Path, argv: list[str], env: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [a.format(tmp=tmp) for a in argv]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *cmd], env={**env, "PYTHONPATH": str(root)},
                              cwd=root, capture_output=True, text=True)
        took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{root}: palp-sweep {' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tracking-uri", help="a store holding --model")
    p.add_argument("--model", help="a registered model in that store")
    p.add_argument("--baseline", type=Path, help="another checkout (e.g. the commit before) to time alongside")
    args = p.parse_args(argv)
    env = dict(os.environ)
    commands = [["--help"], ["models", "--help"], ["models", "pull", "--help"], ["generate", "--help"]]
    if args.tracking_uri and args.model:
        env["MLFLOW_TRACKING_URI"] = args.tracking_uri
        commands += [["models", "list"], ["models", "show", args.model], ["models", "pull", args.model, "{tmp}/a"]]
    roots = [args.baseline.resolve(), ROOT] if args.baseline else [ROOT]
    names = ["baseline", "this checkout"] if args.baseline else ["this checkout"]
    print(f"median of {args.runs} runs, seconds (min-max)")
    print("| command | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(roots))
    for command in commands:
        times = {root: [] for root in roots}
        for _ in range(args.runs):
            for root in roots:
                times[root].append(_once(root, command, env))
        shown = " ".join(command).replace("{tmp}/a", "DIR")
        cells = [f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})" for t in times.values()]
        print(f"| `palp-sweep {shown}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
