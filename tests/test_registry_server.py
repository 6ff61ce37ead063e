"""The registry from another machine: the smoke sweep logs to an `mlflow server` whose artifacts live in S3
(moto on 127.0.0.1), its files are deleted, and `palp-sweep models list / show / pull` and `generate models:/...`
run in an empty folder with only MLFLOW_TRACKING_URI set.

Neither the sweep nor the clients get S3 credentials or an S3 endpoint: every artifact goes through the
server's proxy (`--artifacts-destination`), and only the server and this test talk to S3.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from palp_trainer.export.adapter import MANIFEST_FILE, read_manifest
from tests.cluster_env import MlflowServer, S3Server, ray_env
from tests.ray_procs import stop_session

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
PALP_SWEEP = str(Path(sys.executable).parent / "palp-sweep")
MODEL = "palp-cat-a-sketch-of-v1"  # smoke.yaml's one pair
PROMPT = "A sketch of [V1]"


def no_s3_env(uri: str | None = None) -> dict:
    """This machine's environment without S3 credentials, endpoint or config files; this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")
           and k not in ("MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(ray_env(), PYTHONPATH=str(ROOT), AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def palp_sweep(args: list[str], cwd: Path, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    """`palp-sweep ARGS` in a session of its own, stopped afterwards with all it started (the sweep's local Ray)."""
    proc = subprocess.Popen([PALP_SWEEP, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"palp-sweep {args[0]} ran over {timeout:.0f} s:\n{(out + err)[-3000:]}")
    stop_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    s3 = S3Server(tmp)
    try:
        server = MlflowServer(tmp, s3)
    except BaseException:
        s3.stop()
        raise
    try:
        sweep_dir, driver, client = tmp / "sweep", tmp / "driver", tmp / "client"
        driver.mkdir()
        # one trial (PALP, no baseline arm): the registry is under test here, not ASHA
        sweep = palp_sweep([str(ROOT / "recipes" / "smoke.yaml"), f"mlflow.tracking_uri={server.uri}",
                            f"storage_path={sweep_dir}", "search.alignment=[palp]"], driver, no_s3_env(), timeout=420)
        assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-3000:]
        shutil.rmtree(sweep_dir)  # trials, checkpoints, adapters, report: only the server has them now
        shutil.rmtree(driver)
        client.mkdir()
        yield {"s3": s3, "uri": server.uri, "server_dir": tmp / "mlflow-server", "client": client,
               "sweep_out": sweep.stdout}
    finally:
        server.stop()
        s3.stop()


def champion(registry):
    """The champion version, and where its source run's adapter lies in S3 (prefix, keys)."""
    mlflow = MlflowClient(registry["uri"])
    version = mlflow.get_model_version_by_alias(MODEL, "champion")
    experiment = mlflow.get_run(version.run_id).info.experiment_id
    prefix = f"mlartifacts/{experiment}/{version.run_id}/artifacts/adapter/"
    return version, prefix, registry["s3"].keys(prefix)


def test_sweep_without_s3_credentials_logs_its_artifacts_to_s3_through_the_server(registry):
    assert f"registered: models:/{MODEL}/1  (champion)" in registry["sweep_out"]
    version, prefix, keys = champion(registry)
    assert version.version == "1"
    names = {k.removeprefix(prefix) for k in keys}
    manifest = registry["s3"].client().get_object(Bucket=registry["s3"].bucket, Key=prefix + MANIFEST_FILE)
    lora = json.loads(manifest["Body"].read())["lora_file"]
    assert {MANIFEST_FILE, lora, "learned_embeds-V1.safetensors"} <= names
    # the registered pyfunc model's copy of the adapter is in S3 too
    model_keys = registry["s3"].keys(prefix.partition(version.run_id)[0] + "models/")
    assert any(k.endswith(f"/artifacts/adapter/{MANIFEST_FILE}") for k in model_keys), model_keys
    # and nothing of it on the server's disk: its folder holds the database alone
    assert sorted(p.name for p in registry["server_dir"].iterdir()) == ["mlflow.db"]


def test_models_list_and_show_from_an_empty_folder(registry):
    client, env = registry["client"], no_s3_env(registry["uri"])
    version, _, _ = champion(registry)
    listed = palp_sweep(["models", "list"], client, env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0] == MODEL
    assert "v1 @champion" in listed.stdout and f"run {version.run_id}" in listed.stdout
    assert "clip_t=" in listed.stdout and "composite=" in listed.stdout

    shown = palp_sweep(["models", "show", MODEL], client, env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[:2] == [MODEL, "aliases: champion -> v1"]
    assert f"v1 @champion  source run {version.run_id}" in lines
    assert f"  - target prompt: {PROMPT}" in lines and ["base_model", "tiny"] in [line.split() for line in lines]
    assert list(client.iterdir()) == []  # read-only: no mlflow.db, no mlruns


def test_pull_writes_the_adapter_the_run_logged(registry):
    client, s3 = registry["client"], registry["s3"]
    pulled = palp_sweep(["models", "pull", f"{MODEL}@champion", "adapter"], client, no_s3_env(registry["uri"]))
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == "adapter"
    _, prefix, keys = champion(registry)
    logged = {k.removeprefix(prefix): s3.client().get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in keys}
    folder = client / "adapter"
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == logged
    manifest = read_manifest(folder)
    assert (manifest["base_model"], manifest["steps"], manifest["tokens"]) == ("tiny", 8, ["[V1]"])
    assert manifest["target_prompt"] == PROMPT


def test_generate_samples_the_champion_by_its_model_uri(registry):
    client = registry["client"]
    made = palp_sweep(["generate", f"models:/{MODEL}@champion", "--prompt", PROMPT, "--seeds", "0", "--steps", "2",
                       "--no-score", "--device", "cpu", "--out", "generated"], client, no_s3_env(registry["uri"]))
    assert made.returncode == 0, made.stderr
    image = client / "generated" / "cfg-seed0.png"
    assert str(image.relative_to(client)) in made.stdout.splitlines()
    with Image.open(image) as im:
        assert im.size == (32, 32)  # the tiny base's resolution, from the pulled manifest
    assert (client / "generated" / "grid.png").is_file()
