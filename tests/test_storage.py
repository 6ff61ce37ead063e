"""Storage that outlives a node, without a cluster: copies to and from a storage URI, the per-node cache, what
the sweep stages there, and the refusal of a local storage_path on several nodes. (`make test-cluster` runs
the same code against S3 on 127.0.0.1 and several Ray nodes.)"""

from pathlib import Path

import pytest

from orchestrator import sweep
from orchestrator.recipe import RecipeError
from orchestrator.recipe_yaml import load_recipe
from orchestrator.tracking import TrackingError
from orchestrator.trial import trial_output_dir, trial_output_uri
from palp_trainer import storage
from palp_trainer.loops.worker import localized
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_folder_goes_to_storage_and_comes_back(tmp_path):
    (tmp_path / "out" / "samples").mkdir(parents=True)
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "out" / "samples" / "step-000001.png").write_bytes(b"png")
    uri = (tmp_path / "bucket" / "trial").as_uri()  # file://: the remote code path, on this disk
    storage.upload(tmp_path / "out", uri)
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    storage.upload(tmp_path / "out", uri)  # a later copy replaces the file, keeps the others
    assert storage.download(uri, tmp_path / "back")
    assert (tmp_path / "back" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (tmp_path / "back" / "samples" / "step-000001.png").read_bytes() == b"png"
    assert not storage.download(storage.join(uri, "nothing"), tmp_path / "none")
    assert storage.join("s3://b/x/", "trials", "p") == "s3://b/x/trials/p"


def test_a_node_fetches_a_file_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PALP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "photo.png").write_bytes(b"one")
    uri = (tmp_path / "photo.png").as_uri()
    first = storage.cached(uri)
    (tmp_path / "photo.png").write_bytes(b"two")  # storage paths are never rewritten; the cache trusts that
    assert storage.cached(uri) == first and first.read_bytes() == b"one"
    with pytest.raises(FileNotFoundError, match="not found in storage"):
        storage.cached((tmp_path / "gone.png").as_uri())


def test_workers_read_storage_photos_from_their_cache_and_adapters_keep_the_uris(tmp_path, monkeypatch,
                                                                                   subject_images):
    monkeypatch.setenv("PALP_CACHE", str(tmp_path / "cache"))
    uris = tuple(Path(f).as_uri() for f in subject_images)
    config = localized(tiny_config(uris, tmp_path / "out"))
    local = config.subjects[0].images
    assert all(Path(f).is_relative_to(tmp_path / "cache") for f in local)
    assert [Path(f).read_bytes() for f in local] == [Path(f).read_bytes() for f in subject_images]
    plain = tiny_config(subject_images, tmp_path / "out")
    assert localized(plain) == plain  # local paths stay as they are


def test_trial_outputs_go_to_node_scratch_only_with_remote_storage():
    recipe = load_recipe(ROOT / "recipes/smoke.yaml")
    assert trial_output_dir("/data/runs", recipe, "p", "t") == trial_output_uri("/data/runs", recipe, "p", "t") \
        == "/data/runs/smoke/trials/p/t"
    assert trial_output_dir("s3://b/runs", recipe, "p", "t") == "palp-sweep/smoke/trials/p/t"  # under $TMPDIR
    assert trial_output_uri("s3://b/runs", recipe, "p", "t") == "s3://b/runs/smoke/trials/p/t"


def test_subject_photos_are_staged_under_their_content(tmp_path):
    photos = tmp_path / "cat"
    photos.mkdir()
    for i, src in enumerate(sorted((ROOT / "recipes/data/cat").iterdir())):
        (photos / f"c{i}.jpg").write_bytes(src.read_bytes())
    recipe = load_recipe(ROOT / "recipes/smoke.yaml", (f"subjects[0].images={photos}",))
    staged = sweep.stage_subjects(recipe, str(tmp_path / "store"))
    images = staged.subjects[0].images
    assert len(images) == 3 and all(Path(f).is_file() and "/smoke/subjects/cat/" in f for f in images)
    assert [Path(f).read_bytes() for f in images] == [(photos / f"c{i}.jpg").read_bytes() for i in range(3)]
    (photos / "c0.jpg").write_bytes((photos / "c1.jpg").read_bytes())  # a changed photo gets a new name
    again = sweep.stage_subjects(recipe, str(tmp_path / "store")).subjects[0].images
    assert again[0] != images[0] and again[1:] == images[1:]


def test_a_local_base_folder_is_staged_once(tmp_path):
    from palp_trainer.families.tiny import main as tiny_main
    assert tiny_main([str(tmp_path / "tiny")]) == 0
    recipe = load_recipe(ROOT / "recipes/smoke.yaml", (f"base_model={tmp_path / 'tiny'}", "resolution=32",
                                                       "precision=fp32"))
    staged = sweep.stage_base(recipe, str(tmp_path / "store"))
    target = Path(staged.base_model)
    assert target.parent == tmp_path / "store" / "models" and target.name.startswith("tiny-")
    assert (target / sweep.STAGED).exists() and (target / "unet" / "config.json").is_file()
    assert sweep.stage_base(recipe, str(tmp_path / "store")).base_model == staged.base_model
    assert sweep.stage_base(load_recipe(ROOT / "recipes/smoke.yaml"), "s3://b/x").base_model == "tiny"


@pytest.fixture
def two_nodes(monkeypatch):
    monkeypatch.setattr(sweep.ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    monkeypatch.setattr(sweep, "autoscaler_node_types", lambda: {})


def test_a_local_storage_path_on_two_nodes_is_refused_unless_shared(two_nodes, tmp_path):
    recipe = load_recipe(ROOT / "recipes/smoke.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RecipeError, match=r"^storage_path: .* the Ray cluster has 2 nodes .* storage_shared: true"):
        sweep.check_nodes(recipe, str(tmp_path / "runs"), uri)
    shared = load_recipe(ROOT / "recipes/smoke.yaml", ("storage_shared=true",))
    with pytest.raises(TrackingError, match=r"^mlflow.tracking_uri: .* local store, but the Ray cluster has 2 nodes"):
        sweep.check_nodes(shared, str(tmp_path / "runs"), uri)


def test_an_autoscaler_counts_as_several_nodes(monkeypatch, tmp_path):
    monkeypatch.setattr(sweep.ray, "nodes", lambda: [{"Alive": True}])
    monkeypatch.setattr(sweep, "autoscaler_node_types", lambda: {"cpu_worker": ({"CPU": 1}, 2)})
    with pytest.raises(RecipeError, match=r"^storage_path: .* autoscaler adds nodes"):
        sweep.check_nodes(load_recipe(ROOT / "recipes/smoke.yaml"), str(tmp_path / "runs"), "sqlite:///x.db")
    monkeypatch.setattr(sweep, "autoscaler_node_types", lambda: {})
    sweep.check_nodes(load_recipe(ROOT / "recipes/smoke.yaml"), str(tmp_path / "runs"),
                      f"sqlite:///{tmp_path / 'mlflow.db'}")  # one node, no autoscaler: fine
