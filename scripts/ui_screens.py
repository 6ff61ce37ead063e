"""Screenshots of a sweep in the MLflow UI, rendered by headless Chromium: what a person sees, without clicking.
Not part of `make test` (it needs a browser).

    python scripts/ui_screens.py --store sqlite:///mlflow.db --out docs/ui   # starts `mlflow server` on it
    python scripts/ui_screens.py --url http://127.0.0.1:5000 --out docs/ui   # a server that is running

Writes, for the newest sweep of the experiment (--experiment, default: the newest experiment with a sweep):
runs.png (the runs view the sweep's browse line opens: the winner on top), parent.png (the sweep's run: its
description and winners), trial.png (the winner's run as a click on it opens it: Overview, whose metrics and
parameters MLflow 3 shows without images), samples.png (its Artifacts tab on its best sample grid), model.png
and version.png (its registered model and version with the champion's samples; tall enough to show the tags). Exits 1 when the experiment has no runs
(through the REST API) or the runs view renders none of them (Chromium's DOM), 2 on a usage error.

With --store the server runs on a free port of 127.0.0.1 and is stopped at the end; the pages are opened as
http://palp-mlflow:PORT (Chromium maps the name to 127.0.0.1) because on a localhost address MLflow 3 opens its
assistant panel over a third of the page on a first visit.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's orchestrator
from orchestrator.model_card import run_link, samples_artifact  # noqa: E402
from orchestrator.tracking import SWEEP_TAG, TRIAL_TAG, browse_lines  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
HOST = "palp-mlflow"
WINDOW = "1600,1000"
BUDGET_MS = 15000  # virtual time for the page's requests and rendering


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: str, port: int, workdir: Path) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port, answering for HOST too; in its own process group (stopped as one)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    origin = f"{HOST}:{port}"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", store,
         "--workers", "1", "--allowed-hosts", f"{origin},127.0.0.1:{port},localhost:{port}",
         "--cors-allowed-origins", f"http://{origin}"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"ui_screens: mlflow server exited with {proc.returncode}")
            time.sleep(0.5)
    stop_server(proc)
    raise SystemExit("ui_screens: mlflow server did not answer in 2 minutes")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this script started: the server and its workers
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_chromium(seconds: int = 600) -> None:
    """Chromium may still be being installed (apt): wait for it rather than fail."""
    deadline = time.monotonic() + seconds
    while not (os.access(CHROMIUM, os.X_OK) and shutil.which(CHROMIUM)):
        if time.monotonic() > deadline:
            raise SystemExit(f"ui_screens: no {CHROMIUM} (apt-get install chromium)")
        time.sleep(5)


def chromium(*args: str, resolve: str | None, window: str = WINDOW) -> str:
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={window}",
             f"--virtual-time-budget={BUDGET_MS}"]
    if resolve:
        flags.append(f"--host-resolver-rules=MAP {resolve} 127.0.0.1")
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)
    return done.stdout


def newest_sweep(client: MlflowClient, experiment_name: str | None):
    """(experiment, the newest parent run of a sweep in it)."""
    if experiment_name:
        experiments = [client.get_experiment_by_name(experiment_name)]
        if experiments[0] is None:
            raise SystemExit(f"ui_screens: no experiment {experiment_name!r}")
    else:
        experiments = client.search_experiments(order_by=["creation_time DESC"])
    for experiment in experiments:
        parents = client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` LIKE '%'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if parents:
            return experiment, parents[0]
    where = f"experiment {experiment_name!r} has no" if experiment_name else "no experiment has"
    print(f"ui_screens: {where} sweep runs: the runs page would be empty", file=sys.stderr)
    raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ui_screens.py", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running MLflow server, e.g. http://127.0.0.1:5000")
    where.add_argument("--store", help="a tracking store to serve, e.g. sqlite:///mlflow.db")
    parser.add_argument("--out", default="docs/ui", help="folder for the PNGs (default docs/ui)")
    parser.add_argument("--experiment", help="experiment name (default: the newest with a sweep)")
    args = parser.parse_args(argv)
    wait_for_chromium()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server, workdir = None, Path(tempfile.mkdtemp(prefix="ui-screens-"))
    try:
        if args.store:
            port = free_port()
            server = start_server(args.store, port, workdir)
            api, base, resolve = f"http://127.0.0.1:{port}", f"http://{HOST}:{port}", HOST
        else:
            api = base = args.url.rstrip("/")
            resolve = None
        return screens(MlflowClient(api), base, out, args.experiment, resolve)
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(workdir, ignore_errors=True)


def screens(client: MlflowClient, base: str, out: Path, experiment_name: str | None, resolve: str | None) -> int:
    experiment, parent = newest_sweep(client, experiment_name)
    eid = experiment.experiment_id
    children = client.search_runs([eid], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    if not children:
        print(f"ui_screens: sweep run {parent.info.run_id} has no trial runs", file=sys.stderr)
        return 1
    # the first pair's winner (overview.winner_fields: best.<pair>.trial, .best_method, .model; metric .step)
    tags, metrics = parent.data.tags, parent.data.metrics
    prefix = next((k.removesuffix(".trial") for k in sorted(tags) if k.startswith("best.") and k.endswith(".trial")),
                  None)
    winner = next((c for c in children if prefix and c.data.tags.get(TRIAL_TAG) == tags[f"{prefix}.trial"]),
                  children[0])
    [runs_url] = browse_lines(base, eid)  # what the sweep printed, with this server's address
    # name -> (url, window): tall enough that each page's key content is on screen without scrolling
    pages = {"runs": (runs_url, WINDOW), "parent": (f"{base}/{run_link(eid, parent.info.run_id)}", "1600,1400"),
             "trial": (f"{base}/{run_link(eid, winner.info.run_id)}", "1600,1500")}  # what a click on the run opens
    if prefix:  # the run's Artifacts tab, opened on its best sample grid (the Overview tab shows no images)
        grid = samples_artifact({"step": metrics[f"{prefix}.step"], "best_method": tags[f"{prefix}.best_method"]})
        pages["samples"] = (f"{base}/#/experiments/{eid}/runs/{winner.info.run_id}/artifacts/{grid}"
                            "?workflowType=machine_learning", WINDOW)
    model = tags.get(f"{prefix}.model") if prefix else None
    if model:
        name, version = model.removeprefix("models:/").rsplit("/", 1)
        pages |= {"model": (f"{base}/#/models/{name}", "1600,1500"),
                  "version": (f"{base}/#/models/{name}/versions/{version}", "1600,1900")}
    dom = chromium("--dump-dom", runs_url, resolve=resolve)
    shown = [c.info.run_name for c in children if c.info.run_name in dom]
    if not shown:
        print(f"ui_screens: the runs view shows none of the sweep's {len(children)} trial runs: {runs_url}",
              file=sys.stderr)
        return 1
    for name, (url, window) in pages.items():
        path = out / f"{name}.png"
        chromium(f"--screenshot={path.resolve()}", url, resolve=resolve, window=window)
        if not path.is_file():
            print(f"ui_screens: chromium wrote no {path} for {url}", file=sys.stderr)
            return 1
        print(f"{path}  {url}")
    print(f"runs view: {len(shown)}/{len(children)} trial runs of sweep {parent.info.run_name!r} shown")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
