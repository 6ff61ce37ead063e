"""Bad recipes and command lines: exit 2 with one `palp-sweep: error: <field>: <problem>` line, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from tests.conftest import write_images

ROOT = Path(__file__).resolve().parent.parent


def good_recipe(tmp_path) -> dict:
    write_images(tmp_path / "cat", 2, seed=0)
    write_images(tmp_path / "mug", 1, seed=1)
    return {"name": "bad", "base_model": "tiny",
            "subjects": [{"name": "cat", "token": "[V1]", "class_word": "cat", "images": "cat"},
                         {"name": "mug", "token": "[V2]", "class_word": "mug", "images": ["mug/0.png"]}],
            "prompts": [{"target": "A sketch of [V1]"}, {"target": "A photo of [V2] on a rock"}],
            "search": {"steps": [4, 8]}}


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_dry_run_error(raw: dict, tmp_path, capsys, *expected):
    """Write `raw` as a recipe; `--dry-run` on it must fail with one line holding `expected`."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(*run_main([str(path), "--dry-run"], capsys)[::2], *expected)


def assert_one_line_error(code, err, *expected):
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("palp-sweep: error: "), err
    for text in expected:
        assert text in lines[0], lines[0]


def _set(raw: dict, dotted: str, value) -> dict:
    node, *keys = raw, *dotted.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value
    return raw


CASES = [
    # (dotted key in the good recipe, value, expected text in the error)
    ("train.lerning_rate", 1e-4, "train.lerning_rate: unknown key; did you mean 'lr'?"),
    ("trian", {}, "trian: unknown key; did you mean 'train'?"),
    ("subjects.0.clas_word", "cat", "subjects[0].clas_word: unknown key; did you mean 'class_word'?"),
    ("train.rank", "abc", "train.rank: expected int, got str 'abc'"),
    ("train.rank", True, "train.rank: expected int, got bool True"),
    ("train.rank", 2.5, "train.rank: expected int, got float 2.5"),
    ("train.rank", 0, "train.rank: must be >= 1"),
    ("train.align_every", 0, "train.align_every: must be >= 1"),
    ("train.lr", -1, "train.lr: must be > 0"),
    ("train.alpha", 0, "train.alpha: must be > 0"),
    ("train.t_range", [500, 100], "train.t_range: need 0 <= lo < hi <= 1000"),
    ("train.t_range", [0, 1001], "train.t_range: need 0 <= lo < hi <= 1000"),
    ("train.t_range", [0], "train.t_range: expected a list of 2"),
    ("train.alignment", "dds", "train.alignment: must be one of palp, sds, nfsd, none"),
    ("search.num_samples", 0, "search.num_samples: must be >= 1"),
    ("search.steps", [0, 4], "search.steps: must be positive"),
    ("search.steps", [8, 4], "search.steps: must be increasing"),
    ("search.steps", ["x"], "search.steps[0]: expected int, got str 'x'"),
    ("search.rank", {"uniform": [4, 8]}, "search.rank.uniform: rank is int, not a float"),
    ("search.lr", {"loguniform": [0, 1e-4]}, "search.lr.loguniform[0]: must be > 0"),
    ("search.align_weight", {"loguniform": [0, 1]}, "search.align_weight.loguniform: needs lo > 0"),
    ("search.align_weight", {"uniform": [2, 1]}, "search.align_weight.uniform: needs [lo, hi] with lo < hi"),
    ("search.alpha", [], "search.alpha.grid: needs at least one value"),
    ("search.alpha", {"unifrom": [1, 2]}, "search.alpha.unifrom: unknown key; did you mean 'uniform'?"),
    ("search.alpha", [7.5, -1], "search.alpha[1]: must be > 0"),
    ("search.batch_size", [1, 2], "search.batch_size: unknown key"),
    ("scheduler.mode", "maximize", "scheduler.mode: must be 'max' or 'min'"),
    ("scheduler.grace_period", 3, "scheduler.grace_period: 3 milestones, but search.steps has only 2"),
    ("eval.num_images", 0, "eval.num_images: must be >= 1"),
    ("eval.cuda_graphs", True, "eval.cuda_graphs: needs GPU workers"),
    ("eval.sampler", "euler", "eval.sampler: must be one of"),
    ("eval.scorer", "dino", "eval.scorer: must be one of"),
    ("eval.elements", ["a"], "eval.elements: set per prompt"),
    ("resources.gpus_per_worker", 1, "resources.gpus_per_worker: set resources.use_gpu: true"),
    ("resources.workers_per_trial", 0, "resources.workers_per_trial: must be >= 1"),
    ("mlflow.registered_model_template", "palp-{subject}", "mlflow.registered_model_template: bad field"),
    ("precision", "fp8", "precision: must be one of fp32, bf16, fp16"),
    ("resolution", 30, "resolution: must be a positive multiple of 8"),
    ("name", "my sweep", "name: use letters"),
    ("prompts.0.target", "A sketch of [V3]", "prompts[0].target: placeholder [V3] is defined by no subject"),
    ("prompts.0.target", "A sketch of a cat", "prompts[0].target: contains no placeholder"),
    ("prompts.0", {"target": "A sketch of [V1]", "clean": "A sketch of [V1]"},
     "prompts[0].clean: still contains placeholder [V1]"),
    ("subjects.1.token", "[V1]", "subjects[1].token: '[V1]' is also subjects[0].token"),
    ("subjects.1.name", "cat", "subjects[1].name: 'cat' is also subjects[0].name"),
    ("subjects.0.token", "[V 1]", "subjects[0].token: must look like [V1]"),
    ("subjects.0.token", "V1", "subjects[0].token: must look like [V1]"),
    ("subjects.0.prompt", "A photo of a cat", "subjects[0].prompt: must contain the subject's token [V1]"),
    ("subjects.0.images", "dgo", "subjects[0].images: no such file or directory:"),
    ("subjects.1.images", ["mug/0.png", "mug/9.png"], "subjects[1].images[1]: no such file or directory:"),
    ("subjects.0.images", 3, "subjects[0].images: expected a folder or a list of image files"),
    ("subjects", {"cat": 1}, "subjects: expected a list"),
    ("subjects.0.class_word", None, "subjects[0].class_word: expected str, got NoneType None"),
    ("prompts", ["A sketch of [V1]"], "subjects[1].token: [V2] appears in no prompt target"),
    ("prompts.1.name", "a sketch of [v1]", "prompts[1]: its slug 'a-sketch-of-v1' is also prompts[0]'s"),
]


@pytest.mark.parametrize("key, value, expected", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_bad_field(tmp_path, capsys, key, value, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_set(good_recipe(tmp_path), key, value)))
    assert_one_line_error(*run_main([str(path), "--dry-run"], capsys)[::2], expected)


def test_good_recipe_passes(tmp_path, capsys):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(good_recipe(tmp_path)))
    code, out, err = run_main([str(path), "--dry-run"], capsys)
    assert code == 0 and err == ""


@pytest.mark.parametrize("missing", ["name", "subjects", "prompts"])
def test_required(tmp_path, capsys, missing):
    raw = good_recipe(tmp_path)
    del raw[missing]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(*run_main([str(path), "--dry-run"], capsys)[::2], f"{missing}: required")


def test_subject_images_required(tmp_path, capsys):
    raw = good_recipe(tmp_path)
    del raw["subjects"][0]["images"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(*run_main([str(path), "--dry-run"], capsys)[::2], "subjects[0].images: required")


def test_empty_image_dir(tmp_path, capsys):
    raw = good_recipe(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    raw["subjects"][0]["images"] = "empty"
    assert_dry_run_error(raw, tmp_path, capsys, "subjects[0].images: no jpg/jpeg/png/webp images in", "empty")


def test_corrupt_image(tmp_path, capsys):
    raw = good_recipe(tmp_path)
    (tmp_path / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    assert_dry_run_error(raw, tmp_path, capsys, "subjects[0].images: unreadable image", "1.png")


def test_not_an_image_file(tmp_path, capsys):
    raw = good_recipe(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    raw["subjects"][1]["images"] = ["mug/0.png", "notes.txt"]
    assert_dry_run_error(raw, tmp_path, capsys, "subjects[1].images[1]:", "notes.txt is not a jpg/jpeg/png/webp file")


def test_image_smaller_than_resolution(tmp_path, capsys):
    raw = {**good_recipe(tmp_path), "resolution": 64}  # the test images are 40x48
    assert_dry_run_error(raw, tmp_path, capsys, "subjects[0].images:", "smaller than resolution 64",
                         "train.allow_upscale")
    code, _, _ = run_main([str(tmp_path / "bad.yaml"), "--dry-run", "train.allow_upscale=true"], capsys)
    assert code == 0


@pytest.mark.parametrize("text, expected", [
    ("name: x\nsubjects: [unclosed\n  - a: b\n", ("not valid YAML:", "line")),
    ("- just\n- a list\n", ("expected a mapping", "got a list")),
    ("# nothing\n", ("expected a mapping", "empty file")),
])
def test_not_a_yaml_mapping(tmp_path, capsys, text, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert_one_line_error(*run_main([str(path)], capsys)[::2], f"{path}: {expected[0]}", expected[1])


def test_missing_recipe_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    assert_one_line_error(*run_main([str(path)], capsys)[::2], f"{path}: no such recipe file")


@pytest.mark.parametrize("override, expected", [
    ("train.lerning_rate=1e-4", "train.lerning_rate: unknown key; did you mean 'lr'?"),
    ("train.rank=abc", "train.rank: expected int, got str 'abc'"),
    ("search.alpha=[7.5,", "search.alpha: override value is not valid YAML"),
    ("train.rank", "override 'train.rank': expected key=value"),
    ("subjects[7].class_word=dog", "subjects[7]: index out of range; subjects has 2 entries"),
    ("name.first=x", "name: is not a mapping"),
])
def test_bad_override(tmp_path, capsys, override, expected):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(good_recipe(tmp_path)))
    assert_one_line_error(*run_main([str(path), override, "--dry-run"], capsys)[::2], expected)


def test_dry_run_and_resume_conflict(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(good_recipe(tmp_path)))
    assert_one_line_error(*run_main([str(path), "--dry-run", "--resume"], capsys)[::2], "--dry-run and --resume")


@pytest.mark.parametrize("argv, expected", [
    ([], "the following arguments are required: recipe"),
    (["r.yaml", "--dry-rn"], "unrecognized arguments: --dry-rn"),
    (["models", "bogus"], "argument command: invalid choice: 'bogus'"),
    (["models", "pull"], "the following arguments are required: ref, directory"),
])
def test_argparse_errors_are_one_line(capsys, argv, expected):
    assert_one_line_error(*run_main(argv, capsys)[::2], expected)


def test_dry_run_smoke_prints_one_row_per_trial(capsys):
    code, out, err = run_main([str(ROOT / "recipes" / "smoke.yaml"), "--dry-run"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trial "))
    rows = lines[header + 1:lines.index("", header)]
    assert len(rows) == 2
    assert {tuple(row.split()[2:4]) for row in rows} == {("7.5", "palp"), ("7.5", "none")}  # the alignment grid
    assert "resources per trial: 1 worker(s)" in out


def test_dry_run_with_overrides(capsys):
    code, out, _ = run_main([str(ROOT / "recipes" / "smoke.yaml"), "search.alpha=[5,7.5,15]", "search.num_samples=2",
                             "--dry-run"], capsys)
    assert code == 0
    assert "12 trial(s) = 1 pair(s) x 6 grid point(s) x 2 sample(s)" in out  # 3 alphas x 2 alignments


def test_module_entry_point_has_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ntrain:\n  rank: abc\nsubjects: []\nprompts: []\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "palp-sweep: error: train.rank: expected int, got str 'abc'"
