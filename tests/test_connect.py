"""A sweep never hangs on Ray: other Ray instances on the host, a stale `ray_current_cluster`, an address
nobody answers at, a trial no node can hold. Unit tests of the feasibility rule, then the CLI end to end."""

import copy
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
import ray
import yaml
from mlflow import MlflowClient

import orchestrator.sweep  # noqa: F401  (torch, Ray, MLflow: imported here, outside the timed calls)
from orchestrator import connect
from orchestrator.cli import main
from orchestrator.recipe import RecipeError, Resources

from .ray_procs import session_processes, stop_session

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "recipes" / "smoke.yaml")
TWO_CPUS = [{"CPU": 2.0, "memory": 1e9}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the feasibility rule (no Ray) ----

def test_a_trial_that_fits_the_nodes_starts():
    assert connect.feasibility(Resources(), TWO_CPUS, {}) is None
    # the trial actor takes no CPU (it lives on the head): a worker may take a whole node
    assert connect.feasibility(Resources(cpus_per_worker=2), TWO_CPUS, {}) is None
    assert connect.feasibility(Resources(workers_per_trial=2, placement="strict_spread"),
                               [{"CPU": 1.0}, {"CPU": 1.0}], {}) is None
    # PACK is soft: two 1-CPU workers may spread over two nodes
    assert connect.feasibility(Resources(workers_per_trial=2), [{"CPU": 1.0}, {"CPU": 1.5}], {}) is None


@pytest.mark.parametrize("resources, field", [
    (Resources(cpus_per_worker=64), "resources.cpus_per_worker"),
    (Resources(workers_per_trial=3), "resources.workers_per_trial"),
    (Resources(use_gpu=True), "resources.use_gpu"),
    (Resources(cpus_per_worker=2.5), "resources.cpus_per_worker"),
    # one node holds three workers, but strict_spread wants three nodes
    (Resources(workers_per_trial=3, cpus_per_worker=0.5, placement="strict_spread"), "resources.placement"),
])
def test_a_trial_no_node_can_hold_fails_naming_the_field(resources, field):
    with pytest.raises(RecipeError) as e:
        connect.feasibility(resources, TWO_CPUS, {})
    assert str(e.value).startswith(field) and "no autoscaler" in str(e.value)


@pytest.fixture
def cluster_yaml_types(tmp_path, monkeypatch) -> dict:
    """The node types the autoscaler of `ray up cluster.yaml` may add, read back from its bootstrap config."""
    from ray.autoscaler._private.util import prepare_config

    for module in ("boto3", "botocore"):  # prepare_config stays offline (test_cluster.py)
        monkeypatch.setitem(sys.modules, module, None)
    config = prepare_config(copy.deepcopy(yaml.safe_load((ROOT / "cluster.yaml").read_text())))
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(connect, "BOOTSTRAP_CONFIG", tmp_path / "ray_bootstrap_config.yaml")
    return connect.autoscaler_node_types()


def test_autoscaler_node_types_come_from_the_bootstrap_config(cluster_yaml_types):
    assert {name: res.get("GPU", 0) for name, (res, most) in cluster_yaml_types.items() if most > 0} == \
        {"gpu_1xa10g": 1, "gpu_8xa100": 8}


def test_gpus_the_autoscaler_can_add_wait_visibly(cluster_yaml_types):
    head = [{"CPU": 0.0}]  # cluster.yaml's head: trains nothing; GPU workers scale from zero
    line = connect.feasibility(Resources(use_gpu=True, workers_per_trial=2), head, cluster_yaml_types)
    assert line.startswith("waiting for resources: 2 worker(s) x (1 CPU, 1 GPU)") and "gpu_1xa10g" in line
    with pytest.raises(RecipeError, match=r"^resources\.gpus_per_worker: .* no node has 16 GPU"):
        connect.feasibility(Resources(use_gpu=True, gpus_per_worker=16), head, cluster_yaml_types)


def test_autoscaler_node_types_come_from_the_running_autoscaler(tmp_path, monkeypatch):
    """No bootstrap config (`ray start --head --autoscaling-config cluster-local.yaml`, not `ray up`): the file
    named on the command line of the process whose pid the autoscaler's status gives, relative to its CWD."""
    monkeypatch.setattr(connect, "BOOTSTRAP_CONFIG", tmp_path / "absent.yaml")
    monitor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                "--autoscaling-config=cluster-local.yaml"], cwd=ROOT)
    try:
        status = {"__autoscaling_status": f'{{"monitor_pid": {monitor.pid}}}'.encode()}
        monkeypatch.setattr(connect.internal_kv, "_internal_kv_get", lambda key: status.get(key))
        assert {name: (res["CPU"], most) for name, (res, most) in connect.autoscaler_node_types().items()} == \
            {"cpu_worker": (1, 2)}
        status.clear()  # no autoscaler
        assert connect.autoscaler_node_types() == {}
    finally:
        monitor.kill()
        monitor.wait()


def test_variables_the_job_sets_already_are_not_set_again(monkeypatch):
    """`ray job submit --runtime-env-json '{"env_vars": {"AWS_...": ...}}'`: the driver sees them in its own
    environment and forwards them, but ray.init fails on a variable the job's runtime env sets too."""
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"AWS_ACCESS_KEY_ID": "k"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = connect._runtime_env("10.0.0.1:6379", {"AWS_ACCESS_KEY_ID": "k", "HF_TOKEN": "t"})["env_vars"]
    assert env == {"HF_TOKEN": "t", "RAY_ADDRESS": "10.0.0.1:6379", "RAY_API_SERVER_ADDRESS": ""}
    from ray.runtime_env.runtime_env import _merge_runtime_env
    assert _merge_runtime_env(job["runtime_env"], {"env_vars": env}) is not None  # what ray.init checks


# ---- the CLI end to end (local Ray, sweeps in subprocesses) ----

def _errors(capsys) -> list[str]:
    """palp-sweep's stderr lines (libraries log there too: transformers at import, MLflow creating a store)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("palp-sweep")]


def _env(**extra) -> dict:
    # RAY_ADDRESS: a cluster of its own; MLFLOW_TRACKING_URI: mlflow.set_tracking_uri in an earlier test sets it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _sweep(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """`palp-sweep ARGS` run from `cwd` (MLflow's default store, mlflow.db, lands there), in a session of its
    own, so its local Ray can be stopped exactly."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", SMOKE, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            stop_session(p.pid, timeout=10)
    for p in procs:
        assert not session_processes(p.pid), "a sweep's Ray outlived it"
    return outs


OTHER_RAY = "import ray, time; ray.init(include_dashboard=False, num_cpus=1); print('up', flush=True); time.sleep(600)"


@pytest.mark.integration
def test_workers_find_their_own_cluster_beside_another_ray():
    """The root cause, directly: the state API call Ray Train's PlacementGroupCleaner makes in a worker
    (`is_actor_alive`, no address given) must find the controller in our cluster, with another Ray on the
    host. Without RAY_ADDRESS in the job's env it raised "Found multiple active Ray instances"."""
    other = subprocess.Popen([sys.executable, "-c", OTHER_RAY], env=_env(), stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        assert other.stdout.readline().strip() == "up"
        connect.connect("local", env_vars={})
        from ray.train.v2._internal.state.util import is_actor_alive

        @ray.remote(num_cpus=0)
        class Controller:
            def alive(self, actor_id: str) -> bool:
                return is_actor_alive(actor_id, timeout=30)

        controller = Controller.remote()
        assert ray.get(controller.alive.remote(controller._actor_id.hex()), timeout=120) is True
    finally:
        ray.shutdown()
        stop_session(other.pid, timeout=10)


@pytest.mark.faults  # two whole sweeps: in make test-faults, with the other faults
def test_two_sweeps_at_once_in_one_folder_both_finish(tmp_path):
    """Each sweep's Ray sees the other's GCS: before the fix, Ray Train's PlacementGroupCleaner failed with
    "Found multiple active Ray instances", the first trial's workers were never freed and the second
    trial waited for them forever (both sweeps hung, runs left RUNNING)."""
    storage = tmp_path / "runs"
    started = time.time()
    procs = [_sweep([f"name={name}", f"storage_path={storage}"], tmp_path, _env()) for name in ("a", "b")]
    outs = _finish(procs, timeout=900)
    print(f"two sweeps at once: {time.time() - started:.0f} s")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
        assert "Found multiple active Ray instances" not in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("a", "b"):
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert len(runs) == 3 and all(r.info.status in ("FINISHED", "KILLED") for r in runs)
        assert (storage / name / "report" / "summary.json").is_file()


@pytest.mark.faults
def test_a_stale_current_cluster_file_is_ignored(tmp_path):
    """`ray_current_cluster` names a dead head (as a killed `ray start` leaves it): a standalone sweep still
    runs, on a Ray of its own (before: ray.init(address=None) joined the dead address and waited)."""
    temp = tempfile.mkdtemp(prefix="ray-stale-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        Path(temp, "ray").mkdir()
        Path(temp, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        started = time.time()
        proc = _sweep([f"storage_path={tmp_path / 'runs'}", "search.alignment=palp", "search.steps=[4]", "eval.methods=[cfg]"],
                      tmp_path, _env(RAY_TMPDIR=temp))
        [out] = _finish([proc], timeout=600)
        print(f"stale cluster file: {time.time() - started:.0f} s")
        assert proc.returncode == 0, out[-4000:]
        assert list(Path(temp, "ray").glob("session_*")), "the sweep's own Ray did not use RAY_TMPDIR"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def not_a_gcs():
    """Something that accepts TCP connections and never speaks Ray's protocol."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.integration
@pytest.mark.parametrize("how", ["flag, nothing listens", "RAY_ADDRESS, not a Ray GCS"])
def test_an_address_that_does_not_answer_fails_in_seconds(how, tmp_path, capsys, monkeypatch, not_a_gcs):
    address = f"127.0.0.1:{free_port()}" if how.startswith("flag") else not_a_gcs
    argv = [SMOKE, f"storage_path={tmp_path}"]
    if how.startswith("flag"):
        argv += ["--address", address]
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    started = time.time()
    code = main(argv)
    took = time.time() - started
    print(f"{how}: {took:.1f} s", file=sys.__stdout__)
    err = _errors(capsys)
    assert code == 2 and len(err) == 1 and address in err[0] and err[0].startswith("palp-sweep: error:"), err
    assert took < 30 and not ray.is_initialized()


@pytest.mark.integration
@pytest.mark.parametrize("override, field", [("resources.cpus_per_worker=64", "resources.cpus_per_worker"),
                                             ("resources.use_gpu=true", "resources.use_gpu")])
def test_a_trial_no_node_can_hold_fails_before_any_trial(override, field, tmp_path, capsys):
    started = time.time()
    try:
        code = main([SMOKE, f"storage_path={tmp_path}", override])
    finally:
        ray.shutdown()
    print(f"{override}: {time.time() - started:.1f} s", file=sys.__stdout__)
    err = _errors(capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"palp-sweep: error: {field}"), err
    assert not (tmp_path / "smoke").exists()  # no trial, no Tune experiment


@pytest.mark.parametrize("placement, strategy", [("pack", "PACK"), ("spread", "SPREAD"),
                                                 ("strict_spread", "STRICT_SPREAD")])
def test_the_placement_knob_reaches_ray_train(placement, strategy):
    from orchestrator.recipe_yaml import load_recipe
    from orchestrator.trial import scaling_config

    recipe = load_recipe(ROOT / "recipes/smoke.yaml", (f"resources.placement={placement}",
                                                       "resources.workers_per_trial=2"))
    config = scaling_config(recipe)
    assert (config.placement_strategy, config.num_workers) == (strategy, 2)
    with pytest.raises(RecipeError, match=r"^resources\.placement: must be one of pack, spread, strict_spread"):
        load_recipe(ROOT / "recipes/smoke.yaml", ("resources.placement=scatter",))
