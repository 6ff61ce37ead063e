"""Which Ray cluster a sweep runs on, and whether its trials can ever be scheduled there.

Ray's address auto-detection made sweeps hang forever, in two ways:

- `ray.init(address=None)` joins the cluster that `ray_current_cluster` in Ray's temp dir names (written
  by any `ray start`, left behind by a killed head), and waits on a dead GCS for many minutes per try.
  A standalone sweep therefore starts its own Ray (`address="local"`) unless `--address` or `RAY_ADDRESS`
  (set by `ray job submit`) names one, and a named address is probed first, so it fails in seconds.
- Inside the cluster, Ray Train's PlacementGroupCleaner (ray/train/v2/_internal/execution/controller/
  placement_group_cleaner.py) asks the state API `get_actor` with no address, which auto-detects too
  (ray/dashboard/utils.py: get_address_for_submission_client -> canonicalize_bootstrap_address_or_die):
  with a second Ray instance on the host it raises "Found multiple active Ray instances", a
  ConnectionError the monitor thread does not catch, so the placement group of a trial Tune stops (ASHA,
  or the last milestone: Tune kills the trial actor and its Train controller with it) is never removed and
  every later trial's worker group waits for those CPUs, retrying WorkerGroupStartupTimeoutError every
  60 s without end; with `ray_current_cluster` naming another live cluster it finds no such controller
  there and removes the placement group of a running trial. That code reads RAY_ADDRESS first, so every
  process of our cluster gets RAY_ADDRESS = the cluster's own GCS address through the job's runtime_env.
"""

import json
import math
import os
import socket
from pathlib import Path

import ray
import yaml
from ray._private import ray_constants
from ray.experimental import internal_kv

from .recipe import Recipe, RecipeError, Resources

PROBE_TIMEOUT_S = 5.0  # TCP connect; then the GCS handshake, ~12 s at most when something else listens
# The Tune trial actor (and the Train controller Ray puts next to it) only waits on its worker group: it takes
# no CPU and lives on the head, where the driver is, so losing a worker node loses workers only (Ray Train
# restarts them from the last checkpoint), never a trial's coordinator
TRIAL_ACTOR = {"CPU": 0, "node:__internal_head__": 0.001}
# `ray up` writes the cluster launcher's config here on the head, and its autoscaler reads it
# (`ray start --autoscaling-config=~/ray_bootstrap_config.yaml`); Tune checks the same file
# (ray/tune/execution/cluster_info.py). The driver runs on the head under `ray job submit`.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def resolve_address(flag: str | None) -> str:
    """`--address`, else RAY_ADDRESS (`ray job submit` sets it), else "local": a Ray of our own."""
    return flag or os.environ.get("RAY_ADDRESS") or "local"


def connect(address: str, env_vars: dict[str, str]) -> None:
    """Start ("local") or join (host:port, "auto") a cluster.

    Every process of the cluster started for this job gets RAY_ADDRESS = its GCS address (and `env_vars`).
    Raises RecipeError, one line naming the address, when nothing usable answers there.
    """
    if ray.is_initialized():  # a second sweep in one process (tests, --resume after a run)
        return
    if address == "local":
        port = _free_port()
        # the only way to know a local head's GCS address before ray.init, which fixes the runtime_env
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            gcs = f"127.0.0.1:{port}"
            ray.init(address="local", log_to_driver=True, runtime_env=_runtime_env(gcs, env_vars))
        finally:
            del os.environ["RAY_GCS_SERVER_PORT"]
        return
    gcs = _gcs_address(address)
    _probe(gcs, address)
    ray.init(address=gcs, log_to_driver=True, runtime_env=_runtime_env(gcs, env_vars))
    os.environ["RAY_ADDRESS"] = gcs  # this driver's own later Ray calls mean this cluster too


def check_feasible(recipe: Recipe) -> None:
    """Fail now if no node, now or added by the autoscaler, can ever hold one trial; say so if it waits.

    Checked against the nodes' total resources, not what is free: a busy cluster frees them later.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    types = autoscaler_node_types()
    message = feasibility(recipe.resources, nodes, types)
    if message:
        print(f"palp-sweep: {message}", flush=True)


def feasibility(r: Resources, nodes: list[dict], node_types: dict[str, tuple[dict, int]]) -> str | None:
    """None if a trial fits the nodes; a "waiting for resources" line if it needs the autoscaler to add
    nodes of `node_types` ({name: (resources, max_workers)}); RecipeError naming the field if neither.

    Each worker's bundle must fit on one node; with placement pack or spread (soft) the workers may share
    or spread over nodes, with strict_spread each needs a node of its own.
    """
    bundle = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    need = _describe(r.workers_per_trial, bundle, r.placement)
    strict = r.placement == "strict_spread"
    if _fits(nodes, bundle, r.workers_per_trial, strict):
        return None
    # each type at most workers_per_trial times: more nodes than workers cannot help one trial
    grown = nodes + [res for res, most in node_types.values() for _ in range(min(most, r.workers_per_trial))]
    if _fits(grown, bundle, r.workers_per_trial, strict):
        adds = ", ".join(name for name, (res, _) in node_types.items() if _bundles(res, bundle) > 0)
        return f"waiting for resources: {need}; no node has them yet, the autoscaler can add {adds or 'nodes'}"
    biggest = {k: max((n.get(k, 0) for n in grown), default=0) for k in ("CPU", "GPU")}
    if r.use_gpu and biggest["GPU"] == 0:
        field, reason = "resources.use_gpu", "no node has a GPU"
    elif r.use_gpu and r.gpus_per_worker > biggest["GPU"]:
        field, reason = "resources.gpus_per_worker", f"no node has {r.gpus_per_worker:g} GPU"
    elif not _fits(grown, bundle, 1):
        field, reason = "resources.cpus_per_worker", "no node holds one worker"
    elif strict and _fits(grown, bundle, r.workers_per_trial):
        field, reason = "resources.placement", "strict_spread needs a node per worker and there are fewer"
    else:
        field, reason = "resources.workers_per_trial", "all nodes together hold fewer workers"
    total = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    scaler = "with every node type its autoscaler can add" if node_types else "no autoscaler"
    raise RecipeError(f"{field}: one trial needs {need}, but {reason} (largest node {biggest['CPU']:g} CPU, "
                      f"{biggest['GPU']:g} GPU; cluster {total['CPU']:g} CPU, {total['GPU']:g} GPU; {scaler})")


def autoscaler_node_types() -> dict[str, tuple[dict, int]]:
    """{node type: (resources, max_workers)} the autoscaler may add, from the cluster launcher's config on
    this node, else from the file the cluster's autoscaler reads (`ray start --head --autoscaling-config FILE`,
    e.g. cluster-local.yaml); {} without either (a fixed cluster, or a driver not on the head: trials must fit
    the nodes)."""
    path = BOOTSTRAP_CONFIG.expanduser()
    if not path.is_file():
        path = _autoscaler_config()
    if path is None:
        return {}
    config = yaml.safe_load(path.read_text())
    return {name: (t.get("resources", {}), t.get("max_workers", config.get("max_workers", 0)))
            for name, t in config.get("available_node_types", {}).items()
            if t.get("max_workers", config.get("max_workers", 0)) > 0}


def _autoscaler_config() -> Path | None:
    """The config file of this cluster's autoscaler, read off its process: the autoscaler's status in the GCS
    names its pid (ray/autoscaler/_private/monitor.py), and it runs on the head, where `ray job submit` runs us.
    Ray 2.60's autoscaler publishes its node types nowhere else (get_cluster_config() stays empty)."""
    import psutil  # Ray's own copy (ray/thirdparty_files) when not installed

    status = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    try:
        monitor = psutil.Process(json.loads(status)["monitor_pid"])
        args, cwd = monitor.cmdline(), monitor.cwd()
    except (TypeError, KeyError, psutil.Error):  # no autoscaler, or not on this machine
        return None
    given = [a.removeprefix("--autoscaling-config=") for a in args if a.startswith("--autoscaling-config=")]
    return Path(cwd, os.path.expanduser(given[0])) if given else None


def _fits(nodes: list[dict], bundle: dict, workers: int, strict: bool = False) -> bool:
    """All nodes together take `workers` bundles (strict: on as many different nodes)."""
    return sum(min(_bundles(n, bundle), 1 if strict else workers) for n in nodes) >= workers


def _bundles(node: dict, bundle: dict) -> int:
    """How many worker bundles one node holds (1e-9: 0.3 + 0.3 + 0.4 GPU must fit 1 GPU)."""
    return min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0)


def _describe(workers: int, bundle: dict, placement: str) -> str:
    per = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    return f"{workers} worker(s) x ({per})" + (", each on its own node" if placement == "strict_spread" else "")


def _runtime_env(gcs: str, env_vars: dict[str, str]) -> dict:
    # under `ray job submit --runtime-env-json`, what the job's env_vars set reaches every process already, and
    # ray.init refuses to set a variable again ("Failed to merge the Job's runtime env ... because of a conflict")
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    env_vars = {k: v for k, v in env_vars.items() if k not in (job.get("env_vars") or {})}
    # RAY_API_SERVER_ADDRESS, if inherited, would win over RAY_ADDRESS in the state API: clear it
    return {"env_vars": {**env_vars, "RAY_ADDRESS": gcs, "RAY_API_SERVER_ADDRESS": ""}}


def _gcs_address(address: str) -> str:
    """host:port of the GCS. "auto" follows Ray's own rule (ray_current_cluster, then a lone local GCS)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die
        try:
            return canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as e:
            raise RecipeError(f"--address auto: {e}") from None
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        raise RecipeError(f"--address / RAY_ADDRESS: expected host:port (the GCS address `ray start --head` "
                          f"prints), auto or local, got {address!r}; for a cluster's dashboard "
                          f"(http://...) use `ray job submit --address ... -- palp-sweep ...`")
    return address


def _probe(gcs: str, given: str) -> None:
    """Fail in seconds where ray.init would wait for minutes: nothing listens, or no Ray GCS answers."""
    from ray._raylet import InnerGcsClient

    host, _, port = gcs.rpartition(":")
    where = f"--address / RAY_ADDRESS {given}" + (f" ({gcs})" if gcs != given else "")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise RecipeError(f"{where}: no Ray cluster answers there ({e.strerror or e}); "
                          f"start one with `ray start --head`, or drop --address to run on a local Ray") from None
    try:
        InnerGcsClient.standalone(gcs, None, int(PROBE_TIMEOUT_S * 1000 / 2))
    except Exception as e:
        if "Authentication" in type(e).__name__:  # ray.init never turns token auth on for an explicit address
            raise RecipeError(f"{where}: the cluster uses token authentication: export RAY_AUTH_MODE=token "
                              f"(its token in ~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
        raise RecipeError(f"{where}: something listens there but no Ray GCS answers "
                          f"({' '.join(str(e).split())[:200]})") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
