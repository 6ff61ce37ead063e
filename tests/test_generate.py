"""`palp-sweep generate` end to end, in-process, on an exported tiny adapter."""

import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.generate import main
from palp_trainer.export.adapter import export_adapter
from palp_trainer.export.adapter import manifest
from palp_trainer.families.base import build
from tests.conftest import tiny_config, trained_looking, write_images


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    config = tiny_config(write_images(root / "cat", 2, seed=0), root / "run")
    base, embedding = trained_looking(config)
    return export_adapter(root / "adapter", base.denoiser, embedding, manifest(config, 2))


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compares_three_methods_on_the_same_seeds(adapter, tmp_path, capsys):
    code, out, err = run([adapter, "--prompt", "A sketch of [V1]", "--seeds", "0,1", "--steps", "2",
                          "--method", "cfg,pg,alignit", "--out", tmp_path], capsys)
    assert code == 0, err
    names = ["cfg", "pg-0.6", "alignit"]
    files = {f"{m}-seed{s}.png" for m in names for s in (0, 1)}
    assert {p.name for p in tmp_path.iterdir()} == files | {"grid.png"}
    for name in files:
        assert str(tmp_path / name) in out
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    # columns = seeds, rows = methods, below a band naming the seeds and right of one naming the methods
    top, left = grid.shape[0] - 3 * 32, grid.shape[1] - 2 * 32
    assert 12 <= top <= 32 and 36 <= left <= 80, (top, left)
    rows = grid[top:, left:].reshape(3, 32, 2, 32, 3)
    assert np.array_equal(rows[1, :, 0], np.asarray(Image.open(tmp_path / "pg-0.6-seed0.png")))
    assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[0], rows[2])
    ink = grid.min(axis=2) < 128  # black text on white
    assert all(ink[top + 32 * r:top + 32 * (r + 1), :left].any() for r in range(3))  # a label per row
    assert all(ink[:top, left + 32 * c:left + 32 * (c + 1)].any() for c in range(2))  # and per column
    assert ink[:top, :left].any()  # "seed"
    assert not ink[:top, left + 30:left + 34].any()  # between the seeds: no ink, each label over its column
    labels = ["cfg", "pg-0.6", "alignit"]
    widths = [ink[top + 32 * r:top + 32 * (r + 1), :left].any(axis=0).nonzero()[0].max() for r in range(3)]
    assert widths[0] < widths[1] and widths[0] < widths[2], (labels, widths)  # "cfg" is the shortest
    # the manifest knows the references and the base is tiny: scored with the tiny CLIP, vs the clean prompt
    assert "scores vs 'A sketch of cat' (tiny" in out
    assert all(f"  {m:<7}  clip_t " in out for m in ("cfg", "pg-0.6", "alignit"))


def test_clip_i_needs_only_the_adapter_folder(tmp_path, capsys):
    photos = write_images(tmp_path / "cat", 2, seed=0)
    config = tiny_config(photos, tmp_path / "run")
    base, embedding, _ = build(config, torch.device("cpu"))
    adapter = export_adapter(tmp_path / "elsewhere" / "adapter", base.denoiser, embedding, manifest(config, 2))
    shutil.rmtree(tmp_path / "cat")  # the training machine's photos are gone; the adapter carries its references
    code, out, err = run([adapter, "--prompt", "A sketch of [V1]", "--seeds", "0", "--steps", "1",
                          "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert re.search(r"^  cfg  clip_t -?\d\.\d{4}  clip_i -?\d\.\d{4}$", out, re.M), out


def test_missing_references_skip_clip_i_and_keep_clip_t(adapter, tmp_path, capsys):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    shutil.rmtree(copy / "references")
    code, out, err = run([copy, "--prompt", "A sketch of [V1]", "--seeds", "0", "--steps", "1", "--method", "cfg,pg",
                          "--out", tmp_path / "out"], capsys)
    assert code == 0 and err == "", err
    missing = copy / "references" / "palp_cat_v1" / "0.png"
    assert f"CLIP-I skipped: 2 of the 2 reference images of [V1] are missing from the adapter ({missing})\n" in out
    assert re.search(r"^  cfg     clip_t -?\d\.\d{4}$", out, re.M) and re.search(r"^  pg-0.6  clip_t ", out, re.M)
    assert "clip_i" not in out and "Traceback" not in out


def test_defaults_write_under_generated_prompt_slug(adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run([adapter, "--prompt", "A sketch of [V1]", "--seeds", "3", "--steps", "1",
                          "--method", "pg", "--omega", "0.2,0.8", "--no-score"], capsys)
    assert code == 0, err
    folder = tmp_path / "generated" / "a-sketch-of-v1"
    assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "pg-0.2-seed3.png", "pg-0.8-seed3.png"]
    assert "scores skipped: --no-score" in out


def test_mlflow_uri_finds_the_adapter_inside_the_download(adapter, tmp_path, capsys):
    # a pyfunc model's artifacts hold the adapter one level down; any artifact URI goes through mlflow
    code, out, err = run([adapter.parent.as_uri(), "--prompt", "A sketch of [V1]", "--seeds", "0", "--steps", "1",
                          "--no-score", "--out", tmp_path], capsys)
    assert code == 0, err
    assert (tmp_path / "cfg-seed0.png").is_file()


def test_out_with_files_needs_force(adapter, tmp_path, capsys):
    argv = [adapter, "--prompt", "A sketch of [V1]", "--seeds", "0", "--steps", "1", "--no-score", "--out", tmp_path]
    assert run(argv, capsys)[0] == 0
    first = (tmp_path / "cfg-seed0.png").read_bytes()
    (tmp_path / "cfg-seed0.png").write_bytes(b"mine")
    (tmp_path / "notes.txt").write_text("keep")

    code, out, err = run(argv, capsys)
    assert code == 2 and out == "", out
    assert err.splitlines() == [f"palp-sweep: error: --out {tmp_path}: the folder is not empty; "
                                "pass --force to write over the files in it"], err
    assert (tmp_path / "cfg-seed0.png").read_bytes() == b"mine"

    code, _, err = run([*argv, "--force"], capsys)
    assert code == 0, err
    assert (tmp_path / "cfg-seed0.png").read_bytes() == first  # overwritten: the same seed, the same image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg-seed0.png", "grid.png", "notes.txt"]


@pytest.mark.parametrize("argv, expected", [
    (["--method", "cfg,foo"], "unknown method 'foo'"),
    (["--method", "pg", "--omega", "1.5"], "ω must be a number in [0, 1]"),
    (["--omega", "high"], "--omega: expected a comma list of floats"),
    (["--seeds", "0,x"], "--seeds"),
    (["--method", "pg", "--guidance-scale", "1"], "pg needs CFG"),
    (["--prompt", "A sketch of a cat"], "none of the adapter's placeholders [V1]"),
    (["--steps"], "--steps: expected one argument"),
])
def test_bad_input_is_one_line_and_exit_2(adapter, tmp_path, capsys, argv, expected):
    code, out, err = run([adapter, "--prompt", "A sketch of [V1]", "--steps", "1", "--out", tmp_path, *argv], capsys)
    assert code == 2 and err.splitlines() == [err.strip()] and err.startswith("palp-sweep: error: "), err
    assert expected in err, err
    assert not any(tmp_path.iterdir())  # failed before sampling


def test_missing_adapter_and_missing_clip_are_one_line_errors(adapter, tmp_path, capsys):
    code, _, err = run([tmp_path / "nope", "--prompt", "A sketch of [V1]"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "manifest.json is missing" in err, err
    (tmp_path / "empty-clip").mkdir()
    code, _, err = run([adapter, "--prompt", "A sketch of [V1]", "--clip-model", tmp_path / "empty-clip",
                        "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"palp-sweep: error: --clip-model {tmp_path / 'empty-clip'}: cannot load it"), err
    assert not (tmp_path / "out").exists()


def test_palp_sweep_generate_dispatches_here(tmp_path, capsys):
    from orchestrator.cli import main as cli_main
    code = cli_main(["generate", str(tmp_path), "--prompt", "A sketch of [V1]"])
    assert code == 2 and "manifest.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("n, shape", [(8, (2, 4)), (6, (2, 3)), (9, (3, 3)), (3, (1, 3)), (7, (3, 3))])
def test_sample_grid_has_no_empty_cell_when_it_can(tmp_path, n, shape):
    """palp_trainer.sampling.pipeline.save_grid, the milestone grid (`eval.num_images: 8` in the demo): 8 images are 2 x 4,
    not 3 x 3 with a black cell; only a count with no near-square factors (7) leaves cells empty."""
    from palp_trainer.sampling.pipeline import save_grid
    images = [Image.new("RGB", (8, 8), (255, 20 * i, 0)) for i in range(n)]
    grid = np.asarray(Image.open(save_grid(images, tmp_path / "grid.png")).convert("RGB"))
    rows, cols = shape
    assert grid.shape == (8 * rows, 8 * cols, 3)
    cells = grid.reshape(rows, 8, cols, 8, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, 8, 8, 3)
    assert [tuple(c[0, 0]) for c in cells[:n]] == [(255, 20 * i, 0) for i in range(n)]  # row by row
    assert not cells[n:].any()  # black only where there is no image
