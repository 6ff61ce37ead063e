"""Bad recipes and command lines: exit 2 with one `palp-sweep: error: <field>: <problem>` line, no traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from orchestrator.cli import main
from tests.conftest import untrained_adapter, write_bad_image, write_images

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
    ("train.lr", float("nan"), "train.lr: expected a finite number, got nan"),
    ("train.alpha", float("inf"), "train.alpha: expected a finite number, got inf"),
    ("search.beta", {"uniform": [0.5, float("inf")]}, "search.beta.uniform[1]: expected a finite number, got inf"),
    ("eval.guidance_scale", float("nan"), "eval.guidance_scale: expected a finite number, got nan"),
    ("eval.guidance_scale", 0.5, "eval.guidance_scale: CFG scale w must be a finite number >= 1"),
    ("eval.seeds", [0, 0], "eval.seeds: each seed once, got [0, 0]"),
    ("eval.seeds", [-1], "eval.seeds: a seed must be an integer in [0, 2**64), got -1"),
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


@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png", "lying_png", "bomb_png", "big_png"])
def test_image_that_opens_but_does_not_decode(tmp_path, capsys, kind):
    # verify() passes these (or PIL only warns): the recipe loader decodes every pixel, before Ray starts
    raw = good_recipe(tmp_path)
    bad = write_bad_image(tmp_path / "cat" / "1", kind)
    assert_dry_run_error(raw, tmp_path, capsys, "subjects[0].images:", f"image {bad}")


def test_16_bit_grey_image_passes(tmp_path, capsys):
    raw = good_recipe(tmp_path)
    Image.fromarray(np.full((48, 40), 40000, np.uint16)).save(tmp_path / "cat" / "1.png")
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_main([str(path), "--dry-run"], capsys)[0] == 0


def test_folder_named_like_an_image_inside_the_images_folder(tmp_path, capsys):
    raw = good_recipe(tmp_path)
    (tmp_path / "cat" / "2.png").mkdir()
    assert_dry_run_error(raw, tmp_path, capsys, "subjects[0].images: unreadable image", "2.png")


def test_image_path_that_is_not_a_file_or_folder(tmp_path, capsys):
    raw = good_recipe(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    raw["subjects"][1]["images"] = ["mug/0.png", "pipe.png"]
    assert_dry_run_error(raw, tmp_path, capsys, "subjects[1].images[1]:", "pipe.png is neither a file nor a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_image(tmp_path, capsys):
    raw = good_recipe(tmp_path)
    (tmp_path / "cat" / "1.png").chmod(0)
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
    ("name: x\ntrain: {rank: 4}\ntrain: {lr: 1.0e-4}\n", ("not valid YAML: key 'train' given twice", "line 3")),
    ("name: x\ntrain: {rank: 4, rank: 8}\n", ("not valid YAML: key 'rank' given twice", "line 2")),
])
def test_not_a_yaml_mapping(tmp_path, capsys, text, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert_one_line_error(*run_main([str(path)], capsys)[::2], f"{path}: {expected[0]}", expected[1])


def test_yaml_merge_keys_still_override(tmp_path):
    from orchestrator.recipe_yaml import _Loader
    text = "base: &b {rank: 4, lr: 1.0}\ntrain:\n  <<: *b\n  rank: 8\n"
    assert yaml.load(text, Loader=_Loader)["train"] == {"rank": 8, "lr": 1.0}


def test_recipe_not_utf8(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert_one_line_error(*run_main([str(path)], capsys)[::2], f"{path}: not valid YAML: not UTF-8 text (byte 9)")


def test_recipe_not_a_regular_file(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    os.mkfifo(path)  # reading it would block forever
    assert_one_line_error(*run_main([str(path)], capsys)[::2], f"{path}: is not a regular file")


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
    assert "8 trial(s) = 1 pair(s) x 4 grid point(s) x 2 sample(s)" in out  # PALP at 3 alphas, one baseline


def test_module_entry_point_has_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ntrain:\n  rank: abc\nsubjects: []\nprompts: []\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "palp-sweep: error: train.rank: expected int, got str 'abc'"


# --- `palp-sweep generate` on a broken adapter or with bad numbers: one line naming the file / flag --------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return untrained_adapter(tmp_path_factory.mktemp("adapter"))


def _edit_manifest(**changes):
    def edit(folder):
        path = folder / "manifest.json"
        manifest = {**json.loads(path.read_text()), **changes}
        path.write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    return edit


def _save_tensors(name, tensors):
    def save(folder):
        from safetensors.torch import save_file
        save_file(tensors, folder / name)
    return save


LORA, EMBEDS, MANIFEST = "pytorch_lora_weights.safetensors", "learned_embeds-V1.safetensors", "manifest.json"
ADAPTER_CASES = [
    # (what is broken, how, the file named, the rest of the message)
    ("truncated-lora", lambda d: os.truncate(d / LORA, 100), LORA, "not a readable safetensors file"),
    ("empty-embeds", lambda d: (d / EMBEDS).write_bytes(b""), EMBEDS, "not a readable safetensors file"),
    ("missing-lora", lambda d: (d / LORA).unlink(), LORA, "missing (named by manifest.json)"),
    ("not-json", lambda d: (d / MANIFEST).write_text("{bad"), MANIFEST, "not valid JSON: Expecting property name"),
    ("not-utf8", lambda d: (d / MANIFEST).write_bytes(b'{"a": "\xff"}'), MANIFEST, "not UTF-8 text (byte 7)"),
    ("a-list", lambda d: (d / MANIFEST).write_text("[]"), MANIFEST, "expected a JSON object, got list"),
    ("no-rank", _edit_manifest(rank=None), MANIFEST, "rank: required"),
    ("rank-str", _edit_manifest(rank="4"), MANIFEST, "rank: expected an integer >= 1, got '4'"),
    ("tokens-str", _edit_manifest(tokens="[V1]"), MANIFEST, "tokens: expected a non-empty list"),
    ("alpha-nan", lambda d: (d / MANIFEST).write_text((d / MANIFEST).read_text().replace(
        '"lora_alpha": 4', '"lora_alpha": NaN')), MANIFEST, "lora_alpha: expected a number > 0, got nan"),
    ("escapes", _edit_manifest(embeddings={"[V1]": "../x.safetensors"}), MANIFEST,
     "embeddings: expected a mapping of each token to a file in the adapter folder"),
    ("other-tokens", _edit_manifest(placeholders={"[V2]": "dog"}), MANIFEST,
     "placeholders: its tokens ['[V2]'] are not the manifest's tokens ['[V1]']"),
    ("subject-token", _edit_manifest(subjects=[{"token": "[V9]", "class_word": "cat", "images": []}]), MANIFEST,
     "subjects[0].token: '[V9]' is not one of the tokens"),
    ("rank-lies", _edit_manifest(rank=8), LORA, "does not fit the rank-8 LoRA of 'tiny': size mismatch"),
    ("no-lora-keys", _save_tensors(LORA, {}), LORA, "64 LoRA weights of this model are missing"),
    ("wrong-embed", _save_tensors(EMBEDS, {"[V7]": torch.zeros(32)}), EMBEDS,
     "expected a tensor '[V1]' of shape [32], got no such tensor"),
]


@pytest.mark.parametrize("break_it, name, expected", [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES])
def test_broken_adapter(adapter, tmp_path, capsys, break_it, name, expected):
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    break_it(broken)
    out = tmp_path / "out"
    code, _, err = run_main(["generate", str(broken), "--prompt", "A sketch of [V1]", "--steps", "1", "--seeds", "0",
                             "--no-score", "--out", str(out)], capsys)
    assert_one_line_error(code, err, f"{broken / name}: {expected}")
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["--guidance-scale", "nan"], "--guidance-scale: CFG scale w must be a finite number >= 1 (1 = no CFG), got nan"),
    (["--guidance-scale", "inf"], "--guidance-scale: CFG scale w must be a finite number >= 1 (1 = no CFG), got inf"),
    (["--guidance-scale", "0.5"], "--guidance-scale: CFG scale w must be a finite number >= 1 (1 = no CFG), got 0.5"),
    (["--guidance-scale", "x"], "argument --guidance-scale: invalid float value: 'x'"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["--steps", "1001"], "--steps: at most the base model's 1000 training timesteps, got 1001"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["--seeds", "99999999999999999999999"], "--seeds: a seed must be an integer in [0, 2**64)"),
    (["--seeds", "-1"], "--seeds: a seed must be an integer in [0, 2**64), got -1"),
    (["--method", "pg", "--omega", "nan"], "ω must be a number in [0, 1]"),
    (["--device", "cuda:x"], "--device:"),
])
def test_generate_bad_numbers_and_flags(adapter, tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    code, _, err = run_main(["generate", str(adapter), "--prompt", "A sketch of [V1]", "--steps", "1", "--seeds", "0",
                             "--no-score", "--out", str(out), *argv], capsys)
    assert_one_line_error(code, err, expected)
    assert not out.exists()


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_generate_out_onto_a_file(adapter, tmp_path, capsys, out):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run_main(["generate", str(adapter), "--prompt", "A sketch of [V1]", "--out", str(tmp_path / out)],
                            capsys)
    assert_one_line_error(code, err, f"--out {tmp_path / out}: ", "give a folder")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_generate_out_not_empty_needs_force_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cfg-seed0.png").write_text("mine")
    # no adapter at SOURCE: the refusal comes first, before the adapter or a model is read
    code, _, err = run_main(["generate", str(tmp_path / "nope"), "--prompt", "A sketch of [V1]", "--out", str(out)],
                            capsys)
    assert_one_line_error(code, err, f"--out {out}: the folder is not empty; pass --force")
    assert (out / "cfg-seed0.png").read_text() == "mine"


def test_generate_unreadable_reference_image(adapter, tmp_path, capsys):
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    bad = broken / "references" / "palp_cat_v1" / "0.png"  # the adapter's own copy, damaged
    bad.write_bytes(write_bad_image(tmp_path / "ref", "truncated_png").read_bytes())
    code, _, err = run_main(["generate", str(broken), "--prompt", "A sketch of [V1]", "--out", str(tmp_path / "out")],
                            capsys)
    assert_one_line_error(code, err, f"reference image of [V1]: unreadable image {bad}", "--no-score")
    assert not (tmp_path / "out").exists()


def test_generate_module_has_one_stderr_line_and_no_traceback(adapter, tmp_path):
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    os.truncate(broken / LORA, 100)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "generate", str(broken), "--prompt",
                           "A sketch of [V1]", "--no-score", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"palp-sweep: error: {broken / LORA}: not a readable safetensors file "
                                        "(Error while deserializing header: invalid header length)"], proc.stderr


# --- `palp-sweep models`: read-only, so it never creates a store -------------------------------------------

@pytest.fixture
def no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path.parent / f"{tmp_path.name}-home"))  # no job's ~/palp-sweep/runs/mlflow.db
    return tmp_path


@pytest.mark.parametrize("argv", [["list"], ["show", "palp-cat"], ["pull", "palp-cat", "pulled"]])
def test_models_without_a_store_create_nothing(no_store, capsys, argv):
    code, _, err = run_main(["models", *argv], capsys)
    assert_one_line_error(code, err, f"no MLflow store at sqlite:///{no_store / 'mlflow.db'}", "--tracking-uri")
    assert list(no_store.iterdir()) == []


@pytest.mark.parametrize("uri, expected", [
    ("file://{tmp}/mlruns", "no folder {tmp}/mlruns"),
    ("{tmp}/mlruns", "no folder {tmp}/mlruns"),
    ("sqlite:///{tmp}/other.db", "{tmp}/other.db does not exist"),
])
def test_models_with_a_missing_local_store_create_nothing(no_store, capsys, uri, expected):
    code, _, err = run_main(["models", "--tracking-uri", uri.format(tmp=no_store), "list"], capsys)
    assert_one_line_error(code, err, expected.format(tmp=no_store))
    assert list(no_store.iterdir()) == []


def test_models_store_that_is_not_a_database(no_store, capsys):
    (no_store / "mlflow.db").write_text("hello")
    code, _, err = run_main(["models", "list"], capsys)
    assert_one_line_error(code, err, f"{no_store / 'mlflow.db'}: not an MLflow store (not an SQLite database)")
    assert (no_store / "mlflow.db").read_text() == "hello"


@pytest.mark.parametrize("target", ["file", "file/sub"])
def test_models_pull_onto_a_file(no_store, capsys, target):
    (no_store / "file").write_text("keep")
    code, _, err = run_main(["models", "pull", "palp-cat", target], capsys)
    assert_one_line_error(code, err, f"pull {target}: ", "give a folder")
    assert sorted(p.name for p in no_store.iterdir()) == ["file"]


def test_models_pull_into_a_non_empty_folder_needs_force_before_the_store_is_read(no_store, capsys):
    (no_store / "adapter").mkdir()
    (no_store / "adapter" / "manifest.json").write_text("mine")
    code, _, err = run_main(["models", "pull", "palp-cat", "adapter"], capsys)  # and no store here
    assert_one_line_error(code, err, "pull adapter: the folder is not empty; pass --force")
    assert (no_store / "adapter" / "manifest.json").read_text() == "mine"
    assert sorted(p.name for p in no_store.iterdir()) == ["adapter"]


def test_help_and_usage_import_no_torch_mlflow_or_ray():
    """--help of every command starts without the heavy libraries (seconds each); timed in benchmarks/RESULTS.md."""
    code = ("import sys, orchestrator.cli as cli\n"
            "for argv in (['--help'], ['models', '--help'], ['models', 'list', '--help'], ['models', 'show', '--help'],"
            " ['models', 'pull', '--help'], ['generate', '--help'], ['models', 'pull', 'x']):\n"
            "    try:\n"
            "        cli.main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'diffusers', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout
    assert "usage: palp-sweep generate" in proc.stdout and "--force" in proc.stdout
    assert proc.stderr.splitlines() == ["palp-sweep: error: the following arguments are required: directory"]


def test_models_module_in_an_empty_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "models", "list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "no MLflow store" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_models_list_reads_an_existing_store(no_store, capsys):
    from mlflow import MlflowClient
    MlflowClient(f"sqlite:///{no_store / 'mlflow.db'}").search_experiments()  # what a sweep here leaves behind
    code, out, err = run_main(["models", "list"], capsys)
    assert code == 0 and "no registered models" in out


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, from_env", [
    (["models", "list"], True),
    (["models", "--tracking-uri", "{uri}", "pull", "palp-cat", "pulled"], False),
    (["generate", "models:/palp-cat@champion", "--prompt", "A sketch of [V1]"], True),
    (["generate", "runs:/abc/model", "--tracking-uri", "{uri}", "--prompt", "A sketch of [V1]"], False),
])
def test_unreachable_tracking_server_is_one_line_in_seconds(no_store, capsys, monkeypatch, argv, from_env):
    # MLflow's own client retries a closed port for about 4 minutes before it gives up
    import time
    uri = f"http://127.0.0.1:{_closed_port()}"
    if from_env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    code, _, err = run_main([a.format(uri=uri) for a in argv], capsys)
    assert time.monotonic() - start < 30
    source = "MLFLOW_TRACKING_URI" if from_env else "--tracking-uri"
    assert_one_line_error(code, err, f"palp-sweep: error: {source}: cannot reach {uri}: ")
    assert list(no_store.iterdir()) == []


def test_generate_tracking_uri_only_with_a_registered_source(adapter, tmp_path, capsys):
    code, _, err = run_main(["generate", str(adapter), "--tracking-uri", "http://127.0.0.1:5000",
                             "--prompt", "A sketch of [V1]", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "--tracking-uri: only for a models:/ or runs:/ SOURCE")
    assert not (tmp_path / "out").exists()


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`palp-sweep RECIPE --dry-run | head -1`: the rest of the output meets a closed pipe."""
    # 2,000 trials: far more output than a pipe holds, so the writer surely meets the closed end
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", str(ROOT / "recipes" / "smoke.yaml"),
                             "search.num_samples=1000", "--dry-run"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("recipe smoke")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == ""
