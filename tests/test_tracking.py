"""Driver-side MLflow rules that need no server: preflight refusals and one child run per trial."""

import pytest
from mlflow import MlflowClient

from orchestrator.tracking import Tracking, TrackingError, preflight, resolve_tracking_uri


def test_local_store_refused_on_a_multi_node_cluster(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    preflight(uri, nodes=1)
    with pytest.raises(TrackingError, match="mlflow.tracking_uri: .* local store, but the Ray cluster has 3 nodes"):
        preflight(uri, nodes=3)


def test_default_store_is_mlflow_db_here_or_under_storage_in_a_job(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, str(tmp_path / "runs"), in_job=False) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri(None, str(tmp_path / "runs"), in_job=True) == \
        f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, "runs", in_job=False) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://h:1", "runs", in_job=False) == "http://h:1"


def test_a_retried_trial_finds_its_child_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("x")
    parent = client.create_run(experiment).info.run_id
    tracking = Tracking(uri, experiment, parent, (("base_model", "tiny"),))
    first = tracking.child_run("cat__a-sketch", "abc_00000", {"alpha": 7.5}, "palp α7.5")
    again = tracking.child_run("cat__a-sketch", "abc_00000", {"alpha": 7.5}, "palp α7.5")  # the retry
    other = tracking.child_run("cat__a-sketch", "abc_00001", {"alpha": 15}, "palp α15")
    assert first == again != other
    run = client.get_run(first)
    assert run.info.run_name == "00000 · palp α7.5 · cat/a-sketch" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params == {"alpha": "7.5", "base_model": "tiny", "pair": "cat__a-sketch"}
    assert len(client.search_runs([experiment])) == 3


def test_credentials_in_uris_are_masked_in_what_is_printed():
    from orchestrator.tracking import mask, reason

    assert mask("https://alice:s3cr3t@mlflow.example.com/api") == "https://alice:***@mlflow.example.com/api"
    assert mask("postgresql://u:p%40ss@db:5432/mlflow") == "postgresql://u:***@db:5432/mlflow"
    assert mask("http://127.0.0.1:5000") == "http://127.0.0.1:5000"  # a port is not a password
    assert mask("s3://bucket/palp") == "s3://bucket/palp"
    assert reason(RuntimeError("Traceback ...\nConnectionError: https://a:pw@h/x refused")) == \
        "ConnectionError: https://a:***@h/x refused"


def test_preflight_never_prints_the_password(tmp_path):
    with pytest.raises(TrackingError) as e:
        preflight(f"http://bob:hunter2@127.0.0.1:{_free_port()}", nodes=1)
    assert "hunter2" not in str(e.value) and "bob:***@" in str(e.value)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
