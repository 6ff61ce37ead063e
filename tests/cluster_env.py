"""A cloud cluster's parts on this machine, for the `cluster` tests (make test-cluster) and docs/cluster.md:
S3 on 127.0.0.1 (moto's server), an MLflow server whose artifacts go to that S3, and a Ray cluster of
several nodes (`ray start` once per node, each node in a session of its own, so a test can lose one).

Every part starts in its own process session and stops with it (tests/ray_procs.py): nothing else on the
machine is touched, and nothing is left running.
"""

import json
import os
import socket
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .ray_procs import stop_session

BIN = Path(sys.executable).parent
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f} s")


def ray_env() -> dict:
    """For every process of a test cluster: our venv's `ray` first, no usage stats, and no token auth (Ray 2.60
    turns it on when ~/.ray holds a token, and a process that imported Ray before cannot turn it on later)."""
    return {"PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _answers(url: str) -> bool:
    """An HTTP server answers at `url` (401 included: Ray's dashboard with token auth)."""
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        pass
    return True


def _listening(port: int) -> bool:
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    return True


def _or_stop(part, start) -> None:
    """Run `start()`; if it fails, stop `part` (nothing half-started is left running) and re-raise."""
    try:
        start()
    except BaseException:
        part.stop()
        raise


class Session:
    """A process started in a session of its own; `stop` ends it and everything it started."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> None:
        stop_session(self.proc.pid, timeout=20)
        self.proc.wait(timeout=30)


class S3Server:
    """moto's S3 API on 127.0.0.1 with one bucket; `env` is what a client needs to reach it."""

    def __init__(self, workdir: Path, bucket: str = "palp"):
        self.port, self.bucket = free_port(), bucket
        self.env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}
        self.session = Session([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                               {**os.environ, **self.env}, workdir / "s3.log")
        _or_stop(self, lambda: (wait_for(lambda: _listening(self.port), "moto_server"),
                                self.client().create_bucket(Bucket=bucket)))

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        # keys ending in "/" are the empty folder markers pyarrow's create_dir writes
        return [o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}"

    def stop(self) -> None:
        self.session.stop()


class MlflowServer:
    """`mlflow server` with an sqlite backend and proxied artifacts in S3: clients need no S3 credentials."""

    def __init__(self, workdir: Path, s3: S3Server):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        (workdir / "mlflow-server").mkdir(parents=True, exist_ok=True)
        # no job runner: its 7 polling processes take ~0.3 CPU while idle, and nothing here runs MLflow jobs
        env = {**os.environ, **s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.env["AWS_ENDPOINT_URL"],
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.session = Session([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                                "--backend-store-uri", f"sqlite:///{workdir / 'mlflow-server' / 'mlflow.db'}",
                                "--artifacts-destination", s3.uri("mlartifacts"), "--workers", "1"],
                               env, workdir / "mlflow-server.log")
        _or_stop(self, lambda: wait_for(lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200,
                                        "mlflow server", timeout=180))

    def stop(self) -> None:
        self.session.stop()


class RayCluster:
    """A head (GCS, dashboard, job server) and worker nodes, each `ray start` in a session of its own.

    Node i carries the custom resource `node_i` (the head: `node_0`), so a test can tell which of its nodes
    holds an actor (`node_of`) and lose exactly that one (`kill_node`)."""

    def __init__(self, workdir: Path, env: dict | None = None, head_cpus: float = 1):
        self.workdir, self.env = workdir, {**os.environ, **ray_env(), **(env or {})}
        # its own temp dir (short: Ray's socket paths must fit 107 bytes), so its ray_current_cluster
        # does not replace /tmp/ray's
        self.temp_dir = tempfile.mkdtemp(prefix="ray-cl-", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[int, Session] = {}
        self._start(0, ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(self.dashboard_port)], head_cpus)
        _or_stop(self, lambda: wait_for(lambda: _answers(f"{self.dashboard}/api/version"), "Ray dashboard",
                                        timeout=180))

    def add_node(self, cpus: float = 1) -> int:
        """Start worker node i and wait until it is alive (on 2 busy cores a node can time out in its
        startup: it gets one more try)."""
        i = max(self.nodes) + 1
        for attempt in range(2):
            self._start(i, ["--address", self.address], cpus)
            try:
                self.wait_nodes(len(self.nodes), until=lambda: self.nodes[i].proc.poll() is not None)
                return i
            except TimeoutError:
                if attempt:
                    raise
                self.kill_node(i)
        return i

    def scratch(self, i: int) -> Path:
        """Node i's own temp dir (TMPDIR of its processes): what a separate machine's local disk would be."""
        return self.workdir / f"node-{i}-tmp"

    def _start(self, i: int, args: list[str], cpus: float) -> None:
        self.scratch(i).mkdir(parents=True, exist_ok=True)
        self.nodes[i] = Session([str(BIN / "ray"), "start", "--block", *args, "--num-cpus", str(cpus),
                                 "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir,
                                 "--resources", json.dumps({f"node_{i}": 1}), "--disable-usage-stats"],
                                {**self.env, "TMPDIR": str(self.scratch(i))}, self.workdir / f"ray-node-{i}.log")

    def alive_nodes(self) -> list[int]:
        """Our node numbers that the GCS sees alive."""
        import ray
        return sorted(int(k.removeprefix("node_")) for n in ray.nodes() if n["Alive"]
                      for k in n["Resources"] if k.startswith("node_"))

    def connect(self, env: dict | None = None) -> None:
        """Connect this process to the cluster (once); its jobs' processes get `env`."""
        import ray
        if not ray.is_initialized():
            os.environ.update(ray_env())
            ray.init(address=self.address, logging_level="ERROR", log_to_driver=False,
                     runtime_env={"env_vars": env or {}})

    def wait_nodes(self, count: int, timeout: float = 180, until=lambda: False) -> None:
        """Wait until `count` nodes are alive; TimeoutError when it takes `timeout` s or `until()` says give up."""
        self.connect()
        deadline = time.monotonic() + timeout
        while len(self.alive_nodes()) < count:
            if until() or time.monotonic() > deadline:
                raise TimeoutError(f"{count} Ray nodes did not come up")
            time.sleep(0.3)

    def node_of(self, node_id: str) -> int:
        import ray
        for n in ray.nodes():
            if n["NodeID"] == node_id:
                return next(int(k.removeprefix("node_")) for k in n["Resources"] if k.startswith("node_"))
        raise KeyError(node_id)

    def kill_node(self, i: int) -> None:
        """Lose node i at once, as a machine that dies: SIGKILL to every process of its session."""
        node = self.nodes.pop(i)
        stop_session(node.proc.pid, graceful=False)
        node.proc.wait(timeout=30)

    def stop(self) -> None:
        import ray
        if ray.is_initialized():
            ray.shutdown()
        for i in sorted(self.nodes, reverse=True):  # workers first, the head last; no 30 s drain each
            self.kill_node(i)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
