"""MLflow on the driver side: preflight, experiment / parent run / child runs, registry and champion alias.

Workers never create runs: a trial's child run is created (or found again, on retry and `--resume`)
here, and rank 0 of its Ray Train workers only appends metrics and artifacts to that run id.
"""

import fcntl
import getpass
import hashlib
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from palp_trainer.evaluation.scorers import metric_names

from .labels import run_name
from .recipe import Recipe, RecipeError

TRIAL_TAG = "palp.trial_id"
SWEEP_TAG = "palp.sweep"
ERROR_TAG = "palp.error"
STOPPED_TAG = "palp.stopped_early_at"
CHAMPION = "champion"
# the experiment's shared runs view (MLflow's "share view" state, an experiment tag): the trials flat, sorted by
# the sweep's metric, with the scores and the searched knobs as columns; the browse line opens it
VIEW = "palp-sweep"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW}"
UI_PORT = 5000  # `mlflow ui`'s default


class TrackingError(RecipeError):
    """An unusable tracking URI; exits 2 before any trial starts."""


def in_job_working_dir() -> bool:
    """True under `ray job submit --working-dir`: the CWD is a temporary copy Ray deletes."""
    return "runtime_resources" in os.getcwd()


def job_storage(storage_path: str) -> Path:
    """Where a `ray job submit` sweep keeps a relative storage_path: under the home directory, since the job's
    working directory is deleted with the job."""
    return Path.home() / "palp-sweep" / storage_path


def default_store(root: Path) -> str:
    """A sweep's store when neither the recipe nor $MLFLOW_TRACKING_URI names one: sqlite `mlflow.db` in `root`."""
    return f"sqlite:///{root / 'mlflow.db'}"


def default_stores() -> tuple[str, str]:
    """Where `palp-sweep models` looks when given no URI, the store a sweep started from here would use first:
    `mlflow.db` here, and that of a `ray job submit` sweep with the default storage_path (~/palp-sweep/runs)."""
    here, job = default_store(Path.cwd()), default_store(job_storage(Recipe.storage_path))
    return (job, here) if in_job_working_dir() else (here, job)


def resolve_tracking_uri(configured: str | None, storage: str, in_job: bool) -> str:
    """The recipe's URI, else $MLFLOW_TRACKING_URI, else MLflow's own default: sqlite `mlflow.db`
    in the working directory (under `ray job submit`, in the storage path, which outlives the job)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(storage) if in_job else Path.cwd()
    root.mkdir(parents=True, exist_ok=True)
    return default_store(root)


def mask(uri: str) -> str:
    """`https://user:secret@host/...` -> `https://user:***@host/...`: URIs get printed and logged, passwords not."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", uri)


def reason(error: BaseException) -> str:
    """The exception line a person needs: the last line of a (worker) traceback, ANSI colours stripped."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    return mask(next((line for line in reversed(lines) if line), type(error).__name__))


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def preflight(uri: str, nodes: int = 1, autoscaling: bool = False) -> None:
    """Fail fast, with one line, on a tracking URI the trials could not write to (from other nodes, when the
    Ray cluster has `nodes` or its autoscaler adds some)."""
    if (nodes > 1 or autoscaling) and is_local_store(uri):
        many = f"the Ray cluster has {nodes} nodes" if nodes > 1 else "the Ray cluster's autoscaler adds nodes"
        raise TrackingError(f"mlflow.tracking_uri: {mask(uri)} is a local store, but {many} "
                            "whose workers cannot write to it; run `mlflow server` and set mlflow.tracking_uri "
                            "(or MLFLOW_TRACKING_URI) to its http:// address")
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"mlflow.tracking_uri: cannot reach {mask(uri)}: {getattr(e, 'reason', e)}") from None
    try:
        with _creation_lock(uri):
            MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        raise TrackingError(f"mlflow.tracking_uri: {mask(uri)} is not usable: {mask(str(e).splitlines()[0])}") from None


@contextmanager
def _creation_lock(uri: str):
    """Two sweeps started at once in one folder both create its sqlite store, and MLflow's schema
    migrations then race ("duplicate column name: step"): the first to lock the folder creates it."""
    parent = Path(uri.removeprefix("sqlite:///")).parent
    if not uri.startswith("sqlite:///") or not parent.is_dir():  # no folder: MLflow's own error says so
        yield
        return
    folder = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # released with the descriptor
        yield
    finally:
        os.close(folder)


def versions() -> dict:
    out = {}
    for dist in ("palp-sweep", "torch", "diffusers", "peft", "transformers", "ray", "mlflow"):
        try:
            out[f"version.{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[f"version.{dist}"] = "none"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    out["git_sha"] = sha or "unknown"
    return out


def recipe_hash(recipe_path: str | None, overrides: tuple[str, ...] = ()) -> str:
    text = Path(recipe_path).read_bytes() if recipe_path else b""
    return hashlib.sha256(text + "\n".join(overrides).encode()).hexdigest()[:12]


def eval_hash(recipe) -> str:
    """What makes two sweeps' scores comparable: base model, resolution, the evaluation protocol and scorer."""
    from dataclasses import asdict
    key = {"base_model": recipe.base_model, "resolution": recipe.resolution, "eval": asdict(recipe.eval)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Tracking:
    """What a trial needs to find its child run: picklable, no client objects."""

    uri: str
    experiment_id: str
    parent_run_id: str
    common_params: tuple[tuple[str, str], ...]
    source_tags: tuple[tuple[str, str], ...] = ()  # MLflow's user / source / git tags, on every run

    def find_run(self, trial_id: str) -> str | None:
        """The child run of a trial, by its trial-id tag."""
        found = MlflowClient(self.uri).search_runs([self.experiment_id],
                                                   filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'")
        return found[0].info.run_id if found else None

    def child_run(self, pair: str, trial_id: str, hparams: dict, label: str) -> str:
        """The trial's nested run, named `<short id> · <label> · <pair>` (labels.run_name; `label`: its arm and
        searched values); found again, never duplicated, on retry/resume."""
        found = self.find_run(trial_id)
        if found:
            return found
        client = MlflowClient(self.uri)
        run = client.create_run(self.experiment_id, run_name=run_name(pair, trial_id, label), tags={
            **dict(self.source_tags), "mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: trial_id,
            "palp.pair": pair})
        params = {**dict(self.common_params), **{k: str(v) for k, v in hparams.items()}, "pair": pair}
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        return run.info.run_id


def start_sweep(uri: str, recipe, recipe_path: str | None, storage: str, overrides=(), resume: bool = False) -> Tracking:
    """Experiment per recipe name; a parent run per sweep: a new one for each sweep, the latest one of this
    recipe and storage path again on `--resume`."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = recipe.mlflow.experiment or recipe.name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifacts = None
        if uri.startswith("sqlite:"):  # keep artifacts beside the store, not in a job's temp dir
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    sweep_key = mask(f"{storage}/{recipe.name}")
    common = {"base_model": recipe.base_model, "recipe_hash": recipe_hash(recipe_path, tuple(overrides)),
              "eval_hash": eval_hash(recipe), "resolution": str(recipe.resolution), "precision": recipe.precision,
              **versions()}
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_key}'",
                               order_by=["attributes.start_time DESC"], max_results=1) if resume else []
    sources = source_tags(recipe_path, common["git_sha"])
    if found:
        parent = found[0].info.run_id
        client.update_run(parent, status="RUNNING")
    else:
        parent = client.create_run(experiment_id, run_name=recipe.name,
                                   tags={**sources, SWEEP_TAG: sweep_key}).info.run_id
        for key, value in common.items():
            client.log_param(parent, key, value)
        if recipe_path:
            client.log_artifact(parent, recipe_path, "recipe")
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(runs_view(recipe)))
    return Tracking(uri, experiment_id, parent, tuple(sorted(common.items())), tuple(sorted(sources.items())))


def source_tags(recipe_path: str | None, git_sha: str) -> dict[str, str]:
    """MLflow's standard run tags (what `mlflow.start_run` sets; MlflowClient.create_run sets none): who ran
    it, from what, at which commit. The UI's Source column shows them."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    tags = {"mlflow.user": user, "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"palp-sweep {recipe_path}" if recipe_path else "palp-sweep"}
    if git_sha != "unknown":
        tags["mlflow.source.git.commit"] = git_sha
    return tags


def runs_view(recipe) -> dict:
    """The shared runs view's state (the UI's own keys): the registered model, score and searched-knob columns,
    best first."""
    scores = dict.fromkeys((*metric_names(recipe.eval), "composite", recipe.scheduler.metric))
    return {"selectedColumns": ["attributes.`Models`", *(f"metrics.`{k}`" for k in scores),
                                *(f"params.`{k}`" for k in recipe.search.dims), f"tags.`{STOPPED_TAG}`"],
            "orderByKey": f"metrics.`{recipe.scheduler.metric}`", "orderByAsc": recipe.scheduler.mode == "min"}


def browse_lines(uri: str, experiment_id: str) -> list[str]:
    """Where a person sees the sweep: the experiment's runs view (not the GenAI traces page the UI opens on by
    default), with the shared view's columns; for a local store, the `mlflow ui` command that serves it."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW}"
    if is_local_store(uri):
        return [f"mlflow ui --backend-store-uri {uri} --port {UI_PORT}",
                f"then open http://127.0.0.1:{UI_PORT}/{page}"]
    return [f"{mask(uri).rstrip('/')}/{page}"]


def end_run(client: MlflowClient, run_id: str, status: str, note: str | None = None, **tags) -> None:
    """Close a run with a true status; `note` (why it ended so) goes first in its description (above the samples
    the trial put there, RunLog.samples) and in its tags."""
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    if note:  # replaces an earlier why-it-ended note (a stop can follow a lost actor), keeps the samples
        from palp_trainer.loops.runlog import SAMPLES_NOTE
        current = client.get_run(run_id).data.tags.get("mlflow.note.content", "")
        samples = current[current.index(SAMPLES_NOTE):] if SAMPLES_NOTE in current else ""
        client.set_tag(run_id, "mlflow.note.content", note + (f"\n\n{samples}" if samples else ""))
    client.set_terminated(run_id, status)


def fail_run(client: MlflowClient, run_id: str, why: str) -> None:
    """FAILED, with the reason in the note and in the ERROR_TAG tag."""
    end_run(client, run_id, "FAILED", f"failed: {why}", **{ERROR_TAG: why})


def close_open_children(tracking: Tracking, status: str, note: str) -> int:
    """Every child run of this sweep still RUNNING ends with `status`: nothing stays RUNNING."""
    client = MlflowClient(tracking.uri)
    runs = client.search_runs([tracking.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{tracking.parent_run_id}' and attributes.status = 'RUNNING'"))
    for run in runs:
        end_run(client, run.info.run_id, status, note)
    return len(runs)
