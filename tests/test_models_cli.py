"""`palp-sweep models show / pull` on a real sqlite store: two versions registered by `register_best` (what a sweep
calls), from a tiny exported adapter; no Ray, no sweep."""

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow import MlflowClient

from orchestrator.cli import main
from orchestrator.labels import md_plain
from orchestrator.recipe_yaml import load_recipe
from orchestrator.registry import register_best
from orchestrator.tracking import start_sweep
from tests.conftest import untrained_adapter

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"
MODEL = "palp-cat-a-sketch-of-v1"  # smoke.yaml's one pair
PAIR = "cat__a-sketch-of-v1"
ADAPTER_FILES = {"manifest.json", "pytorch_lora_weights.safetensors", "learned_embeds-V1.safetensors"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """sqlite store with MODEL v1 (composite 0.5) and v2 (0.7, so the champion), each from its own child run."""
    root = tmp_path_factory.mktemp("store")
    adapter = untrained_adapter(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    recipe = load_recipe(str(SMOKE), [f"storage_path={root / 'runs'}"])
    tracking = start_sweep(uri, recipe, str(SMOKE), str(root / "runs"))
    client = MlflowClient(uri)
    for trial, composite in (("t1", 0.5), ("t2", 0.7)):
        hparams = {"alpha": 7.5, "alignment": "palp"}
        run_id = tracking.child_run(PAIR, trial, hparams, "palp α7.5")
        client.log_artifacts(run_id, str(adapter), "adapter")
        best = {"trial_id": trial, "hparams": hparams, "alignment": "palp", "step": 2, "clip_t": 0.25, "clip_i": 0.75,
                "composite": composite, "best_method": "pg-0.6"}  # a summary row's keys (sweep.summarize)
        version = register_best(tracking, recipe, PAIR, best)["version"]
        # a dangling link beside the pyfunc's code: a pull that downloads more than the adapter folder fails on it
        model = Path(urlparse(client.get_model_version_download_uri(MODEL, version)).path)
        assert (model / "MLmodel").is_file() and (model / "code").is_dir()
        (model / "code" / "gone.py").symlink_to(root / "nowhere")
    return {"uri": uri, "root": root, "adapter": Path(adapter)}


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_show_is_readable(store, capsys):
    code, out, err = run_main(["models", "--tracking-uri", store["uri"], "show", MODEL], capsys)
    assert code == 0 and err == "", err
    lines = out.splitlines()
    assert lines[:2] == [MODEL, "aliases: champion -> v2"]
    assert "{" not in out  # no Python dict
    v1 = next(i for i, line in enumerate(lines) if line.startswith("v1  source run "))
    v2 = next(i for i, line in enumerate(lines) if line.startswith("v2 @champion  source run "))
    assert v1 < v2
    version = [line.strip() for line in lines[v2 + 1:]]
    # scores first, then the key tags in their order, then the description, then the other tags
    assert version[0].split() == ["scores", "clip_i=0.7500", "clip_t=0.2500", "composite=0.7000"]
    keys = [line.split()[0] for line in version[1:8]]
    assert keys == ["best_method", "alignment", "alpha", "beta", "rank", "steps", "base_model"]
    assert version[1].split() == ["best_method", "pg-0.6"] and version[2].split() == ["alignment", "palp"]
    assert version[7].split() == ["base_model", "tiny"]
    held = MlflowClient(store["uri"]).get_model_version(MODEL, "2").description
    expected = [line.strip() for line in md_plain(held).strip().splitlines()]  # the registry's markdown, as text
    description = version[9:9 + len(expected)]
    assert description == expected and version[9 + len(expected)] == ""
    assert "- target prompt: A sketch of [V1]" in description and "\\[V1\\]" in held
    assert not any("**" in line or "](" in line for line in description)
    rest = version[9 + len(expected) + 1:]
    assert ["recipe", "smoke"] in [line.split() for line in rest]
    assert not any(line.startswith(("metric.", "alignment ", "source_run")) for line in rest)
    # the store named after the command, as people type it, reads the same
    assert run_main(["models", "show", MODEL, "--tracking-uri", store["uri"]], capsys)[1] == out


def test_pull_writes_only_the_adapter_folder(store, tmp_path, capsys):
    target = tmp_path / "adapter"
    code, out, err = run_main(["models", "--tracking-uri", store["uri"], "pull", MODEL, target], capsys)
    assert code == 0, err
    assert out.strip() == str(target)
    # the adapter folder the run logged, and nothing else of the pyfunc model (MLmodel, python_env.yaml, code/)
    pulled = {p.relative_to(target).as_posix() for p in target.rglob("*")}
    assert pulled == {p.relative_to(store["adapter"]).as_posix() for p in store["adapter"].rglob("*")}
    assert ADAPTER_FILES <= pulled and not {"MLmodel", "python_env.yaml", "requirements.txt", "code"} & pulled
    from palp_trainer.export.adapter import read_manifest
    assert read_manifest(target)["tokens"] == ["[V1]"]


@pytest.mark.parametrize("ref", [f"{MODEL}@champion", f"{MODEL}/1"])
def test_pull_by_alias_or_version_from_the_environment(store, tmp_path, capsys, monkeypatch, ref):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])  # what a submitted job's store is found by
    code, _, err = run_main(["models", "pull", ref, tmp_path / "a"], capsys)
    assert code == 0, err
    assert ADAPTER_FILES <= {p.name for p in (tmp_path / "a").iterdir()}


def test_pull_refuses_a_non_empty_folder_without_force(store, tmp_path, capsys):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "manifest.json").write_text("mine")
    (target / "notes.txt").write_text("keep")
    code, _, err = run_main(["models", "--tracking-uri", store["uri"], "pull", MODEL, target], capsys)
    assert code == 2 and err.splitlines() == [f"palp-sweep: error: pull {target}: the folder is not empty; "
                                              "pass --force to write over the files in it"], err
    assert (target / "manifest.json").read_text() == "mine"

    code, _, err = run_main(["models", "--tracking-uri", store["uri"], "pull", MODEL, target, "--force"], capsys)
    assert code == 0, err
    assert ADAPTER_FILES | {"notes.txt"} <= {p.name for p in target.iterdir()}  # same names overwritten, rest kept
    assert (target / "manifest.json").read_text() != "mine" and (target / "notes.txt").read_text() == "keep"


def test_pull_an_unknown_version_is_one_line(store, tmp_path, capsys):
    code, _, err = run_main(["models", "--tracking-uri", store["uri"], "pull", f"{MODEL}/9", tmp_path / "a"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("palp-sweep: error: "), err
    assert not (tmp_path / "a").exists()


def test_list_and_show_import_no_torch_and_print_no_warnings(store):
    """What a person runs: a fresh process; MLflow is needed, torch / diffusers / transformers / Ray are not."""
    code = ("import sys; from orchestrator.cli import main; code = main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'ray', 'diffusers', 'transformers') if m in sys.modules)); "
            "raise SystemExit(code)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store["uri"]}
    for argv in (["models", "list"], ["models", "show", MODEL]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=store["root"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "[]", proc.stdout
        assert proc.stderr == "", proc.stderr


def test_finds_the_store_a_submitted_job_wrote(store, tmp_path, capsys, monkeypatch):
    """No flag, no variable: ./mlflow.db, else ~/palp-sweep/runs/mlflow.db (what a `ray job submit` sweep with the
    default storage_path writes, tracking.default_stores); the store read is named on stderr unless it is ./mlflow.db
    alone."""
    from orchestrator.tracking import default_stores, job_storage
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    job_storage("runs").parent.mkdir(parents=True)
    job_storage("runs").symlink_to(store["root"])  # the job's storage, holding its mlflow.db
    job, here = f"sqlite:///{job_storage('runs') / 'mlflow.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert default_stores() == (here, job)

    code, out, err = run_main(["models", "list"], capsys)
    assert code == 0 and out.splitlines()[0] == MODEL and "v2 @champion" in out
    assert err.splitlines() == [f"palp-sweep: reading {job}"]

    MlflowClient(here).search_experiments()  # a sweep run here: the one `models` run here reads first
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it, in this process
    capsys.readouterr()  # MLflow's lines on creating it
    code, out, err = run_main(["models", "list"], capsys)
    assert code == 0 and out == "no registered models\n"
    assert err.splitlines() == [f"palp-sweep: reading {here}; also found {job} (--tracking-uri to read it)"]
