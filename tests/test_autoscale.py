"""The autoscaler at work on one machine (make test-cluster): `ray job submit` a sweep to a head that trains
nothing (cluster-local.yaml: Ray's fake multi-node provider adds 1-CPU worker nodes as local processes); the
autoscaler adds a node per queued trial, the sweep finishes, and the nodes go after their idle timeout.

Prints the node count over time, the time from submit to the first training step and the scale-down time;
benchmarks/RESULTS.md records them ("Autoscaling on one machine").
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient
from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import (
    AUTOSCALING_REQUESTS_EXPIRE_TIME_S)

from .cluster_env import BIN, MlflowServer, S3Server, Session, _answers, free_port, ray_env, wait_for
from .ray_procs import session_processes

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
JOB = "palp-autoscale"
MODEL = "palp-cat-a-sketch-of-v1"  # smoke.yaml's one pair
# A trial ASHA stops can leave its Train controller's request_resources (made through Ray's autoscaling coordinator
# actor, refreshed every 20 s) standing until it expires, 180 s after the last refresh; the autoscaler keeps a node
# for it until then. Idle nodes go within this time after the job (cluster-local.yaml's idle timeout is 30 s).
SCALE_DOWN_S = AUTOSCALING_REQUESTS_EXPIRE_TIME_S + 60


class AutoscalingHead:
    """`RAY_FAKE_CLUSTER=1 ray start --head --num-cpus 0 --autoscaling-config cluster-local.yaml` in a session of
    its own. The worker nodes are children of its autoscaler (monitor) process: stopping the session stops them."""

    def __init__(self, workdir: Path):
        # its own temp dir (short: Ray's socket paths must fit 107 bytes), so /tmp/ray's ray_current_cluster stays
        self.temp_dir = tempfile.mkdtemp(prefix="ray-as-", dir="/tmp")
        port, dashboard_port = free_port(), free_port()
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
        config = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
        config["provider"]["gcs_address"] = self.address  # where its workers join (default: port 6379)
        self.idle_timeout_s = config["idle_timeout_minutes"] * 60
        path = Path(self.temp_dir) / "cluster-local.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        # 1 s between autoscaler updates (Ray's default 5), as Ray's own AutoscalingCluster tests run it
        env.update(ray_env(), RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        # every port its own: Ray's fixed defaults (job agent 52365, client server 10001) may belong to
        # another Ray on this machine, and then `ray job submit` finds "No available agent"
        self.session = Session([str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "0",
                                "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                                "--dashboard-port", str(dashboard_port), "--dashboard-agent-listen-port",
                                str(free_port()), "--ray-client-server-port", str(free_port()),
                                "--temp-dir", self.temp_dir, "--autoscaling-config", str(path),
                                "--disable-usage-stats"],
                               env, workdir / "ray-head.log")
        wait_for(lambda: _answers(f"{self.dashboard}/api/version"), "Ray dashboard", timeout=180)

    def sample(self) -> tuple[int, float]:
        """(alive nodes, the head included; CPUs in use), seen by this process, which joins the cluster once."""
        import ray
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
        nodes = sum(n["Alive"] for n in ray.nodes())
        return nodes, ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)

    def requested(self) -> list[dict]:
        """What the autoscaler keeps nodes for although no task or actor asks: `request_resources` bundles."""
        from ray.experimental.internal_kv import _internal_kv_get
        return json.loads(_internal_kv_get("__autoscaling_status"))["load_metrics_report"]["request_demand"]

    def submit(self, args: list[str], env_vars: dict) -> None:
        """`ray job submit --no-wait` as a user runs it, with this checkout in place as the working dir: the nodes
        share one temp dir, and each new node would unpack an uploaded working dir again into the same folder,
        deleting the running driver's CWD (ray/_private/runtime_env/working_dir.py: overwrite=True)."""
        for _ in range(24):  # under load the head's job agent starts after the dashboard answers
            job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--submission-id",
                                  JOB, "--no-wait", "--working-dir", f"local://{ROOT}",
                                  "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *args],
                                 capture_output=True, text=True, timeout=300)
            if "No available agent to submit job" not in job.stderr:
                break
            time.sleep(5)
        agent = Path(self.temp_dir, "session_latest", "logs", "dashboard_agent.log")
        assert job.returncode == 0, job.stderr[-3000:] + (agent.read_text()[-3000:] if agent.exists() else "")

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: the head's session, and anything that names its temp dir."""
        found = {p.pid: p for p in session_processes(self.session.proc.pid)}
        for p in psutil.process_iter(["cmdline"]):
            if self.temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
        return list(found.values())

    def stop(self) -> None:
        import ray
        if ray.is_initialized():
            ray.shutdown()
        self.session.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def first_step_time(uri: str) -> float:
    """When a trial first finished step 1 (s since the epoch): the earliest step-1 loss on the MLflow server."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    return min(m.timestamp / 1000 for r in runs for key in r.data.metrics if key.endswith("_loss")
               for m in client.get_metric_history(r.info.run_id, key) if m.step == 1)


def changes(timeline: list[tuple[float, int, float]]) -> str:
    """"0s:1/0 72s:2/1 ..." (time since submit: nodes / CPUs in use) at each change."""
    kept = [row for i, row in enumerate(timeline) if i == 0 or row[1:] != timeline[i - 1][1:]]
    return " ".join(f"{t:.0f}s:{n}/{busy:g}" for t, n, busy in kept)


def test_the_autoscaler_adds_nodes_for_queued_trials_and_removes_them_when_idle(tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    started = time.monotonic()
    for k, v in ray_env().items():  # this process joins the cluster to count its nodes
        monkeypatch.setenv(k, v)
    s3 = S3Server(tmp_path)
    mlflow = head = None
    try:
        mlflow = MlflowServer(tmp_path, s3)
        head = AutoscalingHead(tmp_path)
        assert head.sample() == (1, 0), "the head starts alone, with no CPU"
        submitted, running = time.time(), None
        timeline = [(0.0, 1, 0)]
        head.submit(["python", "-m", "orchestrator.cli", "recipes/smoke.yaml", f"storage_path={s3.uri('auto')}",
                     f"mlflow.tracking_uri={mlflow.uri}", "resources.max_concurrent_trials=2"], s3.env)
        client = JobSubmissionClient(head.dashboard)
        while not (status := client.get_job_status(JOB)).is_terminal():
            if status == JobStatus.RUNNING and running is None:
                running = time.time() - submitted
            timeline.append((time.time() - submitted, *head.sample()))
            assert time.time() - submitted < 480, "the job did not finish:\n" + client.get_job_logs(JOB)[-4000:]
            time.sleep(1)
        logs, ended = client.get_job_logs(JOB), time.time() - submitted
        assert status == JobStatus.SUCCEEDED, f"job {status}:\n{logs[-6000:]}"
        held = []
        while timeline[-1][1] > 1 and time.time() - submitted < ended + SCALE_DOWN_S:
            time.sleep(1)
            timeline.append((time.time() - submitted, *head.sample()))
            held = head.requested() or held
        first_step = first_step_time(mlflow.uri) - submitted
        versions = MlflowClient(mlflow.uri).search_model_versions(f"name = '{MODEL}'")
    finally:
        left = []
        if head is not None:
            head.stop()
            left = [p for p in head.processes() if p.is_running()]
        for part in (mlflow, s3):
            if part is not None:
                part.stop()
    assert not left, f"processes of the test's Ray outlived it: {[p.cmdline()[:2] for p in left]}"

    peak = max(n for _, n, _ in timeline)
    scaled_up = next((t for t, n, _ in timeline if n > 1), float("nan"))
    idle = max((t for t, _, busy in timeline if busy > 0), default=float("nan"))  # the last workers' CPUs freed
    print(f"\nautoscale: nodes/CPUs in use {changes(timeline)}; job running {running:.0f} s, first worker node "
          f"{scaled_up:.0f} s, first step {first_step:.0f} s, job done {ended:.0f} s after submit; workers removed "
          f"{timeline[-1][0] - idle:.0f} s after the last CPU was freed (idle timeout {head.idle_timeout_s:.0f} s); "
          f"test {time.monotonic() - started:.0f} s" + (f"; a node kept for request_resources {held}" if held else ""))
    # the sweep saw that its trials need nodes only the autoscaler can add, and said so
    assert "waiting for resources" in logs and "the autoscaler can add cpu_worker" in logs, logs[-3000:]
    assert 1 < peak <= 3, f"a worker node per queued trial, max_workers 2: {changes(timeline)}"
    assert versions, f"no registered model {MODEL} on the MLflow server"
    assert timeline[-1][1] == 1, f"worker nodes not removed {SCALE_DOWN_S:.0f} s after the job: {changes(timeline)}"
