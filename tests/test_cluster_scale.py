"""Cluster scale on one machine (make test-cluster): a head with no training capacity and two worker nodes
(`ray start`, each node with its own temp dir as its local disk), S3 on 127.0.0.1 and an MLflow server whose
artifacts go to that S3. The Ray nodes get no S3 credentials: the sweep passes the driver's to its processes.

Numbers this prints (time to the first step, recovery after a node loss, steps redone) are recorded in
benchmarks/RESULTS.md.
"""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from palp_trainer import storage
from palp_trainer.loops.solo import train_loop
from tests.cluster_env import BIN, MlflowServer, RayCluster, S3Server, ray_env
from palp_trainer.families.tiny import main as tiny_main
from tests.conftest import tiny_config

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]


class Cloud:
    def __init__(self, workdir: Path):
        self.parts = []  # started so far, stopped in reverse order (also when a later part fails to start)
        try:
            self.s3 = self._started(S3Server(workdir))
            self.mlflow = self._started(MlflowServer(workdir, self.s3))
            # like cluster.yaml's head: nothing trains there
            self.cluster = self._started(RayCluster(workdir, head_cpus=0))
            self.cluster.connect(env=self.s3.env)
            self.workers = [self.cluster.add_node(cpus=1), self.cluster.add_node(cpus=1)]
        except BaseException:
            self.stop()
            raise

    def _started(self, part):
        self.parts.append(part)
        return part

    def stop(self):
        for part in reversed(self.parts):
            part.stop()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    saved = dict(os.environ)
    cloud = None
    try:
        cloud = Cloud(tmp_path_factory.mktemp("cloud"))
        os.environ.update(cloud.s3.env)  # this process reads and writes the bucket too
        yield cloud
    finally:
        if cloud is not None:
            cloud.stop()
        os.environ.clear()
        os.environ.update(saved)


def sweep(cloud: Cloud, cwd: Path, *overrides: str, recipe: str = "recipes/smoke.yaml",
          resume: bool = False) -> subprocess.CompletedProcess:
    """`palp-sweep` as a user on the head runs it, with S3 credentials in its environment only."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ray_env(), **cloud.s3.env, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [str(BIN / "palp-sweep"), str(ROOT / recipe), f"mlflow.tracking_uri={cloud.mlflow.uri}", *overrides,
            "--address", cloud.cluster.address, *(["--resume"] if resume else [])]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def read_jsonl(uri: str) -> list[dict]:
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        return [json.loads(line) for line in f.read().decode().splitlines()]


def adapter_tensors(directory: Path) -> tuple[dict, torch.Tensor]:
    return (load_file(directory / "pytorch_lora_weights.safetensors"),
            load_file(directory / "learned_embeds-V1.safetensors")["[V1]"])


def test_ddp_across_two_nodes_equals_one_process_at_double_batch(cloud, subject_images, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.state import list_actors

    # the photos reach the workers' nodes through S3 only, the adapter comes back through S3 only
    uris = []
    for f in subject_images:
        storage.upload(f, cloud.s3.uri(f"ddp/subjects/{Path(f).name}"))
        uris.append(cloud.s3.uri(f"ddp/subjects/{Path(f).name}"))
    steps = dict(steps=3, lr=1e-2, embedding_lr=1e-1)
    train_loop(tiny_config(subject_images, tmp_path / "single", batch_size=4, **steps))
    config = tiny_config(uris, "palp-ddp-out", batch_size=2, output_uri=cloud.s3.uri("ddp/out"), **steps)
    TorchTrainer(train_loop, train_loop_config=config.to_dict(),
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1},
                                                        placement_strategy="STRICT_SPREAD"),
                 run_config=ray.train.RunConfig(name="ddp", storage_path=cloud.s3.uri("ddp/ray"))).fit()

    workers = list_actors(address=cloud.cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")])
    assert sorted(cloud.cluster.node_of(a["node_id"]) for a in workers) == cloud.workers  # one per worker node
    assert storage.download(cloud.s3.uri("ddp/out/adapter"), tmp_path / "ddp-adapter")
    (lora_1, emb_1), (lora_2, emb_2) = adapter_tensors(tmp_path / "single" / "adapter"), \
        adapter_tensors(tmp_path / "ddp-adapter")
    assert lora_1.keys() == lora_2.keys()
    assert max(lora_1[k].abs().max().item() for k in lora_1 if ".up." in k) > 1e-3  # training moved the LoRA
    # the tolerance of the one-node equivalence (tests/test_ddp.py): gloo sums in another order; a missing
    # sync or a wrong slice moves entries by ~lr = 1e-2 per step
    for k in lora_1:
        torch.testing.assert_close(lora_2[k], lora_1[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(emb_2, emb_1, rtol=1e-4, atol=1e-5)


def test_every_output_lives_in_s3_and_the_sweep_resumes_from_there(cloud, tmp_path):
    root = "sweeps/smoke"
    assert tiny_main([str(tmp_path / "base" / "tiny")]) == 0  # a base model on the driver's disk only
    run = sweep(cloud, tmp_path / "job", f"storage_path={cloud.s3.uri('sweeps')}", f"base_model={tmp_path}/base/tiny",
                "resolution=32", "precision=fp32", "resources.max_concurrent_trials=2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    keys = cloud.s3.keys(root)
    pair = "cat__a-sketch-of-v1"
    trials = sorted({k.split("/")[4] for k in keys if k.startswith(f"{root}/trials/{pair}/")})
    assert len(trials) == 2
    summary = json.loads(storage.filesystem(cloud.s3.uri(f"{root}/report/summary.json"))[0]
                         .open_input_stream(f"palp/{root}/report/summary.json").read())
    best = summary[pair]["best"]
    assert best["adapter"] == cloud.s3.uri(f"{root}/trials/{pair}/{best['trial_id']}/adapter")
    for name in ("manifest.json", "pytorch_lora_weights.safetensors", "learned_embeds-V1.safetensors"):
        assert f"{root}/trials/{pair}/{best['trial_id']}/adapter/{name}" in keys
    for trial in trials:  # both trials, the one ASHA stopped at step 4 too
        steps = [m["step"] for m in read_jsonl(cloud.s3.uri(f"{root}/trials/{pair}/{trial}/metrics.jsonl"))]
        assert steps == list(range(1, steps[-1] + 1)) and steps[-1] in (4, 8)
        assert f"{root}/trials/{pair}/{trial}/samples/step-000004.png" in keys
        assert any(k.startswith(f"{root}/train/train-{trial}/checkpoint_") and k.endswith("/state.pt") for k in keys)
    for plot in ("pareto", "curves"):
        assert summary[pair]["plots"][plot] == cloud.s3.uri(f"{root}/report/{pair}/{plot}.png")
        assert f"{root}/report/{pair}/{plot}.png" in keys
    assert any(k.startswith(f"{root}/tuner.pkl") or "experiment_state" in k for k in keys)  # Tune's own state
    photos = [k for k in keys if k.startswith(f"{root}/subjects/cat/")]
    assert len(photos) == len(list((ROOT / "recipes/data/cat").iterdir()))
    manifest = json.loads(storage.filesystem(cloud.s3.uri("x"))[0].open_input_stream(
        f"palp/{root}/trials/{pair}/{best['trial_id']}/adapter/manifest.json").read())
    refs = manifest["subjects"][0]["images"]  # the adapter carries its references: no path on a node or in S3
    assert len(refs) == len(photos)
    assert all(f"{root}/trials/{pair}/{best['trial_id']}/adapter/{r['file']}" in keys for r in refs)
    # the base went to S3 once, and each node that trained fetched it once (both trials on a node share it)
    staged = [k for k in cloud.s3.keys("sweeps/models/") if k.endswith("/.palp-staged")]
    assert len(staged) == 1 and manifest["base_model"] == cloud.s3.uri(staged[0].rsplit("/", 1)[0])
    copies = {i: list(cloud.cluster.scratch(i).glob("palp-sweep-cache/*/tiny-*/unet")) for i in cloud.workers}
    assert sum(len(c) for c in copies.values()) >= 1 and all(len(c) <= 1 for c in copies.values())
    assert not list((tmp_path / "job").iterdir())  # nothing was left on the driver's disk
    assert re.search(rf"^browse: {re.escape(cloud.mlflow.uri)}", run.stdout, re.M)

    again = sweep(cloud, tmp_path / "job2", f"storage_path={cloud.s3.uri('sweeps')}", resume=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "registered before, not again" in again.stdout
    versions = MlflowClient(cloud.mlflow.uri).search_model_versions("name = 'palp-cat-a-sketch-of-v1'")
    assert len(versions) == 1


def test_a_lost_node_costs_at_most_one_checkpoint_interval(cloud, tmp_path):
    every, steps = 10, 60
    job = tmp_path / "job"
    job.mkdir()
    env = {**os.environ, **ray_env(), **cloud.s3.env, "PYTHONUNBUFFERED": "1"}
    # its own name: the other sweeps' trial folders stay in the nodes' temp dirs
    args = [str(BIN / "palp-sweep"), str(ROOT / "recipes/smoke.yaml"), "name=lossy",
            f"mlflow.tracking_uri={cloud.mlflow.uri}", f"storage_path={cloud.s3.uri('loss')}", "search.alignment=palp", f"search.steps=[{steps}]",
            f"train.checkpoint_every={every}", "scheduler.type=fifo", "eval.methods=[cfg]", "eval.num_images=1",
            # ~0.5 s a step: the `every` steps after a checkpoint outlast its registration (the controller polls
            # every 2 s), so the kill below lands between a registered checkpoint and the next one
            "train.batch_size=16", "--address", cloud.cluster.address]
    started = time.monotonic()
    # to a file, not a pipe: unread, a pipe fills (64 KiB of Ray's log lines) and the sweep blocks writing to it
    log = tmp_path / "sweep.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=job, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        def progress() -> dict[int, int]:
            """Last step in each worker node's local metrics.jsonl."""
            found = {}
            for i in cloud.workers:
                for f in cloud.cluster.scratch(i).glob("palp-sweep/lossy/trials/*/*/metrics.jsonl"):
                    lines = f.read_text().splitlines()
                    if lines:
                        found[i] = json.loads(lines[-1])["step"]
            return found

        def registered() -> int:
            """The last step whose checkpoint Ray Train has registered (a checkpoint counts once the controller
            has it: its health check polls the workers every 2 s)."""
            found = [k for k in cloud.s3.keys("loss/lossy/train/") if k.endswith("checkpoint_manager_snapshot.json")]
            if not found:
                return 0
            text = storage.filesystem(cloud.s3.uri(found[0]))[0].open_input_stream(f"palp/{found[0]}").read()
            latest = json.loads(text).get("latest_checkpoint_result") or {}
            return latest.get("metrics", {}).get("step", 0)

        first_step_s = None
        while True:  # kill when steps past a registered checkpoint would be lost, before the next one is due
            assert proc.poll() is None, log.read_text()[-3000:]
            done = progress()
            if time.monotonic() - started > 600:
                proc.kill()
                pytest.fail(f"no training step past a registered checkpoint in 600 s: progress {done}, "
                            f"registered {registered()}\n{log.read_text()[-4000:]}")
            if done and first_step_s is None:
                first_step_s = time.monotonic() - started
            if done and 0 < (last := registered()) < max(done.values()) < last + every:
                break
            time.sleep(0.2)
        (lost, _), = progress().items()
        cloud.cluster.kill_node(lost)
        killed = time.monotonic()
        last_before = json.loads((next(cloud.cluster.scratch(lost).glob(
            "palp-sweep/lossy/trials/*/*/metrics.jsonl"))).read_text().splitlines()[-1])["step"]
        (other,) = [i for i in cloud.workers if i != lost]
        while other not in progress():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - killed < 300, "the trial did not restart on the other node"
            time.sleep(0.1)
        recovery_s = time.monotonic() - killed
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    resumed = [int(s) for s in re.findall(r"palp: resumed from the checkpoint at step (\d+)", out)]
    assert resumed and resumed[-1] % every == 0, out[-4000:]
    redone = last_before - resumed[-1]
    assert 0 <= redone <= every
    trial_dir = next(cloud.cluster.scratch(other).glob("palp-sweep/lossy/trials/*/*"))
    uri = cloud.s3.uri(f"loss/lossy/trials/{trial_dir.parent.name}/{trial_dir.name}")
    assert [m["step"] for m in read_jsonl(f"{uri}/metrics.jsonl")] == list(range(1, steps + 1))
    assert storage.exists(f"{uri}/adapter/manifest.json")
    client = MlflowClient(cloud.mlflow.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lossy").experiment_id],
                                f"tags.`palp.trial_id` = '{trial_dir.name}'")
    assert run.info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(run.info.run_id, "denoise_loss")]
    assert sorted(history) == list(range(1, steps + 1))  # the redone steps are in MLflow once
    print(f"\nnode loss: first step {first_step_s:.1f} s after `palp-sweep` started; "
          f"recovery (kill -> first step on node {other}) {recovery_s:.1f} s; resumed at step {resumed[-1]}, "
          f"{redone} step(s) redone")
