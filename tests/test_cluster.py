"""cluster.yaml (and cluster-local.yaml, its shape on one machine), checked offline with the launcher's own code.

`ray up` first runs `prepare_config` (merge with ray/autoscaler/aws/defaults.yaml, merge setup commands,
fill per-type worker limits) and `validate_config` (ray-schema.json and the cross-field checks); see
`_bootstrap_config` in ray/autoscaler/_private/commands.py. Both are pure: they read yaml and json files
that ship with Ray. What `ray up` does after them needs AWS (the EC2 instance-type lookup that fills
`resources`, then IAM role, key pair, subnets and security group), so it is not run here; boto3 is
blocked during the check to prove the two steps never reach for it.
"""

import copy
import re
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
LOCAL_YAML = ROOT / "cluster-local.yaml"
HEAD = "ray.head.default"
# (vCPUs, GPUs) per instance type, from EC2's instance-type pages: the explicit `resources` must match
# the hardware, since nothing else fills them in when the instance-type lookup is unavailable.
INSTANCE_SHAPES = {"m5.2xlarge": (8, 0), "g5.2xlarge": (8, 1), "p4d.24xlarge": (96, 8)}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture()
def prepared(raw, monkeypatch) -> dict:
    for module in ("boto3", "botocore"):  # None in sys.modules makes `import boto3` raise ImportError
        monkeypatch.setitem(sys.modules, module, None)
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_ray_accepts_the_config_offline(prepared, raw):
    assert prepared["cluster_name"] == "palp-sweep"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["auth"]["ssh_user"] == "ubuntu"
    # defaults.yaml is merged key by key at the top level: our node types must replace its m5.large ones
    assert set(prepared["available_node_types"]) == set(raw["available_node_types"]) == {HEAD, "gpu_1xa10g", "gpu_8xa100"}
    assert prepared["head_node_type"] == HEAD
    assert prepared["idle_timeout_minutes"] == raw["idle_timeout_minutes"]


def test_gpu_workers_scale_from_zero_with_explicit_gpus(prepared):
    types = prepared["available_node_types"]
    head = types[HEAD]
    assert (head["min_workers"], head["max_workers"]) == (0, 0)
    assert head["resources"] == {"CPU": 0}, "the head must not advertise CPUs or GPUs: trials would train on it"
    workers = {name: t for name, t in types.items() if name != HEAD}
    assert workers
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name}: GPU workers start at zero and are added on demand"
        assert 1 <= t["max_workers"] <= prepared["max_workers"], name
        assert t["resources"]["GPU"] >= 1, name
    gpus = {t["node_config"]["InstanceType"]: t["resources"]["GPU"] for t in workers.values()}
    assert gpus == {"g5.2xlarge": 1, "p4d.24xlarge": 8}


def test_every_node_type_declares_resources_that_match_its_hardware(raw):
    image_ids = set()
    for name, t in raw["available_node_types"].items():
        assert "resources" in t, f"{name}: set resources explicitly so sizing needs no EC2 lookup"
        cpus, gpus = INSTANCE_SHAPES[t["node_config"]["InstanceType"]]
        assert t["resources"].get("CPU") == (0 if name == HEAD else cpus), name  # the head trains nothing
        assert t["resources"].get("GPU", 0) == gpus, name
        image_ids.add(t["node_config"]["ImageId"])
    assert len(image_ids) == 1, "every node runs the same AMI (the *dlami alias), so Python/torch/CUDA match"


def test_setup_installs_this_package_on_every_node(prepared, raw):
    (remote, local), = raw["file_mounts"].items()
    assert 'name = "palp-sweep"' in (CLUSTER_YAML.parent / local / "pyproject.toml").read_text()
    install = f"pip install -e {remote}"
    # after merge_setup_commands, these are the full lists each kind of node runs
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert install in commands
    pip_lines = [c for c in raw["setup_commands"] if "pip install" in c]
    assert not any(re.search(r"\s(-U|--upgrade)\b", c) for c in pip_lines), "-U would replace the DLAMI's CUDA torch"
    assert any("boto3" in c for c in prepared["head_setup_commands"]), "the head's autoscaler needs boto3"
    # what file_mounts ships is filtered by .gitignore: the local .venv must not be copied to every node
    assert ".gitignore" in raw["rsync_filter"]
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()


def test_ray_start_commands(prepared):
    head = prepared["head_start_ray_commands"][-1]
    assert "ray start --head --port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in prepared["worker_start_ray_commands"][-1]


def test_every_top_level_key_is_explained_by_a_comment():
    lines = CLUSTER_YAML.read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        key = re.match(r"([A-Za-z_]\w*):", line)
        if not key:
            continue
        above = next((p for p in reversed(lines[:i]) if p.strip()), "")
        if " # " not in line and not line.endswith(" #") and not above.lstrip().startswith("#"):
            uncommented.append(key.group(1))
    assert not uncommented, f"cluster.yaml: add a comment to {uncommented}"


def test_the_local_cluster_has_the_same_head_and_the_autoscaler_reads_it_as_is():
    """The autoscaler reads `--autoscaling-config` as written (no prepare_config), so the file must validate raw."""
    local, aws = yaml.safe_load(LOCAL_YAML.read_text()), yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(local)
    assert local["provider"]["type"] == "fake_multinode"
    assert local["head_node_type"] == aws["head_node_type"] == HEAD
    assert local["available_node_types"][HEAD]["max_workers"] == 0
    workers = {name: t for name, t in local["available_node_types"].items() if name != HEAD}
    assert workers and all(t["min_workers"] == 0 and t["resources"]["CPU"] >= 1 for t in workers.values())
    assert "--num-cpus 0" in LOCAL_YAML.read_text(), "the head trains nothing, as cluster.yaml's"
