"""The product's main job as a user runs it: `ray start --head`, `ray job submit -- palp-sweep ...`, then
`palp-sweep generate` on the registered model. The job sweeps recipes/sdxl_smoke.yaml with base_model set to a tiny
SDXL folder: training (from_pretrained on the worker), evaluation and the registry on SDXL, then CFG, personalization
guidance and AlignIT sampled from it."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.generate import main as generate_main
from palp_trainer.families.tiny_xl import save_tiny_xl

from .ray_procs import session_processes, stop_session

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # an earlier test's server
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    # Ray 2.60 token auth: once a token exists under ~/.ray, clients get HTTP 401 unless they use it
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    return env


def test_ray_job_submit_sdxl_sweep_then_generate(tmp_path):
    env, gcs, dashboard = ray_env(), free_port(), free_port()
    storage = tmp_path / "runs"
    base = save_tiny_xl(tmp_path / "tiny-sdxl")
    # its own temp dir (short: Ray's socket paths must fit 107 bytes), so its ray_current_cluster does not
    # replace /tmp/ray's; its own session, so the test stops exactly its processes (`ray stop` stops all)
    temp_dir = tempfile.mkdtemp(prefix="ray-job-", dir="/tmp")
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=4",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out[-3000:]
        address = f"http://127.0.0.1:{dashboard}"
        for _ in range(24):  # under load the head's job agent starts after `ray start` returns
            job = subprocess.run(
                [BIN / "ray", "job", "submit", "--address", address, "--submission-id", "palp-smoke",
                 "--working-dir", str(ROOT), "--", "palp-sweep", "recipes/sdxl_smoke.yaml", f"base_model={base}",
                 "resolution=32", "search.alignment=palp", "search.steps=[4]", "eval.methods=[cfg]",
                 f"storage_path={storage}"],
                env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in job.stderr:
                break
            time.sleep(5)
        status = subprocess.run([BIN / "ray", "job", "status", "--address", address, "palp-smoke"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "palp-smoke' succeeded" in status.stdout  # `ray job status`: SUCCEEDED
    finally:
        stop_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not session_processes(head.pid), "processes of the test's Ray head survived"
    # outputs live under storage_path and outlive the job's temporary working dir
    (adapter,) = storage.glob("sdxl-smoke/trials/*/*/adapter")
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["base_model"] == str(base)
    assert (storage / "mlflow.db").is_file() and (storage / "sdxl-smoke" / "report" / "summary.json").is_file()
    assert "registered: models:/palp-cat-a-sketch-of-v1/1" in job.stdout

    out = tmp_path / "generated"  # `palp-sweep generate`, in this process (its imports are loaded already)
    assert generate_main(["models:/palp-cat-a-sketch-of-v1@champion", "--tracking-uri", f"sqlite:///{storage / 'mlflow.db'}",
                          "--prompt", "A sketch of [V1]", "--seeds", "0,1", "--steps", "2", "--method", "cfg,pg,alignit",
                          "--out", str(out), "--clip-model", "tiny"]) == 0
    assert {p.name for p in out.iterdir()} == {f"{m}-seed{s}.png" for m in ("cfg", "pg-0.6", "alignit")
                                               for s in (0, 1)} | {"grid.png"}
