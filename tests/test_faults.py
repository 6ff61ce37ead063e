"""Fault injection: what a sweep does when a worker dies, the driver is killed or interrupted, an arm diverges
or the MLflow server goes away. Each sweep is a real `palp-sweep` process with its own local Ray; faults are
real signals to exactly the processes the test started. docs/faults.md tabulates the outcomes.

`make test-faults` (pytest -m faults) runs these; they are not part of `make test`."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "recipes" / "smoke.yaml")
PAIR = "cat__a-sketch-of-v1"
MODEL = "palp-cat-a-sketch-of-v1"


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_what_we_started():
    """A failed test leaves no sweep (nor its Ray) running; only processes this module started are touched."""
    yield
    while STARTED:
        kill_tree(STARTED.pop().pid)


def start_sweep(tmp_path: Path, *overrides: str, uri: str | None = None, resume: bool = False) -> subprocess.Popen:
    uri = uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "orchestrator.cli", SMOKE, f"storage_path={tmp_path / 'runs'}",
            f"mlflow.tracking_uri={uri}", *overrides] + (["--resume"] if resume else [])
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}  # its own Ray
    log = tmp_path / f"sweep-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        # its own session, as a command typed in a terminal is its own process group
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = log
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 420) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    return code, proc.log.read_text()


def kill_tree(pid: int) -> None:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def wait_for(predicate, timeout: float = 300, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def trial_files(tmp_path: Path, name: str) -> list[Path]:
    return sorted((tmp_path / "runs" / "smoke" / "trials" / PAIR).glob(f"*/{name}"))


def last_step(path: Path) -> int:
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def reached(tmp_path: Path, step: int):
    """A trial's metrics.jsonl path once it has passed `step`."""
    return lambda: next((p for p in trial_files(tmp_path, "metrics.jsonl") if last_step(p) >= step), None)


def resume_line(out: str) -> str:
    """The sweep's last line of its own (Ray's actors may still print a notice after it: issue 24)."""
    return [line for line in out.strip().splitlines() if line.startswith("palp-sweep:")][-1]


def runs(uri: str) -> tuple[list, list]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("smoke")
    found = client.search_runs([experiment.experiment_id])
    return ([r for r in found if "mlflow.parentRunId" not in r.data.tags],
            [r for r in found if "mlflow.parentRunId" in r.data.tags])


def versions(uri: str) -> list:
    return MlflowClient(uri).search_model_versions(f"name = '{MODEL}'")


def train_worker(sweep: subprocess.Popen) -> psutil.Process:
    """The Ray Train worker process of the running trial: a descendant of this sweep's own Ray."""
    def find():
        for p in psutil.Process(sweep.pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                pass
    return wait_for(find, 120, "the Ray Train worker")


def test_killed_worker_resumes_from_its_checkpoint_and_logs_each_step_once(tmp_path):
    # one arm, reports (with a checkpoint) at 10; killed after it, the worker group restarts from step 10
    sweep = start_sweep(tmp_path, "search.alignment=palp", "search.steps=[10,200]", "scheduler.type=fifo",
                        "eval.methods=[cfg]")
    checkpoints = tmp_path / "runs" / "smoke" / "train"
    wait_for(lambda: list(checkpoints.glob("train-*/checkpoint_*")), what="the step-10 checkpoint")
    metrics = wait_for(reached(tmp_path, 15), what="step 15")
    worker = train_worker(sweep)
    worker.kill()
    killed_at = last_step(metrics)
    code, out = finish(sweep)
    assert code == 0, out[-3000:]
    assert killed_at < 200 and "[FailurePolicy] RETRY" in out  # the kill landed mid-trial: one restart
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 201))  # redone steps written once
    seconds = [m["train_seconds"] for m in lines]
    assert all(a <= b for a, b in zip(seconds, seconds[1:]))  # the timer carried on across the restart
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    [child] = runs(uri)[1]
    history = MlflowClient(uri).get_metric_history(child.info.run_id, "denoise_loss")
    assert sorted(m.step for m in history) == list(range(1, 201))
    assert child.info.status == "FINISHED" and len(versions(uri)) == 1


def group_checkpoint(tmp_path: Path) -> int:
    """The step of the trial group's last checkpoint Ray Train's controller has taken in (it polls its workers)."""
    found = list((tmp_path / "runs" / "smoke" / "train").glob("group-*/checkpoint_manager_snapshot.json"))
    latest = (json.loads(found[0].read_text()).get("latest_checkpoint_result") or {}) if found else {}
    return latest.get("metrics", {}).get("step", 0)


def test_a_killed_group_worker_restores_every_member_from_the_group_checkpoint(tmp_path):
    """Two trials in one trial group (orchestrator/groups.py); its worker killed after the step-10 checkpoint: Ray
    Train restarts the group, both members resume at step 10, each logs every step once and ends with its adapter."""
    sweep = start_sweep(tmp_path, "search.alignment=palp", "search.alpha=[3.0, 12.0]", "search.steps=[10,200]",
                        "scheduler.type=fifo", "eval.methods=[cfg]", "resources.trials_per_group=2",
                        "resources.max_concurrent_trials=null")
    wait_for(lambda: group_checkpoint(tmp_path) == 10, what="the group's step-10 checkpoint, registered")
    train_worker(sweep).kill()
    code, out = finish(sweep)
    assert code == 0, out[-3000:]
    assert "[FailurePolicy] RETRY" in out and "palp: group resumed from the checkpoint at step 10" in out
    files = trial_files(tmp_path, "metrics.jsonl")
    assert len(files) == 2
    for f in files:
        assert [json.loads(line)["step"] for line in f.read_text().splitlines()] == list(range(1, 201))
        assert json.loads((f.parent / "adapter" / "manifest.json").read_text())["steps"] == 200
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    children = runs(uri)[1]
    assert sorted(float(c.data.params["alpha"]) for c in children) == [3.0, 12.0]
    for child in children:
        assert child.info.status == "FINISHED"
        history = MlflowClient(uri).get_metric_history(child.info.run_id, "denoise_loss")
        assert sorted(m.step for m in history) == list(range(1, 201))


def test_resume_restores_a_group_without_the_member_asha_stopped(tmp_path):
    """A group of 2; ASHA stops the weaker member at step 4; Ctrl-C at step 10+; `--resume`: the other member
    comes back alone, restores from the group's step-4 checkpoint (which holds both) and finishes; the stopped
    member stays at step 4. Nothing is trained twice in MLflow or metrics.jsonl, one version is registered."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # α 12 reports first and scores higher at step 4 on this tiny model (as in tests/test_group_sweep.py)
    args = ("search.alignment=palp", "search.alpha=[12.0, 3.0]", "search.steps=[4,200]", "eval.methods=[cfg]",
            "resources.trials_per_group=2", "resources.max_concurrent_trials=null")
    sweep = start_sweep(tmp_path, *args)
    wait_for(lambda: group_checkpoint(tmp_path) == 4, what="the group's step-4 checkpoint, registered")
    wait_for(reached(tmp_path, 10), what="step 10")
    os.killpg(sweep.pid, signal.SIGINT)
    code, out = finish(sweep)
    assert code == 130, out[-3000:]

    code, out = finish(start_sweep(tmp_path, *args, resume=True))
    assert code == 0, out[-3000:]
    assert "palp: group resumed from the checkpoint at step 4 with 1 of its 2 training members" in out
    steps = {}
    for child in runs(uri)[1]:
        alpha = float(child.data.params["alpha"])
        assert child.info.status == "FINISHED"
        history = MlflowClient(uri).get_metric_history(child.info.run_id, "denoise_loss")
        steps[alpha] = sorted(m.step for m in history)
    assert steps == {12.0: list(range(1, 201)), 3.0: list(range(1, 5))}
    files = {last_step(f): f for f in trial_files(tmp_path, "metrics.jsonl")}
    assert sorted(files) == [4, 200]
    assert [json.loads(line)["step"] for line in files[200].read_text().splitlines()] == list(range(1, 201))
    assert len(versions(uri)) == 1


def test_sigint_exits_130_registers_nothing_and_resume_completes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = "search.steps=[4,200]"  # long enough to be interrupted mid-trial
    sweep = start_sweep(tmp_path, steps)
    wait_for(reached(tmp_path, 10), what="step 10")
    os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    code, out = finish(sweep)
    assert code == 130, out[-3000:]
    hint = resume_line(out)
    assert "nothing registered" in hint and SMOKE in hint and steps in hint and hint.endswith("--resume")
    parents, children = runs(uri)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert children and "RUNNING" not in {c.info.status for c in children}
    assert "KILLED" in {c.info.status for c in children}
    assert versions(uri) == []  # nothing partial registered

    code, out = finish(start_sweep(tmp_path, steps, resume=True))
    assert code == 0, out[-3000:]
    parents, children = runs(uri)
    assert [p.info.status for p in parents] == ["FINISHED"]  # the resumed sweep continued its own parent
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert len(versions(uri)) == 1


def test_sigterm_ends_the_sweep_as_killed_with_nothing_left_running(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = start_sweep(tmp_path, "search.steps=[4,200]")
    wait_for(reached(tmp_path, 10), what="step 10")
    sweep.terminate()  # what `ray job stop` sends the job's driver
    code, out = finish(sweep, timeout=60)
    assert code == 130, out[-3000:]
    parents, children = runs(uri)
    assert [p.info.status for p in parents] == ["KILLED"] and children
    assert {c.info.status for c in children} <= {"KILLED", "FINISHED"} and versions(uri) == []


def test_killed_driver_then_resume_leaves_no_run_running_and_registers_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = start_sweep(tmp_path, "search.steps=[4,200]")
    wait_for(reached(tmp_path, 10), what="step 10")
    time.sleep(2)  # Tune saves its experiment state every few seconds
    kill_tree(sweep.pid)  # SIGKILL: no chance to clean up
    sweep.wait(30)
    code, out = finish(start_sweep(tmp_path, "search.steps=[4,200]", resume=True))
    assert code == 0, out[-3000:]
    parents, children = runs(uri)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert len(versions(uri)) == 1
    code, out = finish(start_sweep(tmp_path, "search.steps=[4,200]", resume=True))  # nothing left to do
    assert code == 0 and len(versions(uri)) == 1 and "registered before, not again" in out


def test_diverging_arm_fails_with_its_reason_and_the_other_arm_wins(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out = finish(start_sweep(tmp_path, "search.lr=[1e-3,1e30]", "search.alignment=palp",
                                   "scheduler.type=fifo", "resources.max_failures=0", "eval.methods=[cfg]"))
    assert code == 0, out[-3000:]
    _, children = runs(uri)
    by_lr = {float(c.data.params["lr"]): c for c in children}
    failed = by_lr[1e30]
    assert failed.info.status == "FAILED" and re.search(r"step \d+: \w+_loss is (nan|inf)", failed.data.tags["palp.error"])
    assert by_lr[1e-3].info.status == "FINISHED"
    [version] = versions(uri)
    assert version.tags["lr"] == "0.001"
    assert re.search(r"ERROR: .*_loss is (nan|inf)", out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
        except OSError:
            return False
    wait_for(healthy, 120, "mlflow server")
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers, nothing else
    proc.wait(60)


def test_mlflow_server_outage_mid_sweep_loses_no_metric(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    try:
        sweep = start_sweep(tmp_path, "search.alignment=palp", "search.steps=[10,200]", "scheduler.type=fifo",
                            "eval.methods=[cfg]", uri=uri)
        wait_for(reached(tmp_path, 15), what="step 15")
        stop_server(server)
        time.sleep(8)  # steps go on; their metrics wait in the worker's buffer
        server = mlflow_server(tmp_path, port)
        code, out = finish(sweep)
        assert code == 0, out[-3000:]
        [child] = runs(uri)[1]
        history = MlflowClient(uri).get_metric_history(child.info.run_id, "denoise_loss")
        assert sorted(m.step for m in history) == list(range(1, 201))
        assert child.info.status == "FINISHED"
    finally:
        stop_server(server)
